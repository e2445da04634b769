"""FLUX.1 as DI* sees it, at the network level: the rectified-flow path, the transformer's time argument σ (it
scales by 1000 inside), latents packed 2×2 into tokens around each call (the trainer keeps them (B, 16, H, W)),
positional ids, and guidance *embedded* in the network (FLUX.1-dev is guidance-distilled): the reference is one
call at g = α_cfg, with no unconditional branch, so CFG outside the divergence (DI*-OUT) has nothing to act on
and is refused (METHOD.md §9). A network without a guidance embedding (FLUX.1-schnell) serves as a generator
start only. Double- and single-stream blocks.

Also here: the text encoders (CLIP-L pooled, T5-XXL through diffusers' own encode_prompt), the resolution-dependent
shift as a static one, the tiny family (`tiny:flux`, `tiny:flux-schnell`), and what export and evaluate need
beyond `flow.FlowBackbone` (model.backbone = "flux"). Training draws σ without FLUX's shift unless
loss.sigma_shift asks for it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from distar.backbones import shared
from distar.backbones.base import encode_rows
from distar.backbones.flow import FlowBackbone, flow_vae_config, tiny_t5_tokenizer
from distar.tiny_text import TINY_TEXT_HIDDEN, tiny_clip_tokenizer, tiny_text_config

FLUX1_DEV = "black-forest-labs/FLUX.1-dev"
FLUX1_SCHNELL = "black-forest-labs/FLUX.1-schnell"
FLUX1_CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)  # fmt: skip
"""FLUX.1-dev's transformer (its transformer/config.json): 11,901,408,320 parameters; schnell's is the same
without the guidance embedding."""
FLUX_VAE_CONFIG = flow_vae_config(0.3611, 0.1159)
"""FLUX.1's VAE (its vae/config.json): SD3's shape with its own scaling and shift."""
T5_MAX_LENGTH = 512
"""T5 tokens FLUX.1-dev's pipeline reads by default (schnell: 256)."""
TINY_JOINT = 32
TINY_VAE_CONFIG = flow_vae_config(0.3611, 0.1159, tiny=True)
"""FLUX's VAE in miniature: 16 latent channels, its scaling and shift, no quant convolutions; one downsampling."""

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
    text_encoder_parameters = 4_885_371_136  # CLIP-L 123,060,480 + T5-XXL's encoder 4,762,310,656
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

    def model_shift(self, latent_height: int, latent_width: int) -> float:
        return self.shift_for(latent_height, latent_width)

    @staticmethod
    def shift_for(height: int, width: int, scheduler_config: dict | None = None) -> float:
        """FLUX's resolution-dependent time shift for latents of height × width, as the static shift it equals:
        exp(μ), μ linear in the number of 2×2 tokens from (256, 0.5) to (4096, 1.15) (the scheduler's config)."""
        c = scheduler_config or {}
        lo_n, hi_n = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
        lo_mu, hi_mu = c.get("base_shift", 0.5), c.get("max_shift", 1.15)
        tokens = (height // 2) * (width // 2)
        return math.exp(lo_mu + (hi_mu - lo_mu) * (tokens - lo_n) / (hi_n - lo_n))

    def prompt_encoder(self, source, dtype="fp32", cache: bool = False, **resolve_kwargs) -> PromptEncoder:
        return PromptEncoder.from_pretrained(source, dtype=dtype, cache=cache, **resolve_kwargs)

    # what the trainer, export and evaluate ask of a family (the rest: FlowBackbone)

    max_prompt_tokens = 77  # CLIP-L's limit (T5 reads up to T5_MAX_LENGTH)
    latent_multiple = 2  # latents are packed 2×2 into tokens
    tiny_dir = "flux"
    net_class_name = "FluxTransformer2DModel"
    pipeline_parts = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "transformer")

    def build_tiny(self, root: Path, seed: int = 0) -> None:
        """`tiny:flux` (dev's kind, the reference) and `tiny:flux-schnell` (no guidance embedding: the generator's
        start, another seed)."""
        build_tiny_flux(root / self.tiny_dir, seed=seed)
        build_tiny_flux(root / f"{self.tiny_dir}-schnell", seed=seed + 1, guidance_embeds=False)

    def cache_items(self) -> list[tuple[str, list[str] | None]]:
        return [(FLUX1_DEV, None), (FLUX1_SCHNELL, None)]

    def architectures(self) -> dict[str, tuple[dict, dict]]:
        """(transformer config, VAE config) of the shapes `distar plan` builds."""
        return {
            "tiny": (tiny_transformer_config(), dict(TINY_VAE_CONFIG)),
            "flux": (dict(FLUX1_CONFIG), dict(FLUX_VAE_CONFIG)),
        }

    def shape_conditioning(self, batch: int, height: int, width: int, config: dict, device) -> FluxConditioning:
        """Zeros of the encoders' shapes: T5_MAX_LENGTH T5 tokens and CLIP-L's pooled output."""
        return FluxConditioning(
            torch.zeros(batch, T5_MAX_LENGTH, config["joint_attention_dim"], device=device),
            torch.zeros(batch, config["pooled_projection_dim"], device=device),
        )

    def latent_channels(self, config: dict) -> int:
        return int(config["in_channels"]) // 4  # 2×2 patches of the VAE's channels per token

    def generator_config(self, reference_config: dict, weights: dict[str, torch.Tensor]) -> dict:
        """The reference's config without the guidance embedding when the generator has none (a schnell start
        under a dev reference)."""
        return {**reference_config, "guidance_embeds": any(".guidance_embedder." in f".{k}" for k in weights)}

    def pipeline_latent_shape(self, pipe) -> tuple[int, int, int]:
        side = pipe.default_sample_size  # FluxPipeline's default image is default_sample_size · vae_scale_factor
        return self.latent_channels(dict(pipe.transformer.config)), side, side

    def pipeline_latents(self, pipe, latents: torch.Tensor) -> dict:
        scale = pipe.vae_scale_factor
        return {"latents": pack(latents), "height": latents.shape[-2] * scale, "width": latents.shape[-1] * scale}

    def usage(self, t_star) -> dict:
        return {
            "tags": ["diff-instruct-star", "one-step", "flux"],
            "title": "One-step FLUX.1 generator post-trained with Diff-Instruct* (DI*)",
            "code": [
                "import torch",
                "from diffusers import FluxPipeline",
                "",
                'pipe = FluxPipeline.from_pretrained("PATH", torch_dtype=torch.bfloat16).to("cuda")',
                'image = pipe("a photo of a cat", num_inference_steps=1, guidance_scale=1.0).images[0]',
            ],
            "how": "One Euler step from pure noise (σ = 1). Licences: a FLUX.1-dev reference is non-commercial; "
            "FLUX.1-schnell is Apache-2.0.",
            "ema": f'`FluxTransformer2DModel.from_pretrained("PATH", subfolder="{self.ema_part}")`',
        }


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
        joint_attention_dim=TINY_JOINT,
        pooled_projection_dim=TINY_TEXT_HIDDEN,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    )


