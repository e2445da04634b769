"""SDXL as a DI* backbone: the VP schedule with integer timesteps, ε-prediction, two CLIP text encoders, the UNet,
its VAE, loaders, the tiny family, and the diffusers pipeline export writes and evaluate samples with.

Conventions (METHOD.md §2): SDXL-base's VP schedule (1000 steps, scaled-linear betas 0.00085 → 0.012), ε-prediction,
prompt embeddings = penultimate hidden states of CLIP-L and OpenCLIP-bigG concatenated, pooled embedding from the
second (with projection), add_time_ids = [H, W, 0, 0, H, W]; the unconditional branch uses zero text and pooled
embeddings; the one-step generator reads noise as x_{t*} at t* = 399 (DMD2). Models know nothing of parallelism.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from distar.backbones import shared
from distar.backbones.base import Backbone, encode_rows
from distar.backbones.files import DIFFUSERS_WEIGHTS, locate, requirements, variant
from distar.backbones.latents import decode, encode
from distar.diffusion import VPSchedule
from distar.errors import UserError
from distar.sources import parse, parse_dtype, read_state_dict, require_files, resolve_dir, resolve_file
from distar.tiny_text import TINY_MAX_LENGTH, TINY_TEXT_HIDDEN, tiny_clip_tokenizer, tiny_text_config

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_VAE_FP16_FIX = "madebyollin/sdxl-vae-fp16-fix"
DMD2_REPO = "tianweiy/DMD2"
DMD2_UNET_1STEP = "dmd2_sdxl_1step_unet_fp16.bin"

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012
GENERATOR_TIMESTEP = 399
"""DMD2's one-step convention: noise is read as x_{t*} at t* = 399."""

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the structural keys): 2,567,463,684 parameters.
SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, use_linear_projection=True,
)  # fmt: skip

# stabilityai/stable-diffusion-xl-base-1.0 vae/config.json (the structural keys): 83,653,863 parameters.
SDXL_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=4, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025,
)  # fmt: skip

TINY_TIME_EMBED_DIM = 8

TINY_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
    norm_num_groups=16, sample_size=64, scaling_factor=0.13025,
)  # fmt: skip


def tiny_unet_config() -> dict:
    """The SDXL UNet's structure in miniature: two levels, text_time micro-conditioning, cross-attention width 64."""
    return dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        cross_attention_dim=2 * TINY_TEXT_HIDDEN,
        norm_num_groups=32,
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TINY_TIME_EMBED_DIM + TINY_TEXT_HIDDEN,
        use_linear_projection=True,
    )


def medium_configs() -> tuple[dict, dict]:
    """A CPU-sized SDXL shape: three resolution levels, SDXL's block types and depths scaled down (31M parameters
    per UNet), the tiny preset's text width, and a three-level VAE."""
    unet = dict(
        SDXL_UNET_CONFIG,
        sample_size=32,
        block_out_channels=(64, 128, 256),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 8),
        cross_attention_dim=2 * TINY_TEXT_HIDDEN,
        addition_time_embed_dim=TINY_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TINY_TIME_EMBED_DIM + TINY_TEXT_HIDDEN,
    )
    vae = dict(
        SDXL_VAE_CONFIG,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        sample_size=128,
    )
    return unet, vae


def schedule() -> VPSchedule:
    """SDXL-base / DMD2: 1000 steps, "scaled_linear" betas from 0.00085 to 0.012."""
    return VPSchedule.scaled_linear(NUM_TRAIN_TIMESTEPS, BETA_START, BETA_END)


# -- files --------------------------------------------------------------------------------------------

PIPELINE_PARTS = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "unet")
"""The parts of a pipeline directory that export copies besides the VAE (which may come from elsewhere)."""


def load_unet(source: str | os.PathLike, dtype: str | torch.dtype = "fp32", **resolve_kwargs):
    from diffusers import UNet2DConditionModel

    root = locate(source, ["unet"], **resolve_kwargs)
    return UNet2DConditionModel.from_pretrained(
        root, subfolder="unet", dtype=parse_dtype(dtype), variant=variant(root, "unet")
    )


