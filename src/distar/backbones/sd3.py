"""SD3 / SD3.5 (MMDiT) as DI* sees it, at the network level: the rectified-flow path with SD3's static time shift
(3.0 for SD3.5), the transformer's time argument σ·1000, true CFG whose negative branch is the encoded empty prompt
(not zeros, as SDXL's is), the joint blocks, and LoRA on both streams' projections (METHOD.md §9).

Also here: the text encoders (CLIP-L, CLIP-G, T5-XXL through diffusers' own encode_prompt), the tiny family
(`tiny:sd3`), and what export and evaluate need beyond `flow.FlowBackbone` (model.backbone = "sd3").
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from distar.backbones import shared
from distar.backbones.base import encode_rows
from distar.backbones.flow import FlowBackbone, flow_vae_config, tiny_t5_tokenizer
from distar.sources import parse_dtype, resolve_dir
from distar.tiny_text import TINY_TEXT_HIDDEN, tiny_clip_tokenizer, tiny_text_config

SD35_SHIFT = 3.0
SD35_MEDIUM = "stabilityai/stable-diffusion-3.5-medium"
SD35_MEDIUM_CONFIG = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)  # fmt: skip
"""SD3.5-Medium's transformer (its transformer/config.json): 2,243,171,520 parameters."""
SD35_LARGE_CONFIG = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
    num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
    pos_embed_max_size=192, qk_norm="rms_norm",
)  # fmt: skip
"""SD3.5-Large's transformer: 8,056,627,520 parameters."""
SD3_VAE_CONFIG = flow_vae_config(1.5305, 0.0609)
"""SD3 / SD3.5's VAE (its vae/config.json): 16 latent channels, 8× downsampling."""
T5_MAX_LENGTH = 256
"""T5 tokens SD3's pipeline reads by default (its `max_sequence_length`); the joint sequence is 77 + 256."""


def t5_length(pipe) -> int:
    """The T5 tokens a pipeline's prompts are padded to: SD3's 256, or fewer where its T5 tokenizer reads fewer
    (`model_max_length`: the digits lab's 32-character prompts). Training and sampling both use it."""
    tokenizer = getattr(pipe, "tokenizer_3", None)
    return min(T5_MAX_LENGTH, int(tokenizer.model_max_length)) if tokenizer is not None else T5_MAX_LENGTH


TINY_JOINT = 64
TINY_VAE_CONFIG = flow_vae_config(1.5305, 0.0609, tiny=True)
"""SD3's VAE in miniature: 16 latent channels, its scaling and shift, no quant convolutions; one downsampling."""


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
    text_encoder_parameters = 5_580_620_800  # CLIP-L 123,650,304 + CLIP-G 694,659,840 + T5-XXL's encoder 4,762,310,656
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

    def prompt_encoder(self, source, dtype="fp32", cache: bool = False, **resolve_kwargs) -> PromptEncoder:
        return PromptEncoder.from_pretrained(source, dtype=dtype, cache=cache, **resolve_kwargs)

    # what the trainer, export and evaluate ask of a family (the rest: FlowBackbone)

    max_prompt_tokens = 77  # the CLIP encoders' limit (T5 reads up to T5_MAX_LENGTH)
    latent_multiple = 2  # the transformer's patch size
    tiny_dir = "sd3"
    net_class_name = "SD3Transformer2DModel"
    pipeline_parts = ("tokenizer", "tokenizer_2", "tokenizer_3", "text_encoder", "text_encoder_2", "text_encoder_3",
                      "transformer")  # fmt: skip

    def build_tiny(self, root: Path, seed: int = 0) -> None:
        build_tiny_sd3(root / self.tiny_dir, seed=seed)

    def architectures(self) -> dict[str, tuple[dict, dict]]:
        """(transformer config, VAE config) of the shapes `distar plan` builds."""
        return {
            "tiny": (tiny_transformer_config(), dict(TINY_VAE_CONFIG)),
            "sd35m": (dict(SD35_MEDIUM_CONFIG), dict(SD3_VAE_CONFIG)),
            "sd35l": (dict(SD35_LARGE_CONFIG), dict(SD3_VAE_CONFIG)),
        }

    def shape_conditioning(self, batch: int, height: int, width: int, config: dict, device) -> SD3Conditioning:
        """Zeros of the encoders' shapes: 77 CLIP tokens then T5_MAX_LENGTH T5 tokens, the pooled pair."""
        tokens, width_, pooled = 77 + T5_MAX_LENGTH, config["joint_attention_dim"], config["pooled_projection_dim"]
        zeros = [torch.zeros(n, *s, device=device) for n, s in ((batch, (tokens, width_)), (batch, (pooled,)),
                                                                (1, (tokens, width_)), (1, (pooled,)))]  # fmt: skip
        return SD3Conditioning(*zeros)

    def cache_items(self) -> list[tuple[str, list[str] | None]]:
        return [(SD35_MEDIUM, None)]

    def pipeline_text_kwargs(self, pipe) -> dict:
        return {"max_sequence_length": t5_length(pipe)}

    def pipeline_latent_shape(self, pipe) -> tuple[int, int, int]:
        side = pipe.transformer.config.sample_size
        return pipe.transformer.config.in_channels, side, side

    def usage(self, t_star) -> dict:
        return {
            "tags": ["diff-instruct-star", "one-step", "sd3"],
            "title": "One-step SD3 generator post-trained with Diff-Instruct* (DI*)",
            "code": [
                "import torch",
                "from diffusers import StableDiffusion3Pipeline",
                "",
                'pipe = StableDiffusion3Pipeline.from_pretrained("PATH", torch_dtype=torch.bfloat16).to("cuda")',
                'image = pipe("a photo of a cat", num_inference_steps=1, guidance_scale=1.0).images[0]',
            ],
            "how": "One Euler step from pure noise (σ = 1), no CFG (guidance_scale 1).",
            "ema": f'`SD3Transformer2DModel.from_pretrained("PATH", subfolder="{self.ema_part}")`',
        }


