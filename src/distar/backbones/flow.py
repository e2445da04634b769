"""What the flow-matching transformers (SD3 / SD3.5, FLUX.1) share as DI* sees them: the rectified-flow path
(`diffusion.FlowSchedule`), a velocity network turned into the ε-prediction the losses take, and the one-step
generator from pure noise at σ = 1 (METHOD.md §9).

A flow network predicts v̂ ≈ ε − x0 at x_σ = (1 − σ)·x0 + σ·ε; ε̂ = x_σ + (1 − σ)·v̂. CFG combines ε̂ exactly as it
combines v̂ (ε̂ is affine in v̂ with the same x_σ term), so the losses' `cfg` serves both. The one step is
x0 = z − σ*·v̂_θ(z, σ*, c) with σ* = 1 by default: pure noise lies on the path only there (unlike VP's t* = 399).
"""

from __future__ import annotations

import torch

from distar.backbones.base import Backbone
from distar.diffusion import FlowSchedule

TIMESTEP_UNITS = 1000
"""A config names flow times as diffusers numbers FlowMatch timesteps: σ·1000 (loss.t_min = 20 is σ = 0.02,
model.t_star = 1000 is σ = 1), so one set of keys serves every family."""


class FlowBackbone(Backbone):
    """The flow path's schedule, conversion and one step; subclasses say how their network is called (`velocity`)."""

    prediction = "flow"
    default_t_star = TIMESTEP_UNITS
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    """Every attention projection of both streams: the image stream's and the context stream's (add_*)."""
    time_scale: float
    """The network's time argument per unit σ."""

    def __init__(self, shift: float = 1.0):
        self._schedule = FlowSchedule(shift=shift, time_scale=self.time_scale)

    def schedule(self) -> FlowSchedule:
        return self._schedule

    def to_eps(self, output, x_t, t):
        return self._schedule.velocity_to_eps(x_t, output, t)

    def velocity(self, net, x_t, t, cond, guidance: float | None = None) -> torch.Tensor:
        """v̂(x_t, σ, c) of `net` in x_t's dtype and layout (B, C, H, W)."""
        raise NotImplementedError

    def forward(self, net, x_t, t, cond, guidance: float | None = None):
        return self.to_eps(self.velocity(net, x_t, t, cond, guidance), x_t, t)

    def check_t_star(self, t_star) -> float:
        """t* in timestep units (σ*·1000; 1000: from pure noise) → σ*."""
        sigma = float(t_star) / TIMESTEP_UNITS
        if not 0 < sigma <= 1:
            raise ValueError(
                f"t_star = {t_star} is σ* = {sigma:g}: the one step starts from noise, 0 < t_star ≤ {TIMESTEP_UNITS} "
                f"(σ·{TIMESTEP_UNITS}; {TIMESTEP_UNITS} = pure noise)"
            )
        return sigma

    def config_times(self, lo, hi):
        return lo / TIMESTEP_UNITS, hi / TIMESTEP_UNITS

    def one_step(self, net, z, cond, t_star):
        sigma = torch.full((z.shape[0],), float(t_star), device=z.device, dtype=torch.float32)
        return self._schedule.one_step_x0(z, self.velocity(net, z, sigma, cond), sigma)
