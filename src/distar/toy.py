"""The 2-D lab: a complete DI* run on a Gaussian mixture, in about a minute on a laptop CPU.

Everything that the SDXL run has is here in miniature, with the same loss functions:
- reference: a Gaussian mixture whose VP-diffused score is analytic (no reference training);
- generator: an MLP one-step generator, x0 = (z − σ_{t*} ε̂_θ(z)) / a_{t*} (the DMD2 map);
- assistant: an MLP ε̂_ψ(x_t, t) trained online by denoising score matching on generator samples;
- reward: a differentiable bump on some modes, r(x) = Σ_{k∈R} exp(−‖x − μ_k‖² / 2h²).

Run it:  distar toy --out runs/toy [--alpha-rew 1 --divergence kl --distance l2 ...]
It writes metrics.json (reward, per-mode mass, energy distances) and toy.png.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from distar import backbones
from distar.diffusion import VPSchedule
from distar.errors import UserError
from distar.losses import DivergenceConfig, assistant_loss, generator_loss, time_weight


@dataclass
class ToyConfig(DivergenceConfig):
    """Settings of the 2-D lab; the defaults run in about a minute on two CPU cores. The divergence's fields
    (divergence, distance, huber_c, form, weighting) are the trainer's (losses.DivergenceConfig)."""

    num_modes: int = 8
    """Reference modes, evenly spaced on a circle."""
    radius: float = 2.0
    """Radius of that circle."""
    mode_std: float = 0.3
    """Standard deviation of each reference mode."""
    rewarded_modes: list[int] = field(default_factory=lambda: [0, 1])
    """Indices of the modes the reward favours."""
    reward_bandwidth: float = 0.5
    """h in r(x) = Σ_{k∈R} exp(−‖x − μ_k‖²/2h²); r is 1 at a rewarded mode's centre."""
    alpha_rew: float = 0.2
    """Reward weight α_rew in L_G = −α_rew r + L_div (the paper's SDXL value is 100, at its reward's scale).
    0 trains on the divergence alone (the SIM / Diff-Instruct setting)."""
    t_star: int = 399
    """The generator's fixed timestep t*."""
    t_min: int = 20
    """Smallest t of the generator loss."""
    t_max: int = 980
    """Largest t (exclusive) of the generator loss."""
    steps: int = 1500
    """Generator updates."""
    assistant_updates: int = 1
    """K_TA: assistant updates per generator update."""
    assistant_warmup: int = 400
    """Assistant updates on the initial generator before the first generator update."""
    batch_size: int = 256
    """Samples per update (generator and assistant)."""
    lr_generator: float = 1e-3
    """Adam learning rate of the generator."""
    lr_assistant: float = 2e-3
    """Adam learning rate of the assistant."""
    hidden: int = 128
    """Width of both MLPs."""
    eval_samples: int = 20000
    """Samples for the final metrics."""
    seed: int = 0
    """Seed of everything."""


# -- the analytic reference ---------------------------------------------------------------------


class GaussianMixture:
    """x0 ~ Σ π_k N(μ_k, s_k² I): under VP diffusion x_t ~ Σ π_k N(a μ_k, (a² s_k² + σ²) I), so its ε is exact."""

    def __init__(self, means: torch.Tensor, stds: torch.Tensor, weights: torch.Tensor, schedule: VPSchedule):
        self.means, self.stds, self.weights, self.schedule = means, stds, weights / weights.sum(), schedule

    @classmethod
    def ring(cls, num_modes: int, radius: float, std: float, schedule: VPSchedule) -> GaussianMixture:
        angle = torch.arange(num_modes) * (2 * math.pi / num_modes)
        means = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
        return cls(means, torch.full((num_modes,), std), torch.ones(num_modes), schedule)

    def log_prob(self, x: torch.Tensor, a: torch.Tensor | float = 1.0, sigma: torch.Tensor | float = 0.0):
        """log p_t(x) of the diffused mixture at (a_t, σ_t), each of shape (B, 1) or scalar."""
        var = a**2 * self.stds**2 + sigma**2  # (B, K) or (K,)
        diff = x[:, None, :] - (a[..., None] if torch.is_tensor(a) else a) * self.means  # (B, K, 2)
        d = x.shape[1]
        log_comp = -0.5 * diff.pow(2).sum(-1) / var - 0.5 * d * torch.log(2 * math.pi * var)
        return torch.logsumexp(log_comp + self.weights.log(), dim=1)

    def eps(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The exact ε-prediction −σ_t ∇ log p_t(x_t); differentiable in x_t."""
        a, sigma = self.schedule.a(t, x_t), self.schedule.sigma(t, x_t)
        var = a**2 * self.stds**2 + sigma**2  # (B, K)
        diff = x_t[:, None, :] - a[..., None] * self.means  # (B, K, 2)
        log_comp = -0.5 * diff.pow(2).sum(-1) / var - torch.log(var) + self.weights.log()
        resp = torch.softmax(log_comp, dim=1)  # posterior over components
        score = -(resp[..., None] * diff / var[..., None]).sum(1)
        return -sigma * score

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        return self.means[k] + self.stds[k, None] * torch.randn(n, 2, generator=generator)

    def nearest_mode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Index of the nearest mode and the distance to it in units of that mode's std."""
        dist = torch.cdist(x, self.means)
        d, k = dist.min(dim=1)
        return k, d / self.stds[k]


def mode_reward(x: torch.Tensor, centres: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """r(x) = Σ_k exp(−‖x − μ_k‖² / 2h²), differentiable."""
    return torch.exp(-torch.cdist(x, centres).pow(2) / (2 * bandwidth**2)).sum(dim=1)


# -- networks -----------------------------------------------------------------------------------


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, hidden),
        nn.SiLU(),
        nn.Linear(hidden, hidden),
        nn.SiLU(),
        nn.Linear(hidden, hidden),
        nn.SiLU(),
        nn.Linear(hidden, d_out),
    )