def tiny_transformer_config() -> dict:
    """A tiny SD3Transformer2DModel: 16 latent channels as SD3's VAE has, two joint blocks, the tiny text encoders'
    widths (two CLIP towers of 32, pooled 64; T5 of 64)."""
    return dict(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=TINY_JOINT,
        caption_projection_dim=16,
        pooled_projection_dim=2 * TINY_TEXT_HIDDEN,
        pos_embed_max_size=16,
    )


class PromptEncoder(nn.Module):
    """SD3's three text encoders, frozen, through diffusers' own `StableDiffusion3Pipeline.encode_prompt` (CLIP-L
    and CLIP-G penultimate states side by side, zero-padded to T5's width, then T5 along the sequence; the pooled
    outputs concatenated), with the empty prompt's encoding as the negative branch."""

    def __init__(self, pipe, max_sequence_length: int | None = None, cache: bool = False):
        super().__init__()
        self.pipe, self.max_sequence_length = pipe, max_sequence_length or t5_length(pipe)
        self.encoders = nn.ModuleList([e for e in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3) if e])
        self.requires_grad_(False).eval()
        self._null: tuple[torch.Tensor, torch.Tensor] | None = None
        self._cache: dict | None = {} if cache else None

    @classmethod
    def from_pretrained(cls, source, dtype="fp32", cache: bool = False, **resolve_kwargs) -> PromptEncoder:
        from diffusers import StableDiffusion3Pipeline

        root = resolve_dir(source, **resolve_kwargs)
        pipe = StableDiffusion3Pipeline.from_pretrained(root, transformer=None, vae=None, dtype=parse_dtype(dtype))
        return cls(pipe, cache=cache)

    @property
    def device(self) -> torch.device:
        return next(self.encoders[0].parameters()).device

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompts, None, None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )  # fmt: skip
        return embeds, pooled

    def encode(self, prompts: Sequence[str], height: int, width: int) -> SD3Conditioning:
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a non-empty list of strings")
        if self._null is None:
            self._null = self._encode([""])
        embeds, pooled = encode_rows(self._cache, prompts, self._encode, self.device)
        return SD3Conditioning(embeds, pooled, *self._null)


def build_tiny_sd3(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """A complete tiny StableDiffusion3Pipeline directory (hub layout: the classes and on-disk layout of
    stabilityai/stable-diffusion-3.5-medium), so the real loaders read it: two tiny CLIP towers with projection, a
    tiny T5 encoder with a character-level tokenizer, a 16-channel VAE with SD3's scaling and shift, the tiny
    transformer and FlowMatchEulerDiscreteScheduler with SD3.5's shift."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    out = Path(out_dir)
    tokenizer = tiny_clip_tokenizer()
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    t5_tokenizer = tiny_t5_tokenizer(T5_MAX_LENGTH)
    torch.manual_seed(seed)
    config = tiny_text_config(len(tokenizer), bos, eos, True)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=TINY_JOINT, d_kv=16, d_ff=96, num_layers=2,
                                 num_heads=4, pad_token_id=0, eos_token_id=1))  # fmt: skip
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**tiny_transformer_config()),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SD35_SHIFT),
        vae=AutoencoderKL(**TINY_VAE_CONFIG),
        text_encoder=CLIPTextModelWithProjection(config),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(config),
        tokenizer_2=tokenizer,
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer,
    )
    pipe.save_pretrained(out)
    return out