class PromptEncoder(nn.Module):
    """FLUX.1's two text encoders, frozen, through diffusers' own `FluxPipeline.encode_prompt` (T5 hidden states
    and CLIP-L's pooled output)."""

    def __init__(self, pipe, max_sequence_length: int = T5_MAX_LENGTH, cache: bool = False):
        super().__init__()
        self.pipe, self.max_sequence_length = pipe, max_sequence_length
        self.encoders = nn.ModuleList([pipe.text_encoder, pipe.text_encoder_2])
        self.requires_grad_(False).eval()
        self._cache: dict | None = {} if cache else None

    @classmethod
    def from_pretrained(cls, source, dtype="fp32", cache: bool = False, **resolve_kwargs) -> PromptEncoder:
        from diffusers import FluxPipeline

        from distar.sources import parse_dtype, resolve_dir

        root = resolve_dir(source, **resolve_kwargs)
        pipe = FluxPipeline.from_pretrained(root, transformer=None, vae=None, dtype=parse_dtype(dtype))
        return cls(pipe, cache=cache)

    @property
    def device(self) -> torch.device:
        return next(self.encoders[0].parameters()).device

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], height: int, width: int) -> FluxConditioning:
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a non-empty list of strings")
        embeds, pooled = encode_rows(self._cache, prompts, self._encode, self.device)
        return FluxConditioning(embeds, pooled)

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompts, None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return embeds, pooled


def build_tiny_flux(out_dir: str | os.PathLike, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """A complete tiny FluxPipeline directory (hub layout: the classes and on-disk layout of FLUX.1-dev, or of
    FLUX.1-schnell without the guidance embedding), so the real loaders read it: a tiny CLIP text tower, a tiny T5
    with a character-level tokenizer, a 16-channel VAE with FLUX's scaling and shift, the tiny transformer and
    FlowMatchEulerDiscreteScheduler with FLUX's resolution-dependent shift."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    out = Path(out_dir)
    tokenizer = tiny_clip_tokenizer()
    t5_tokenizer = tiny_t5_tokenizer(T5_MAX_LENGTH)
    torch.manual_seed(seed)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=TINY_JOINT, d_kv=8, d_ff=48, num_layers=2,
                                 num_heads=4, pad_token_id=0, eos_token_id=1))  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )  # fmt: skip
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=AutoencoderKL(**TINY_VAE_CONFIG),
        text_encoder=CLIPTextModel(
            tiny_text_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, False)
        ),  # fmt: skip
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=FluxTransformer2DModel(**tiny_transformer_config(guidance_embeds)),
    )
    pipe.save_pretrained(out)
    return out