class ToyGenerator(nn.Module):
    """One-step generator: noise z read as x_{t*}, x0 = (z − σ_{t*} ε̂_θ(z)) / a_{t*}."""

    def __init__(self, schedule: VPSchedule, t_star: int, hidden: int):
        super().__init__()
        self.schedule, self.t_star = schedule, t_star
        self.net = _mlp(2, hidden, 2)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.schedule.one_step_x0(z, self.net(z), self.t_star)


class ToyAssistant(nn.Module):
    """ε̂_ψ(x_t, t): an MLP on x_t and sinusoidal features of t/T."""

    def __init__(self, num_steps: int, hidden: int, num_freqs: int = 8):
        super().__init__()
        self.num_steps = num_steps
        self.register_buffer("freqs", 2.0 ** torch.arange(num_freqs) * math.pi, persistent=False)
        self.net = _mlp(2 + 2 * num_freqs, hidden, 2)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        phase = (t.float() / self.num_steps)[:, None] * self.freqs
        return self.net(torch.cat([x_t, phase.sin(), phase.cos()], dim=1))


# -- metrics ------------------------------------------------------------------------------------


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """2 E‖X − Y‖ − E‖X − X'‖ − E‖Y − Y'‖ (V-statistic), 0 iff the laws agree."""
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def tilted_reference_sample(
    reference: GaussianMixture, reward, alpha_rew: float, n: int, generator: torch.Generator
) -> torch.Tensor:
    """Samples of p_ref(x) exp(α_rew r(x)) / Z, the optimum of E[α_rew r] − KL, by importance resampling."""
    pool = reference.sample(20 * n, generator)
    logw = alpha_rew * reward(pool)
    idx = torch.multinomial(torch.softmax(logw, 0), n, replacement=True, generator=generator)
    return pool[idx]


def mode_masses(reference: GaussianMixture, x: torch.Tensor) -> tuple[list[float], float]:
    """Fraction of samples per nearest mode (within 3 std), and the fraction beyond 3 std of every mode."""
    k, d = reference.nearest_mode(x)
    on = d <= 3.0
    counts = torch.bincount(k[on], minlength=reference.means.shape[0]).float() / x.shape[0]
    return counts.tolist(), float((~on).float().mean())


# -- the run ------------------------------------------------------------------------------------


