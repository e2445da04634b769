"""The DI* losses (METHOD.md §3–5): the tractable generator loss, the assistant's loss, CFG.

Generator (the score-divergence gradient theorem, "sim" form):

    L_div(θ) = E[ −w(t) · d'(y_t)ᵀ ( s_ψ(x_t) − ∇_{x_t} log p(x_t|x0) ) ],   y_t = s_ψ(x_t) − s_ref^cfg(x_t)
    x0 = g_θ(z, c),  x_t = a_t x0 + σ_t ε

Every network is a frozen function here, but it is evaluated on the differentiable x_t, so the
gradient reaches θ through x_t, through s_ψ(x_t) and through d'(y_t) (the SiD/SIM pattern). The
"full" form also differentiates the sampling measure and adds + w(t) d(y_t). The KL baseline
(Diff-Instruct / DI++) uses the detached score difference: E[ w(t) sg(s_ψ − s_ref)ᵀ x_t ].

Units: y is in score units (s = −ε̂/σ_t), so the pseudo-Huber constant c is in score units too.
An ε-unit difference δ gives ‖y‖ = ‖δ‖/σ_t.

The losses are surrogates: their *gradients* equal the gradients of the divergences (checked
against closed forms in tests/unit/test_losses.py); their values are not the divergences. Use
`score_distance` to log the divergence itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

import torch

from distar.diffusion import Schedule

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BranchesFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

Divergence = Literal["score", "kl"]
Distance = Literal["pseudo_huber", "l2"]
Form = Literal["sim", "full"]
Weighting = Literal["uniform", "sigma", "sigma2", "x0"]
Reduction = Literal["sum", "mean"]
CfgConvention = Literal["diffusers", "conditional"]
DIVERGENCES: tuple[str, ...] = get_args(Divergence)
DISTANCES: tuple[str, ...] = get_args(Distance)
FORMS: tuple[str, ...] = get_args(Form)
TIME_WEIGHTINGS: tuple[str, ...] = get_args(Weighting)
REDUCTIONS: tuple[str, ...] = get_args(Reduction)
CFG_CONVENTIONS: tuple[str, ...] = get_args(CfgConvention)
DEFAULT_HUBER_C = 1.0


@dataclass
class DivergenceConfig:
    """The divergence D of the objective; the trainer's loss config and the 2-D lab's config both extend it."""

    divergence: Divergence = "score"
    """"score" (DI*) or "kl" (the Diff-Instruct / DI++ baseline)."""
    distance: Distance = "pseudo_huber"
    """d on score differences: "pseudo_huber" or "l2"."""
    huber_c: float = DEFAULT_HUBER_C
    """Pseudo-Huber c in score units (the paper's value is not public; docs/METHOD.md §3 says why 1)."""
    form: Form = "sim"
    """"sim" (stop-gradient sampling measure, the theorem's loss) or "full" (adds + w·d(y_t))."""
    weighting: Weighting = "sigma"
    """w(t) of the divergence: "uniform", "sigma", "sigma2" or "x0" (σ_t²/a_t, the unit of the SiD/SIM code
    lineage) (time_weight)."""
    reduction: Reduction = "sum"
    """How d reads y over a sample's D latent elements: "sum" (‖y‖ over all of them; c in score units, so the
    divergence, and its balance with α_rew, grows with the latent size) or "mean" (d(y/√D): the L2 distance is the
    mean square per element and c is per element, i.e. c·√D on the sum), which keeps one α_rew meaning the same
    on a 128² SDXL latent and a 16-channel flow latent."""
    kl_normalise: bool = False
    """KL baseline only: divide each sample's gradient by mean |x0 − x̂0_ref| as DMD does, so the KL-versus-score
    comparison can run at a comparable strength (off: the plain Diff-Instruct / DI++ gradient)."""
    score_normalise: bool = False
    """Score divergence only: divide each sample's loss by mean |x0 − x̂0_ref(x_t)| (detached), SiD's per-sample
    normaliser (its `weight_factor`), so no sample's pull depends on how far it is from the reference's denoised
    guess; not in the paper (off)."""

    def loss_kwargs(self) -> dict:
        """The keyword arguments of `generator_loss` this config fixes (the weight is per sample: time_weight)."""
        return {
            "divergence": self.divergence,
            "distance": self.distance,
            "huber_c": self.huber_c,
            "form": self.form,
            "kl_normalise": self.kl_normalise,
            "score_normalise": self.score_normalise,
            "reduction": self.reduction,
        }


def cfg(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance: ε^cfg = ε(·|∅) + α_cfg (ε(·|c) − ε(·|∅)); α_cfg = 1 is the conditional model."""
    if eps_uncond.shape != eps_cond.shape:
        raise ValueError(
            f"eps_cond has shape {tuple(eps_cond.shape)} but eps_uncond has shape {tuple(eps_uncond.shape)}"
        )
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def guidance_scale(alpha_cfg: float, convention: str = "diffusers") -> float:
    """The α_cfg of a config as the scale `cfg` takes. "diffusers": ε_∅ + α(ε_c − ε_∅), so α = 0 is the
    unconditional model and 1 the conditional one; "conditional": ε_c + α(ε_c − ε_∅), so α = 0 is the conditional
    model (no guidance) and α is diffusers' α + 1. The paper does not say which it uses (docs/METHOD.md §6)."""
    _check_choice("cfg_convention", convention, CFG_CONVENTIONS)
    return float(alpha_cfg) if convention == "diffusers" else 1.0 + float(alpha_cfg)


def score_distance(y: torch.Tensor, distance: str = "pseudo_huber", huber_c: float = DEFAULT_HUBER_C):
    """d(y) per sample, the norm over every non-batch dimension.

    pseudo_huber: d(y) = √(‖y‖² + c²) − c;   l2: d(y) = ‖y‖².
    """
    _check_choice("distance", distance, DISTANCES)
    sq = y.flatten(1).pow(2).sum(dim=1)
    if distance == "l2":
        return sq
    _check_huber_c(huber_c)
    return (sq + huber_c**2).sqrt() - huber_c


def score_distance_grad(y: torch.Tensor, distance: str = "pseudo_huber", huber_c: float = DEFAULT_HUBER_C):
    """d'(y), same shape as y.  pseudo_huber: y / √(‖y‖² + c²);  l2: 2y."""
    _check_choice("distance", distance, DISTANCES)
    if distance == "l2":
        return 2.0 * y
    _check_huber_c(huber_c)
    norm = (y.flatten(1).pow(2).sum(dim=1) + huber_c**2).sqrt()
    return y / norm.reshape((-1,) + (1,) * (y.ndim - 1))


class GeneratorLossParts(NamedTuple):
    """What one evaluation of the divergence part of the generator loss yields."""

    loss: torch.Tensor
    """L_div, the surrogate, as a batch mean (its gradient is the divergence's)."""
    divergence: torch.Tensor
    """w(t)·d(y_t) per sample, detached: the Monte-Carlo integrand of D itself (for logging)."""
    x_t: torch.Tensor
    """The noised sample a_t x0 + σ_t ε, carrying the graph to θ."""
    y_norm: torch.Tensor
    """‖y_t‖ per sample, detached, as d reads it (‖y‖/√D under reduction "mean"): divided by c, how far into
    pseudo-Huber's linear part the samples sit (≫ 1: d' is a unit vector and c no longer matters)."""


def generator_loss(*args, **kwargs) -> torch.Tensor:
    """L_div alone: `generator_loss_parts(...).loss`, with the same arguments."""
    return generator_loss_parts(*args, **kwargs).loss


def generator_loss_parts(
    x0: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    eps_assistant: EpsFn,
    eps_reference: EpsFn,
    schedule: Schedule,
    *,
    divergence: str = "score",
    distance: str = "pseudo_huber",
    huber_c: float = DEFAULT_HUBER_C,
    form: str = "sim",
    weight: torch.Tensor | None = None,
    kl_normalise: bool = False,
    score_normalise: bool = False,
    reduction: str = "sum",
) -> GeneratorLossParts:
    """The divergence part of the generator loss, L_div, as a batch mean (METHOD.md §4), with its parts.

    x0: generator output (B, …) carrying the graph to θ.  t: one time per sample (B,), in the schedule's
    domain (integer indices for a VP table, floats for a continuous schedule).  eps: noise like x0.
    eps_assistant(x_t, t), eps_reference(x_t, t): ε-predictions; the reference already includes its
    conditioning and CFG. The caller keeps their parameters frozen (requires_grad False): this loss
    differentiates through their inputs only.
    divergence: "score" (DI*) or "kl" (Diff-Instruct / DI++).  distance: "pseudo_huber" or "l2".
    form: "sim" (sampling measure stop-gradient) or "full" (adds + w·d(y_t)).  weight: w(t) per sample.
    kl_normalise: the KL gradient per sample divided by mean |x0 − x̂0_ref| (DMD).  score_normalise: the score
    divergence's loss per sample divided by the same detached distance (SiD).  reduction: "sum" (d of y
    over all D elements) or "mean" (d of y/√D; the KL gradient is divided by D, as the mean square's would be).
    Returns the loss, w(t)·d(y_t) per sample, x_t and ‖y_t‖.
    """
    _check_choice("divergence", divergence, DIVERGENCES)
    _check_choice("reduction", reduction, REDUCTIONS)
    _check_choice("distance", distance, DISTANCES)
    _check_choice("form", form, FORMS)
    if distance == "pseudo_huber":
        _check_huber_c(huber_c)
    if x0.ndim < 1 or x0.shape[0] == 0:
        raise ValueError(f"x0 must have a non-empty batch dimension, got shape {tuple(x0.shape)}")
    if eps.shape != x0.shape:
        raise ValueError(f"eps has shape {tuple(eps.shape)} but x0 has shape {tuple(x0.shape)}")
    t = schedule.check_t(t, "t")
    if t.shape != (x0.shape[0],):
        raise ValueError(f"t must have shape ({x0.shape[0]},) (one timestep per sample), got {tuple(t.shape)}")
    weight = _per_sample_weight(weight, x0)

    sigma = schedule.sigma(t, x0)
    x_t = schedule.add_noise(x0, eps, t)
    # "mean": d reads y/√D, so d'(y) = d'(y/√D)/√D; the KL's l2 gradient 2y becomes 2y/D.
    root_d = float(x0[0].numel()) ** 0.5 if reduction == "mean" else 1.0

    if divergence == "kl":
        with torch.no_grad():
            x_t_frozen = x_t.detach()
            eps_psi = _call(eps_assistant, "eps_assistant", x_t_frozen, t)
            eps_ref = _call(eps_reference, "eps_reference", x_t_frozen, t)
            score_diff = -(eps_psi - eps_ref) / sigma
            value = weight * score_distance(score_diff / root_d, distance, huber_c)
            y_norm = score_diff.flatten(1).norm(dim=1) / root_d
            if kl_normalise:  # DMD: per sample, by the mean distance of x0 to the reference's own x0 estimate
                x0_ref = (x_t_frozen - sigma * eps_ref) / schedule.a(t, x0)
                score_diff = score_diff / (x0.detach() - x0_ref).abs().flatten(1).mean(dim=1).clamp_min(1e-12).reshape(
                    (-1,) + (1,) * (x0.ndim - 1)
                )
        per_sample = (score_diff * x_t).flatten(1).sum(dim=1) / root_d**2
        return GeneratorLossParts((weight * per_sample).mean(), value, x_t, y_norm)

    eps_psi = _call(eps_assistant, "eps_assistant", x_t, t)
    eps_ref = _call(eps_reference, "eps_reference", x_t, t)
    y = -(eps_psi - eps_ref) / sigma  # s_ψ − s_ref^cfg
    # s_ψ(x_t) − ∇ log p(x_t|x0) = −(ε̂_ψ − ε)/σ_t: the kernel score is −ε/σ_t, a constant given ε.
    score_residual = -(eps_psi - eps) / sigma
    d_prime = score_distance_grad(y / root_d, distance, huber_c) / root_d
    per_sample = -(d_prime * score_residual).flatten(1).sum(dim=1)
    if form == "full":
        per_sample = per_sample + score_distance(y / root_d, distance, huber_c)
    if score_normalise:  # SiD: x̂0_ref = (x_t − σ ε̂_ref)/a, the distance taken detached
        with torch.no_grad():
            x0_ref = (x_t - sigma * eps_ref) / schedule.a(t, x0)
            distance_to_ref = (x0 - x0_ref).abs().flatten(1).mean(dim=1).clamp_min(1e-12)
        per_sample = per_sample / distance_to_ref
    with torch.no_grad():
        value = weight * score_distance(y / root_d, distance, huber_c)
        y_norm = y.flatten(1).norm(dim=1) / root_d
    return GeneratorLossParts((weight * per_sample).mean(), value, x_t, y_norm)


class GeneratorObjective(NamedTuple):
    """L_G and its terms, each a batch mean (METHOD.md §4)."""

    loss: torch.Tensor
    """L_G = −α_rew·r + L_div (+ the CFG reward term when CFG acts outside the divergence)."""
    reward_loss: torch.Tensor
    """−α_rew · mean r (zero without a reward, or with α_rew = 0)."""
    divergence_loss: torch.Tensor
    """L_div, the surrogate."""
    cfg_loss: torch.Tensor | None
    """−(α_cfg − 1) E[w log p(c|x_t)] when CFG acts as a reward; None otherwise."""
    divergence: torch.Tensor
    """w(t)·d(y_t) per sample, detached."""
    y_norm: torch.Tensor
    """‖y_t‖ per sample as d reads it, detached."""


def generator_objective(
    x0: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    eps_assistant: EpsFn,
    eps_reference: EpsFn,
    schedule: Schedule,
    *,
    reward: torch.Tensor | None = None,
    alpha_rew: float = 0.0,
    reference_branches: BranchesFn | None = None,
    alpha_cfg: float = 1.0,
    weight: torch.Tensor | None = None,
    cfg_noise: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
    **divergence_kwargs,
) -> GeneratorObjective:
    """The whole generator loss L_G = −α_rew·r + L_div (+ the CFG reward term).

    reward: r per sample, carrying the graph to x0 (through decode and the reward model) when α_rew ≠ 0.
    reference_branches(x_t, t) → (ε_ref(·|∅), ε_ref(·|c)): given when CFG acts as a reward (α_cfg ≠ 1) instead
    of inside the divergence; eps_reference is then the conditional reference. cfg_noise = (t, ε, w): the CFG
    term's own times, noise and time weight (DI*-OUT with its own t range and w(t)); None: the divergence's x_t
    and weight. divergence_kwargs: as in `generator_loss` (divergence, distance, huber_c, form).
    """
    div = generator_loss_parts(x0, t, eps, eps_assistant, eps_reference, schedule, weight=weight, **divergence_kwargs)
    reward_loss = x0.new_zeros(())
    if reward is not None and alpha_rew != 0:
        reward_loss = -alpha_rew * reward.mean()
    loss = reward_loss + div.loss
    cfg_loss = None
    if reference_branches is not None and alpha_cfg != 1.0:
        x_t, t_cfg, w_cfg = div.x_t, t, weight
        if cfg_noise is not None:
            t_cfg, eps_cfg, w_cfg = cfg_noise
            x_t = schedule.add_noise(x0, eps_cfg, schedule.check_t(t_cfg, "cfg t"))
        with torch.no_grad():
            eps_uncond, eps_cond = reference_branches(x_t.detach(), t_cfg)
        cfg_loss = cfg_reward_loss(x_t, t_cfg, eps_cond, eps_uncond, schedule, alpha_cfg, w_cfg)
        loss = loss + cfg_loss
    return GeneratorObjective(loss, reward_loss, div.loss, cfg_loss, div.divergence, div.y_norm)


def cfg_reward_loss(
    x_t: torch.Tensor,
    t: torch.Tensor,
    eps_cond: torch.Tensor,
    eps_uncond: torch.Tensor,
    schedule: Schedule,
    guidance_scale: float,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """CFG as an explicit reward (METHOD.md §2): −(α_cfg − 1) E[w(t) log p_t(c | x_t)] as a surrogate loss.

    ∇_{x_t} log p_t(c|x_t) = s_ref(x_t|c) − s_ref(x_t|∅) = −(ε̂_c − ε̂_∅)/σ_t, used detached (like the KL
    gradient): the loss's gradient w.r.t. x_t is −(α_cfg − 1) w(t) (s_c − s_∅) / B, reaching θ through x_t.
    With the divergence taken to the conditional reference this is the "CFG outside the divergence" variant.
    """
    if not (eps_cond.shape == eps_uncond.shape == x_t.shape):
        raise ValueError(
            f"eps_cond {tuple(eps_cond.shape)}, eps_uncond {tuple(eps_uncond.shape)} and x_t {tuple(x_t.shape)} "
            "must have the same shape"
        )
    t = schedule.check_t(t, "t")
    weight = _per_sample_weight(weight, x_t)
    sigma = schedule.sigma(t, x_t)
    log_p_c_grad = (-(eps_cond - eps_uncond) / sigma).detach()
    per_sample = (log_p_c_grad * x_t).flatten(1).sum(dim=1)
    return -(guidance_scale - 1.0) * (weight * per_sample).mean()


def assistant_loss(eps_hat: torch.Tensor, eps: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Denoising score matching in ε units: E[ λ(t) ‖ε̂_ψ(x_t, t, c) − ε‖² ], mean over non-batch dimensions.

    x_t must be built from a detached generator sample, x0 = sg(g_θ(z, c)) (METHOD.md §5).
    """
    if eps_hat.shape != eps.shape:
        raise ValueError(f"eps_hat has shape {tuple(eps_hat.shape)} but eps has shape {tuple(eps.shape)}")
    if eps.ndim < 1 or eps.shape[0] == 0:
        raise ValueError(f"eps must have a non-empty batch dimension, got shape {tuple(eps.shape)}")
    weight = _per_sample_weight(weight, eps)
    per_sample = (eps_hat - eps).flatten(1).pow(2).mean(dim=1) if eps.ndim > 1 else (eps_hat - eps).pow(2)
    return (weight * per_sample).mean()


def time_weight(schedule: Schedule, t: torch.Tensor, kind: str, like: torch.Tensor) -> torch.Tensor:
    """w(t) per sample: "uniform" 1; "sigma" σ_t (turns one factor of 1/σ_t back into ε units);
    "sigma2" σ_t² (the L2 score divergence in ε units, the DMD/SiD scale); "x0" σ_t²/a_t (a score difference
    times σ_t²/a_t is the difference of the two x0 estimates: the unit of the SiD/SIM code)."""
    _check_choice("weighting", kind, TIME_WEIGHTINGS)
    t = schedule.check_t(t)
    sigma = schedule.sigma(t, like).reshape(-1)
    if kind == "uniform":
        return torch.ones_like(sigma)
    if kind == "x0":
        return sigma**2 / schedule.a(t, like).reshape(-1)
    return sigma if kind == "sigma" else sigma**2


# -- argument checks ----------------------------------------------------------------------------


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not known; choose one of {', '.join(map(repr, choices))}")


def _check_huber_c(huber_c: float) -> None:
    if not (isinstance(huber_c, (int, float)) and huber_c > 0):
        raise ValueError(f"huber_c must be a positive number (score units), got {huber_c!r}")


def _per_sample_weight(weight: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if weight is None:
        return torch.ones(like.shape[0], dtype=like.dtype, device=like.device)
    weight = torch.as_tensor(weight, dtype=like.dtype, device=like.device)
    if weight.shape != (like.shape[0],):
        raise ValueError(f"weight must have shape ({like.shape[0]},) (one per sample), got {tuple(weight.shape)}")
    return weight


def _call(fn: EpsFn, name: str, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    out = fn(x_t, t)
    if not isinstance(out, torch.Tensor) or out.shape != x_t.shape:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{name} must return an ε-prediction shaped like x_t {tuple(x_t.shape)}, got {shape}")
    return out