def load_vae(source: str | os.PathLike, dtype: str | torch.dtype = "fp32", **resolve_kwargs):
    """The VAE of an SDXL pipeline directory, or a standalone VAE repository (e.g. the fp16-fix VAE)."""
    from diffusers import AutoencoderKL

    root = resolve_dir(source, **resolve_kwargs)
    subfolder = "vae" if (root / "vae").is_dir() else None
    part = "vae" if subfolder else "."
    require_files(root, {"vae": [[f"{part}/config.json"], [f"{part}/{w}" for w in DIFFUSERS_WEIGHTS]]})
    weights_variant = variant(root, part)
    return AutoencoderKL.from_pretrained(root, subfolder=subfolder, dtype=parse_dtype(dtype), variant=weights_variant)


def load_generator_init(init: str, reference: str | os.PathLike, reference_unet=None, revision=None, **resolve_kwargs):
    """The generator's initial UNet (fp32) as `model.generator_init` names it: "reference" (a copy of
    `reference_unet`, or of the reference's UNet loaded here), a raw SDXL-UNet state dict file (DMD2's layout, in
    the reference's architecture), or a diffusers UNet or pipeline source."""
    if init == "reference":
        if reference_unet is None:
            return load_unet(reference, dtype="fp32", revision=revision, **resolve_kwargs)
        return copy.deepcopy(reference_unet).float()
    if parse(init).is_file:
        return load_dmd2_unet(init, reference, dtype="fp32", revision=revision, **resolve_kwargs)
    return load_unet(init, dtype="fp32", **resolve_kwargs)


def load_dmd2_unet(weights: str | os.PathLike, base: str | os.PathLike, dtype="fp32", **resolve_kwargs):
    """The generator's initial UNet: DMD2's raw state dict (.bin or .safetensors, SDXL-UNet layout) in the
    architecture of `base`'s UNet config. A key or shape mismatch fails naming the file and the first keys."""
    from diffusers import UNet2DConditionModel

    root = locate(base, ["unet"], **resolve_kwargs)
    state = read_state_dict(resolve_file(weights, **resolve_kwargs))
    config = UNet2DConditionModel.load_config(root, subfolder="unet")
    unet = UNet2DConditionModel.from_config(config)
    expected = unet.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise UserError(
            f"{str(weights)!r} is not an SDXL-UNet state dict for {str(base)!r}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}), {len(wrong)} of another shape (e.g. {wrong[:3]}); "
            f"pass DMD2's UNet file ({DMD2_UNET_1STEP})"
        )
    unet.load_state_dict(state)
    return unet.to(parse_dtype(dtype))


# -- conditioning -------------------------------------------------------------------------------


@dataclass
class SDXLConditioning:
    """What an SDXL UNet is conditioned on, for a batch of B prompts."""

    prompt_embeds: torch.Tensor  # (B, 77, D1 + D2): penultimate hidden states of both encoders
    pooled_prompt_embeds: torch.Tensor  # (B, P): projected pooled output of the second encoder
    add_time_ids: torch.Tensor  # (B, 6): [H, W, 0, 0, H, W]

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]

    def null(self) -> SDXLConditioning:
        """The unconditional branch: zero text and pooled embeddings, the same micro-conditioning."""
        return SDXLConditioning(
            torch.zeros_like(self.prompt_embeds), torch.zeros_like(self.pooled_prompt_embeds), self.add_time_ids
        )

    def cat(self, other: SDXLConditioning) -> SDXLConditioning:
        return SDXLConditioning(
            torch.cat([self.prompt_embeds, other.prompt_embeds]),
            torch.cat([self.pooled_prompt_embeds, other.pooled_prompt_embeds]),
            torch.cat([self.add_time_ids, other.add_time_ids]),
        )

    def to(self, device=None, dtype=None) -> SDXLConditioning:
        return SDXLConditioning(
            self.prompt_embeds.to(device, dtype),
            self.pooled_prompt_embeds.to(device, dtype),
            self.add_time_ids.to(device, dtype),
        )

    def unet_kwargs(self) -> dict:
        return {
            "encoder_hidden_states": self.prompt_embeds,
            "added_cond_kwargs": {"text_embeds": self.pooled_prompt_embeds, "time_ids": self.add_time_ids},
        }


