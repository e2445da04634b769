"""FLUX.1 as DI* sees it, at the network level: the rectified-flow path, the transformer's time argument σ (it
scales by 1000 inside), latents packed 2×2 into tokens around each call (the trainer keeps them (B, 16, H, W)),
positional ids, and guidance *embedded* in the network (FLUX.1-dev is guidance-distilled): the reference is one
call at g = α_cfg, with no unconditional branch, so CFG outside the divergence (DI*-OUT) has nothing to act on
and is refused (METHOD.md §9). A network without a guidance embedding (FLUX.1-schnell) serves as a generator
start only. Double- and single-stream blocks.

Its text encoders (CLIP-L pooled, T5-XXL), loaders, resolution-dependent shift, tiny pipeline, export and presets
are not here yet: the family is not listed in `distar.backbones` until they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distar.backbones import shared
from distar.backbones.flow import FlowBackbone

ASSISTANT_GUIDANCE = 1.0
"""The embedded guidance a guidance-distilled network runs at when it is not the reference (the assistant learns
the generator's conditional velocity: no guidance)."""


@dataclass
class FluxConditioning:
    """What a FLUX transformer is conditioned on, for B prompts."""

    prompt_embeds: torch.Tensor  # (B, L, 4096): T5-XXL hidden states
    pooled_prompt_embeds: torch.Tensor  # (B, 768): CLIP-L pooled

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]

    def null(self) -> FluxConditioning:
        raise ValueError(
            "FLUX.1's reference is guidance-distilled: it has no unconditional branch, so CFG acts through its "
            'embedded guidance inside the divergence (loss.cfg = "divergence"); loss.cfg = "reward" (DI*-OUT) '
            "needs a true-CFG reference such as SD3.5"
        )

    def cat(self, other: FluxConditioning) -> FluxConditioning:
        return FluxConditioning(
            torch.cat([self.prompt_embeds, other.prompt_embeds]),
            torch.cat([self.pooled_prompt_embeds, other.pooled_prompt_embeds]),
        )

    def to(self, device=None, dtype=None) -> FluxConditioning:
        return FluxConditioning(self.prompt_embeds.to(device, dtype), self.pooled_prompt_embeds.to(device, dtype))


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H/2·W/2, 4C): 2×2 patches as tokens, in FluxPipeline's order."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack` for latents of height × width."""
    b, _, d = tokens.shape
    x = tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def image_ids(height: int, width: int, device=None, dtype=None) -> torch.Tensor:
    """(H/2·W/2, 3): each token's (0, row, column), as FluxPipeline makes them."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device, dtype)


class Flux(FlowBackbone):
    """FLUX.1: flow path, velocity prediction on packed latents, embedded guidance, one step at σ = 1."""

    name = "flux"
    guidance = "embedded"
    time_scale = 1.0
    pipeline_name = "FluxPipeline"
    block_pattern = r"(?:single_)?transformer_blocks\.\d+"

    def velocity(self, net, x_t, t, cond: FluxConditioning, guidance=None):
        dtype = shared.base(net).compute_dtype()
        cond = cond.to(x_t.device, dtype)
        b, _, h, w = x_t.shape
        embedded = None
        if net.config.guidance_embeds:
            g = ASSISTANT_GUIDANCE if guidance is None else float(guidance)
            embedded = torch.full((b,), g, device=x_t.device, dtype=dtype)
        elif guidance is not None and float(guidance) != 1.0:
            raise ValueError(
                f"this FLUX network has no guidance embedding (FLUX.1-schnell?): it cannot run at {guidance}"
            )
        out = net(
            hidden_states=pack(x_t.to(dtype)),
            timestep=self._schedule.model_time(t).to(x_t.device, dtype),
            guidance=embedded,
            pooled_projections=cond.pooled_prompt_embeds,
            encoder_hidden_states=cond.prompt_embeds,
            txt_ids=torch.zeros(cond.prompt_embeds.shape[1], 3, device=x_t.device, dtype=dtype),
            img_ids=image_ids(h, w, x_t.device, dtype),
        ).sample
        return unpack(out, h, w).to(x_t.dtype)

    def blocks(self, net):
        return [(net.transformer_blocks, i) for i in range(len(net.transformer_blocks))] + [
            (net.single_transformer_blocks, i) for i in range(len(net.single_transformer_blocks))
        ]


def tiny_transformer_config(guidance_embeds: bool = True) -> dict:
    """A tiny FluxTransformer2DModel on 16-channel latents packed 2×2 (64 inputs per token); with the guidance
    embedding as FLUX.1-dev has it, without as FLUX.1-schnell."""
    return dict(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=24,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    )