def run(config: ToyConfig, out_dir: str | Path | None = None, progress: bool = False) -> dict:
    """Train the lab's generator with DI* and return (and write) its metrics."""
    torch.manual_seed(config.seed)
    gen_rng = torch.Generator().manual_seed(config.seed)
    schedule = backbones.get("sdxl").schedule()  # the 2-D lab runs on SDXL's VP schedule
    reference = GaussianMixture.ring(config.num_modes, config.radius, config.mode_std, schedule)
    for k in config.rewarded_modes:
        if not 0 <= k < config.num_modes:
            raise UserError(f"rewarded_modes holds {k}, outside the {config.num_modes} modes 0..{config.num_modes - 1}")
    centres = reference.means[config.rewarded_modes]

    def reward(x):
        return mode_reward(x, centres, config.reward_bandwidth)

    generator = ToyGenerator(schedule, config.t_star, config.hidden)
    assistant = ToyAssistant(schedule.num_steps, config.hidden)
    opt_g = torch.optim.Adam(generator.parameters(), lr=config.lr_generator, betas=(0.0, 0.999))
    opt_a = torch.optim.Adam(assistant.parameters(), lr=config.lr_assistant, betas=(0.0, 0.999))
    batch = config.batch_size

    def assistant_step():
        with torch.no_grad():
            x0 = generator(torch.randn(batch, 2, generator=gen_rng))
        t = torch.randint(0, schedule.num_steps, (batch,), generator=gen_rng)
        eps = torch.randn(batch, 2, generator=gen_rng)
        loss = assistant_loss(assistant(schedule.add_noise(x0, eps, t), t), eps)
        opt_a.zero_grad(set_to_none=True)
        loss.backward()
        opt_a.step()
        return loss.item()

    started = time.perf_counter()
    for _ in range(config.assistant_warmup):
        assistant_step()

    history = []
    for step in range(config.steps):
        for _ in range(config.assistant_updates):
            loss_ta = assistant_step()
        assistant.requires_grad_(False)
        x0 = generator(torch.randn(batch, 2, generator=gen_rng))
        t = torch.randint(config.t_min, config.t_max, (batch,), generator=gen_rng)
        eps = torch.randn(batch, 2, generator=gen_rng)
        loss_div = generator_loss(
            x0,
            t,
            eps,
            assistant,
            reference.eps,
            schedule,
            weight=time_weight(schedule, t, config.weighting, x0),
            **config.loss_kwargs(),
        )
        mean_reward = reward(x0).mean()
        loss = loss_div - config.alpha_rew * mean_reward
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        assistant.requires_grad_(True)
        if step % 100 == 0 or step == config.steps - 1:
            history.append({"step": step, "reward": mean_reward.item(), "assistant_loss": loss_ta})
            if progress:
                print(f"step {step:5d}  reward {mean_reward.item():.3f}  assistant loss {loss_ta:.4f}", flush=True)
    elapsed = time.perf_counter() - started

    with torch.no_grad():
        eval_rng = torch.Generator().manual_seed(config.seed + 1)
        n = config.eval_samples
        samples = generator(torch.randn(n, 2, generator=eval_rng))
        ref_samples = reference.sample(n, eval_rng)
        tilted = tilted_reference_sample(reference, reward, config.alpha_rew, n, eval_rng)
        sub = slice(0, min(n, 4000))  # energy distance is O(n²)
        gen_mass, gen_off = mode_masses(reference, samples)
        ref_mass, _ = mode_masses(reference, ref_samples)
        tilted_mass, _ = mode_masses(reference, tilted)
        metrics = {
            "config": dataclasses.asdict(config),
            "mean_reward": float(reward(samples).mean()),
            "reference_mean_reward": float(reward(ref_samples).mean()),
            "tilted_reference_mean_reward": float(reward(tilted).mean()),
            "mode_mass_generator": gen_mass,
            "mode_mass_reference": ref_mass,
            "mode_mass_tilted_reference": tilted_mass,
            "rewarded_mass_generator": sum(gen_mass[k] for k in config.rewarded_modes),
            "rewarded_mass_reference": sum(ref_mass[k] for k in config.rewarded_modes),
            "off_support_fraction": gen_off,
            "energy_distance_to_reference": energy_distance(samples[sub], ref_samples[sub]),
            "energy_distance_to_tilted_reference": energy_distance(samples[sub], tilted[sub]),
            "train_seconds": elapsed,
            "history": history,
        }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        plot(reference, samples[:3000], config, out / "toy.png", metrics)
    return metrics


def plot(reference: GaussianMixture, samples: torch.Tensor, config: ToyConfig, path: Path, metrics: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lim = config.radius + 1.5
    grid = torch.linspace(-lim, lim, 200)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    logp = reference.log_prob(torch.stack([gx.flatten(), gy.flatten()], 1)).reshape(200, 200)
    fig, ax = plt.subplots(figsize=(6, 6), dpi=110)
    ax.contour(gx, gy, logp.exp(), levels=8, cmap="Greys")
    for k in config.rewarded_modes:
        ax.add_patch(plt.Circle(reference.means[k].tolist(), config.reward_bandwidth, fill=False, color="tab:orange"))
    ax.scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.4, color="tab:blue", label="generator samples")
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_title(
        f"DI* 2-D lab: divergence={config.divergence}, d={config.distance}, α_rew={config.alpha_rew:g}\n"
        f"reward {metrics['mean_reward']:.3f} (reference {metrics['reference_mean_reward']:.3f}), "
        f"energy dist. {metrics['energy_distance_to_reference']:.3f}",
        fontsize=9,
    )
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