def add_time_ids(batch_size: int, height: int, width: int) -> torch.Tensor:
    """SDXL micro-conditioning: original size (H, W), crop top-left (0, 0), target size (H, W), in pixels."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(batch_size, 1)


class PromptEncoder(nn.Module):
    """Both SDXL text encoders, frozen; `encode` can keep its results for prompts it has seen (cache=True)."""

    def __init__(self, tokenizer, tokenizer_2, text_encoder, text_encoder_2, cache: bool = False):
        super().__init__()
        self.tokenizers = [tokenizer, tokenizer_2]
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.requires_grad_(False).eval()
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = {} if cache else None

    @classmethod
    def from_pretrained(cls, source, dtype="fp32", cache: bool = False, **resolve_kwargs) -> PromptEncoder:
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        root = locate(source, ["tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"], **resolve_kwargs)
        dtype = parse_dtype(dtype)
        return cls(
            AutoTokenizer.from_pretrained(root, subfolder="tokenizer"),
            AutoTokenizer.from_pretrained(root, subfolder="tokenizer_2"),
            CLIPTextModel.from_pretrained(root, subfolder="text_encoder", dtype=dtype),
            CLIPTextModelWithProjection.from_pretrained(root, subfolder="text_encoder_2", dtype=dtype),
            cache=cache,
        )

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, (self.text_encoder, self.text_encoder_2), strict=True):
            ids = tokenizer(
                prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out.text_embeds if hasattr(out, "text_embeds") else None
        return torch.cat(hidden, dim=-1), pooled

    def encode(self, prompts: Sequence[str], height: int, width: int) -> SDXLConditioning:
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a non-empty list of strings")
        embeds, pooled = encode_rows(self._cache, prompts, self._encode_uncached, self.device)
        return SDXLConditioning(embeds, pooled, add_time_ids(len(prompts), height, width).to(self.device, embeds.dtype))


@dataclass
class DTypePolicy:
    """Weight dtype of each part. The SDXL VAE overflows in fp16, so it stays fp32 unless the fp16-fix VAE
    (madebyollin/sdxl-vae-fp16-fix) is the configured VAE."""

    generator: str = "fp32"
    reference: str = "bf16"
    assistant: str = "fp32"
    text_encoders: str = "bf16"
    vae: str = "fp32"
    reward: str = "bf16"

    def check(self, vae_source: str | None = None) -> DTypePolicy:
        for part in ("generator", "reference", "assistant", "text_encoders", "vae", "reward"):
            parse_dtype(getattr(self, part))
        if parse_dtype(self.vae) == torch.float16 and "fp16-fix" not in str(vae_source or ""):
            raise UserError(
                f"vae dtype fp16 needs the fp16-fix VAE ({SDXL_VAE_FP16_FIX}); the SDXL VAE overflows "
                f"in fp16. Set the VAE source to it, or use vae=fp32 or bf16"
            )
        return self


# -- the tiny family ------------------------------------------------------------------------------


def build_tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**tiny_unet_config())


def build_tiny_sdxl(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a complete tiny StableDiffusionXLPipeline directory (hub layout) and return its path: the same classes
    and on-disk layout as stabilityai/stable-diffusion-xl-base-1.0, so the real loaders read it. Hidden sizes
    32 + 32 make cross_attention_dim 64; the VAE downsamples by 2 (SDXL: 8), so 32×32 latents decode to 64×64."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    out = Path(out_dir)
    tokenizer = tiny_clip_tokenizer()
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(tiny_text_config(len(tokenizer), bos, eos, False))
    text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(len(tokenizer), bos, eos, True))
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    unet = build_tiny_unet(seed)
    scheduler = EulerDiscreteScheduler(
        beta_start=BETA_START,
        beta_end=BETA_END,
        beta_schedule="scaled_linear",
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        timestep_spacing="leading",
        steps_offset=1,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )
    pipe.save_pretrained(out)
    return out


# -- the backbone -----------------------------------------------------------------------------------


class SDXL(Backbone):
    """SDXL: VP schedule, ε-prediction, true CFG with zero null embeddings, DMD2's one step at t* = 399."""

    name = "sdxl"
    prediction = "epsilon"
    guidance = "cfg"
    default_t_star = GENERATOR_TIMESTEP
    embedding_columns = ("prompt_embeds", "pooled_prompt_embeds")
    max_prompt_tokens = TINY_MAX_LENGTH  # both CLIP encoders read 77 tokens, start and end included
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    """Every attention projection: all of them sit inside the UNet's down, mid and up blocks (the blocks
    activation checkpointing wraps)."""
    pipeline_name = "StableDiffusionXLPipeline"
    text_encoder_parameters = 817_720_320  # CLIP-L 123,060,480 + OpenCLIP-bigG with projection 694,659,840
    generator_init_default = f"{DMD2_REPO}:{DMD2_UNET_1STEP}"
    block_pattern = r"(?:down_blocks\.\d+|mid_block|up_blocks\.\d+)"
    vae_block_pattern = r"decoder\.(?:mid_block\.resnets\.\d+|up_blocks\.\d+\.resnets\.\d+)"
    tiny_dir = "sdxl"
    """The tiny family's directory under the tiny root (`tiny:sdxl`)."""

    def __init__(self):
        self._schedule = schedule()

    def schedule(self) -> VPSchedule:
        return self._schedule

    def to_eps(self, output, x_t, t):
        return output

    def forward(self, net, x_t, t, cond: SDXLConditioning, guidance=None):
        if guidance is not None:
            raise ValueError("SDXL has no embedded guidance: its reference takes true CFG (two branches)")
        dtype = shared.base(net).compute_dtype()
        out = net(x_t.to(dtype), self._schedule.model_time(t), **cond.to(x_t.device, dtype).unet_kwargs()).sample
        return self.to_eps(out.to(x_t.dtype), x_t, t)

    def check_t_star(self, t_star) -> int:
        return int(self._schedule.check_t(torch.tensor(t_star), "t_star"))

    def one_step(self, net, z, cond, t_star):
        t = torch.full((z.shape[0],), t_star, device=z.device, dtype=torch.long)
        return self._schedule.one_step_x0(z, self.forward(net, z, t, cond), t_star)

    # conditioning

    def prompt_encoder(self, source, dtype="fp32", cache: bool = False, **resolve_kwargs) -> PromptEncoder:
        return PromptEncoder.from_pretrained(source, dtype=dtype, cache=cache, **resolve_kwargs)

    def conditioning_from_embeddings(self, columns, height, width) -> SDXLConditioning:
        embeds, pooled = columns
        return SDXLConditioning(embeds, pooled, add_time_ids(embeds.shape[0], height, width))

    def embedding_shapes(self, config):
        pooled = int(config["projection_class_embeddings_input_dim"]) - 6 * int(config["addition_time_embed_dim"])
        return {
            "prompt_embeds": (self.max_prompt_tokens, int(config["cross_attention_dim"])),
            "pooled_prompt_embeds": (pooled,),
        }

    # networks

    def blocks(self, net):
        blocks = [(net.down_blocks, i) for i in range(len(net.down_blocks))]
        if getattr(net, "mid_block", None) is not None:
            blocks.append((net, "mid_block"))
        return blocks + [(net.up_blocks, i) for i in range(len(net.up_blocks))]

    def vae_blocks(self, vae):
        return [vae.decoder.mid_block.resnets] + [up.resnets for up in vae.decoder.up_blocks]

    def decode(self, vae, x0):
        return decode(vae, x0)

    def encode(self, vae, images, generator=None):
        return encode(vae, images, generator)

    def architectures(self) -> dict[str, tuple[dict, dict]]:
        """(denoiser config, VAE config) of the shapes `distar plan` and the benchmarks build: the real SDXL, a
        CPU-sized "medium" and the tiny preset's."""
        return {
            "tiny": (tiny_unet_config(), dict(TINY_VAE_CONFIG)),
            "medium": medium_configs(),
            "sdxl": (dict(SDXL_UNET_CONFIG), dict(SDXL_VAE_CONFIG)),
        }

    def latent_channels(self, config: dict) -> int:
        return int(config["in_channels"])

    # loaders

    def load_denoiser(self, source, dtype="fp32", **resolve_kwargs):
        return load_unet(source, dtype=dtype, **resolve_kwargs)

    def load_vae(self, source, dtype="fp32", **resolve_kwargs):
        return load_vae(source, dtype=dtype, **resolve_kwargs)

    def vae_config(self, source, **resolve_kwargs) -> dict:
        """The VAE's config.json alone (of a pipeline directory or a standalone VAE): what the latent size needs,
        read before any weights are."""
        patterns = ["vae/config.json", "config.json", "model_index.json"]
        root = resolve_dir(source, allow_patterns=patterns, **resolve_kwargs)
        path = root / "vae" / "config.json" if (root / "vae").is_dir() else root / "config.json"
        require_files(root, {"vae": [[str(path.relative_to(root))]]})
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{path} is not valid JSON ({err}); fetch the VAE again") from None

    def load_generator_init(self, init, reference, reference_net=None, revision=None, **resolve_kwargs):
        return load_generator_init(init, reference, reference_net, revision, **resolve_kwargs)

    def load_raw_generator(self, weights, reference, dtype="fp32", **resolve_kwargs):
        """A raw state dict of the denoiser (DMD2's file layout) in the architecture of `reference`."""
        return load_dmd2_unet(weights, reference, dtype=dtype, **resolve_kwargs)

    def build_denoiser(self, config):
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel(**config)

    def build_vae(self, config):
        from diffusers import AutoencoderKL

        return AutoencoderKL(**config)

    def build_tiny(self, root: Path, seed: int = 0) -> None:
        """The tiny family under the tiny root: the pipeline (`tiny:sdxl`) and a raw UNet state dict in DMD2's
        layout from another seed (`tiny:dmd2_unet.safetensors`, the tiny "one-step" start)."""
        from safetensors.torch import save_file

        build_tiny_sdxl(root / self.tiny_dir, seed=seed)
        save_file(build_tiny_unet(seed=seed + 1).state_dict(), str(root / "dmd2_unet.safetensors"))

    # the exported pipeline

    def cache_items(self) -> list[tuple[str, list[str] | None]]:
        """What `distar cache`'s "sdxl" preset fetches: (key, allow_patterns) of the reference pipeline and DMD2's
        one-step UNet. From the hub: the fp16 weights (half the download; the trainer keeps fp32 masters of what it
        trains) and the fp32 VAE (the SDXL VAE overflows in fp16)."""
        parts = [
            "model_index.json", "scheduler/*", "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
            "text_encoder/model.fp16.safetensors", "text_encoder_2/config.json",
            "text_encoder_2/model.fp16.safetensors", "tokenizer/*", "tokenizer_2/*",
        ]  # fmt: skip
        return [(SDXL_BASE, parts), (self.generator_init_default, None)]

    def locate(self, source, parts: Sequence[str], **resolve_kwargs) -> Path:
        return locate(source, parts, **resolve_kwargs)

    pipeline_parts = PIPELINE_PARTS
    ema_part = "unet_ema"

    def generator_from_weights(self, reference_root: Path, weights: dict[str, torch.Tensor], source: str):
        """A UNet of the reference's config holding the generator's weights."""
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(reference_root, subfolder="unet"))
        missing, unexpected = unet.load_state_dict(weights, strict=False)
        if missing or unexpected:
            example = (missing + unexpected)[:3]
            raise UserError(
                f"{source}: the generator's weights do not fit the reference's UNet config "
                f"({len(missing)} missing, {len(unexpected)} unexpected keys, e.g. {example})"
            )
        return unet

    def one_step_pipeline(self, reference_root: Path, net, vae):
        """The reference's pipeline with the generator's UNet and an LCMScheduler (one step at t*, stock
        diffusers), in fp32."""
        from diffusers import LCMScheduler, StableDiffusionXLPipeline

        scheduler_dir = reference_root / "scheduler"
        scheduler = LCMScheduler.from_config(
            json.loads((scheduler_dir / "scheduler_config.json").read_text()) if scheduler_dir.is_dir() else {}
        )
        return StableDiffusionXLPipeline.from_pretrained(
            reference_root, unet=net, vae=vae, scheduler=scheduler, dtype=torch.float32
        )

    def usage(self, t_star) -> dict:
        """What the model card says of the exported pipeline: tags, the code that samples it, one line on how."""
        return {
            "tags": ["diff-instruct-star", "one-step", "sdxl"],
            "title": "One-step SDXL generator post-trained with Diff-Instruct* (DI*)",
            "code": [
                "import torch",
                "from diffusers import StableDiffusionXLPipeline",
                "",
                'pipe = StableDiffusionXLPipeline.from_pretrained("PATH", torch_dtype=torch.float16)',
                'pipe = pipe.to("cuda")',
                f'image = pipe("a photo of a cat", num_inference_steps=1, timesteps=[{t_star}], '
                "guidance_scale=0).images[0]",
            ],
            "how": f"One step at t* = {t_star} (the LCMScheduler is configured; pass `timesteps=[{t_star}]`), no CFG.",
            "ema": '`UNet2DConditionModel.from_pretrained("PATH", subfolder="unet_ema")`',
        }

    def load_ema(self, root: Path, dtype: torch.dtype):
        """The EMA network an exported pipeline holds beside its raw one (`ema_part`)."""
        from diffusers import UNet2DConditionModel

        require_files(root, {"the EMA network": [[f"{self.ema_part}/config.json"]]})
        return UNet2DConditionModel.from_pretrained(root, subfolder=self.ema_part, dtype=dtype)

    def load_pipeline(self, root: Path, dtype: torch.dtype, net=None):
        """A pipeline directory for sampling, optionally with another UNet."""
        from diffusers import StableDiffusionXLPipeline

        extra = {"unet": net.to(dtype)} if net is not None else {}
        # every part the pipeline loads, named at once (diffusers stops at the first, in an OSError)
        require_files(root, requirements([*(p for p in PIPELINE_PARTS if p not in extra), "vae"]))
        return StableDiffusionXLPipeline.from_pretrained(root, dtype=dtype, **extra)

    def pipeline_latent_shape(self, pipe) -> tuple[int, int, int]:
        side = pipe.unet.config.sample_size
        return pipe.unet.config.in_channels, side, side

    def pipeline_dtype(self, pipe) -> torch.dtype:
        return pipe.unet.dtype

    def sample_one_step(self, pipe, texts: list[str], latents: torch.Tensor, t_star):
        return pipe(
            texts, latents=latents, num_inference_steps=1, timesteps=[t_star], guidance_scale=0.0, output_type="pt"
        ).images

    def sample_steps(self, pipe, texts: list[str], latents: torch.Tensor, steps: int, guidance_scale: float):
        # N(0, I) latents as they are: the pipeline scales them by its scheduler's init_noise_sigma itself.
        return pipe(
            texts, latents=latents, num_inference_steps=steps, guidance_scale=guidance_scale, output_type="pt"
        ).images


# Names the rest of distar reaches through the backbone object, kept importable for tests and benchmarks.
__all__ = [
    "SDXL",
    "DTypePolicy",
    "PromptEncoder",
    "SDXLConditioning",
    "add_time_ids",
    "build_tiny_sdxl",
    "build_tiny_unet",
    "decode",
    "encode",
    "load_dmd2_unet",
    "load_generator_init",
    "load_unet",
    "load_vae",
    "locate",
    "shared",
]
