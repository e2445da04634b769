"""Noise schedules and their unit conversions (METHOD.md §2): the `Schedule` protocol the losses are written
against, and the discrete variance-preserving schedule that implements it.

Forward process     x_t = a_t x0 + σ_t ε   (VP: a_t = √ᾱ_t, σ_t = √(1 − ᾱ_t))
Network score       s(x_t) = −ε̂(x_t, t) / σ_t
Kernel score        ∇_{x_t} log p(x_t | x0) = −ε / σ_t
One-step generator  x0 = (z − σ_{t*} ε̂_θ(z, t*, c)) / a_{t*}     (DMD2 convention: noise z read as x_{t*})

Which schedule a model uses (SDXL's table, t* = 399) is its backbone's business: `distar.backbones`.

No I/O, no configuration, no distributed code: every function here is checked against
docs/METHOD.md line by line and against closed forms in tests/unit/test_diffusion.py.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Schedule(Protocol):
    """What the losses need of a noise schedule: x_t = a(t)·x0 + σ(t)·ε with t a tensor of one time per sample
    (integer table indices for a discrete schedule, floats for a continuous one)."""

    def check_t(self, t: torch.Tensor, name: str = "t") -> torch.Tensor:
        """t in the schedule's domain and dtype; a ValueError naming `name` otherwise."""
        ...

    def a(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The signal scale, shaped (B, 1, …, 1) to broadcast against `like` (B, …)."""
        ...

    def sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The noise scale, shaped like `a`."""
        ...

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = a(t)·x0 + σ(t)·ε."""
        ...

    def sample_t(self, n: int, lo, hi, generator: torch.Generator) -> torch.Tensor:
        """n times drawn from [lo, hi) with `generator`, on the CPU."""
        ...

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time argument the denoising network takes for t."""
        ...


def values_on_host(t: torch.Tensor) -> bool:
    """Whether a value check may read `t`: only on the CPU, where a read costs no sync. On an accelerator a read
    stalls the host until the device's queue drains, once per call in the training loop; a bad timestep fails
    there all the same (index_select refuses an index out of range), and "meta" tensors have no values."""
    return t.device.type == "cpu"


class VPSchedule:
    """A discrete VP schedule given by ᾱ_t for t = 0 … T−1; an integer t indexes it.

    ᾱ is kept in float64 so that a_t and σ_t are exact to the precision of the tensors they
    multiply; every accessor returns values in the dtype and device of the tensor it is applied to.
    """

    def __init__(self, alphas_cumprod: torch.Tensor):
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu()
        if alphas_cumprod.ndim != 1 or alphas_cumprod.numel() == 0:
            raise ValueError(f"alphas_cumprod must be a non-empty 1-D tensor, got shape {tuple(alphas_cumprod.shape)}")
        if not bool(((alphas_cumprod > 0) & (alphas_cumprod < 1)).all()):
            raise ValueError("alphas_cumprod must lie strictly inside (0, 1): σ_t and a_t must be non-zero")
        self.alphas_cumprod = alphas_cumprod
        self._a = alphas_cumprod.sqrt()
        self._sigma = (1.0 - alphas_cumprod).sqrt()
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def scaled_linear(cls, num_steps: int, beta_start: float, beta_end: float) -> VPSchedule:
        # diffusers' "scaled_linear": linear in √β, then squared.
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
        return cls(torch.cumprod(1.0 - betas, dim=0))

    @property
    def num_steps(self) -> int:
        return int(self.alphas_cumprod.numel())

    # -- indexing -------------------------------------------------------------------------------

    def check_timesteps(self, t: torch.Tensor, name: str = "t") -> torch.Tensor:
        """t as an integer tensor inside [0, T); a ValueError naming `name` otherwise."""
        t = torch.as_tensor(t)
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"{name} must hold integer timesteps (a LongTensor), got dtype {t.dtype}")
        if t.numel() and values_on_host(t) and (int(t.min()) < 0 or int(t.max()) >= self.num_steps):
            raise ValueError(
                f"{name} must lie in [0, {self.num_steps - 1}] for this {self.num_steps}-step schedule, "
                f"got values in [{int(t.min())}, {int(t.max())}]"
            )
        return t.long()

    check_t = check_timesteps

    def sample_t(self, n: int, lo: int, hi: int, generator: torch.Generator) -> torch.Tensor:
        """n integer timesteps uniform on [lo, hi)."""
        return torch.randint(lo, hi, (n,), generator=generator)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """A VP network takes the table index itself."""
        return t

    def _tables(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = like.dtype if like.dtype.is_floating_point else torch.float32
        key = (like.device, dtype)
        if key not in self._cache:
            self._cache[key] = (self._a.to(like.device, dtype), self._sigma.to(like.device, dtype))
        return self._cache[key]

    def a(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """a_t = √ᾱ_t, shaped (B, 1, …, 1) to broadcast against `like` (B, …)."""
        return self._gather(0, t, like)

    def sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """σ_t = √(1 − ᾱ_t), shaped (B, 1, …, 1) to broadcast against `like` (B, …)."""
        return self._gather(1, t, like)

    def _gather(self, which: int, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        t = self.check_timesteps(t)
        table = self._tables(like)[which]
        values = table.index_select(0, t.reshape(-1).to(table.device)).reshape(t.shape)
        if t.ndim == 0:
            return values
        if t.shape[0] != like.shape[0]:
            raise ValueError(f"t has batch size {t.shape[0]} but the tensor it scales has {like.shape[0]}")
        return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))

    # -- conversions ----------------------------------------------------------------------------

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = a_t x0 + σ_t ε."""
        _same_shape(x0, "x0", eps, "eps")
        return self.a(t, x0) * x0 + self.sigma(t, x0) * eps

    def eps_to_score(self, eps_hat: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """s = −ε̂ / σ_t."""
        return -eps_hat / self.sigma(t, eps_hat)

    def score_to_eps(self, score: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε̂ = −σ_t s."""
        return -self.sigma(t, score) * score

    def eps_to_x0(self, x_t: torch.Tensor, eps_hat: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x̂0 = (x_t − σ_t ε̂) / a_t."""
        _same_shape(x_t, "x_t", eps_hat, "eps_hat")
        return (x_t - self.sigma(t, x_t) * eps_hat) / self.a(t, x_t)

    def x0_to_eps(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε̂ = (x_t − a_t x̂0) / σ_t."""
        _same_shape(x_t, "x_t", x0, "x0")
        return (x_t - self.a(t, x_t) * x0) / self.sigma(t, x_t)

    def kernel_score(self, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """∇_{x_t} log p(x_t | x0) = −ε / σ_t, the forward kernel's conditional score."""
        return -eps / self.sigma(t, eps)

    def one_step_x0(self, z: torch.Tensor, eps_hat: torch.Tensor, t_star: int | torch.Tensor) -> torch.Tensor:
        """The one-step generator map x0 = (z − σ_{t*} ε̂_θ(z, t*, c)) / a_{t*}: noise z is read as x_{t*}."""
        _same_shape(z, "z", eps_hat, "eps_hat")
        t_star = torch.as_tensor(t_star)
        return self.eps_to_x0(z, eps_hat, t_star)


def _same_shape(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{b_name} has shape {tuple(b.shape)} but {a_name} has shape {tuple(a.shape)}")
