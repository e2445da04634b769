"""SD3 / SD3.5 (MMDiT) as DI* sees it, at the network level: the rectified-flow path with SD3's static time shift
(3.0 for SD3.5), the transformer's time argument σ·1000, true CFG whose negative branch is the encoded empty prompt
(not zeros, as SDXL's is), the joint blocks, and LoRA on both streams' projections (METHOD.md §9).

Its text encoders (CLIP-L, CLIP-G, T5-XXL), loaders, tiny pipeline, export and presets are not here yet: the
family is not listed in `distar.backbones` until they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distar.backbones import shared
from distar.backbones.flow import FlowBackbone

SD35_SHIFT = 3.0


@dataclass
class SD3Conditioning:
    """What an SD3 transformer is conditioned on, for B prompts, with the empty prompt's encoding for CFG."""

    prompt_embeds: torch.Tensor  # (B, L, joint_attention_dim): CLIP-L ‖ CLIP-G (padded) then T5, along L
    pooled_prompt_embeds: torch.Tensor  # (B, 2048): CLIP-L and CLIP-G pooled, concatenated
    null_prompt_embeds: torch.Tensor  # (1, L, joint_attention_dim): the empty prompt, encoded the same way
    null_pooled_prompt_embeds: torch.Tensor  # (1, 2048)

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]

    def null(self) -> SD3Conditioning:
        """The negative branch of SD3's CFG: the empty prompt's encoding for every sample."""
        n = self.batch_size
        embeds = self.null_prompt_embeds.expand(n, *self.null_prompt_embeds.shape[1:])
        pooled = self.null_pooled_prompt_embeds.expand(n, *self.null_pooled_prompt_embeds.shape[1:])
        return SD3Conditioning(embeds, pooled, self.null_prompt_embeds, self.null_pooled_prompt_embeds)

    def cat(self, other: SD3Conditioning) -> SD3Conditioning:
        return SD3Conditioning(
            torch.cat([self.prompt_embeds, other.prompt_embeds]),
            torch.cat([self.pooled_prompt_embeds, other.pooled_prompt_embeds]),
            self.null_prompt_embeds,
            self.null_pooled_prompt_embeds,
        )

    def to(self, device=None, dtype=None) -> SD3Conditioning:
        return SD3Conditioning(
            *(x.to(device, dtype) for x in (self.prompt_embeds, self.pooled_prompt_embeds)),
            *(x.to(device, dtype) for x in (self.null_prompt_embeds, self.null_pooled_prompt_embeds)),
        )


class SD3(FlowBackbone):
    """SD3 / SD3.5: flow path with a static shift, velocity prediction, true CFG, one step at σ = 1."""

    name = "sd3"
    guidance = "cfg"
    time_scale = 1000.0
    pipeline_name = "StableDiffusion3Pipeline"
    block_pattern = r"transformer_blocks\.\d+"

    def __init__(self, shift: float = SD35_SHIFT):
        super().__init__(shift)

    def velocity(self, net, x_t, t, cond: SD3Conditioning, guidance=None):
        if guidance is not None:
            raise ValueError("SD3 has no embedded guidance: its reference takes true CFG (two branches)")
        dtype = shared.base(net).compute_dtype()
        cond = cond.to(x_t.device, dtype)
        out = net(
            hidden_states=x_t.to(dtype),
            timestep=self._schedule.model_time(t).to(x_t.device, dtype),
            encoder_hidden_states=cond.prompt_embeds,
            pooled_projections=cond.pooled_prompt_embeds,
        ).sample
        return out.to(x_t.dtype)

    def blocks(self, net):
        return [(net.transformer_blocks, i) for i in range(len(net.transformer_blocks))]


def tiny_transformer_config() -> dict:
    """A tiny SD3Transformer2DModel: 16 latent channels as SD3's VAE has, two joint blocks."""
    return dict(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=24,
        pos_embed_max_size=16,
    )
