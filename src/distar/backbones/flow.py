"""What the flow-matching transformers (SD3 / SD3.5, FLUX.1) share as DI* sees them: the rectified-flow path
(`diffusion.FlowSchedule`), a velocity network turned into the ε-prediction the losses take, and the one-step
generator from pure noise at σ = 1 (METHOD.md §9).

A flow network predicts v̂ ≈ ε − x0 at x_σ = (1 − σ)·x0 + σ·ε; ε̂ = x_σ + (1 − σ)·v̂. CFG combines ε̂ exactly as it
combines v̂ (ε̂ is affine in v̂ with the same x_σ term), so the losses' `cfg` serves both. The one step is
x0 = z − σ*·v̂_θ(z, σ*, c) with σ* = 1 by default: pure noise lies on the path only there (unlike VP's t* = 399).
"""

from __future__ import annotations

import copy
import importlib
import json
from pathlib import Path

import torch

from distar.backbones.base import Backbone
from distar.backbones.files import locate, requirements, variant
from distar.backbones.latents import decode, encode
from distar.diffusion import FlowSchedule
from distar.errors import UserError
from distar.sources import parse_dtype, require_files, resolve_dir


def flow_vae_config(scaling_factor: float, shift_factor: float, tiny: bool = False) -> dict:
    """The 16-channel AutoencoderKL SD3 and FLUX.1 share (8× downsampling, no quant convolutions), with a family's
    scaling and shift; `tiny`: the same kind in miniature (two blocks: 2× downsampling)."""
    blocks = (16, 32) if tiny else (128, 256, 512, 512)
    return dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks), block_out_channels=blocks,
        layers_per_block=1 if tiny else 2, latent_channels=16, norm_num_groups=16 if tiny else 32,
        sample_size=16 if tiny else 1024, scaling_factor=scaling_factor, shift_factor=shift_factor,
        use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip


def tiny_t5_tokenizer(max_length: int):
    """A T5 tokenizer over printable ASCII characters (a Unigram vocabulary of single characters)."""
    from transformers import T5Tokenizer

    chars = [chr(c) for c in range(32, 127)]
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    return T5Tokenizer(vocab=specials + [(c, -1.0) for c in chars], extra_ids=0, model_max_length=max_length)


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
        self.shift = float(shift)  # the model's own time shift (its scheduler's); training applies it on request
        self._schedule = FlowSchedule(time_scale=self.time_scale)

    def model_shift(self, latent_height: int, latent_width: int) -> float:
        """The model's time shift at this latent size (SD3: static; FLUX: by the number of tokens)."""
        return self.shift

    def training_schedule(self, loss, latent_height: int, latent_width: int) -> FlowSchedule:
        """The schedule the trainer draws σ from: `loss.sigma_density` on the configured range, shifted by the
        model's own shift when `loss.sigma_shift` (uniform and unshifted by default)."""
        shift = self.model_shift(latent_height, latent_width) if loss.sigma_shift else 1.0
        return FlowSchedule(shift=shift, time_scale=self.time_scale, density=loss.sigma_density)

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

    # what the trainer, export and evaluate ask of a family: the same for every diffusers transformer pipeline

    embedding_columns = ()  # text is encoded online (precomputed T5 sequences: not yet)
    ema_part = "transformer_ema"
    vae_block_pattern = r"decoder\.(?:mid_block\.resnets\.\d+|up_blocks\.\d+\.resnets\.\d+)"
    generator_init_default = "reference"
    net_class_name: str
    """The diffusers class of the family's transformer."""

    def net_class(self):
        return getattr(importlib.import_module("diffusers"), self.net_class_name)

    def pipeline_class(self):
        return getattr(importlib.import_module("diffusers"), self.pipeline_name)

    def locate(self, source, parts, **resolve_kwargs) -> Path:
        return locate(source, parts, **resolve_kwargs)

    def load_denoiser(self, source, dtype="fp32", **resolve_kwargs):
        root = locate(source, ["transformer"], **resolve_kwargs)
        return self.net_class().from_pretrained(
            root, subfolder="transformer", dtype=parse_dtype(dtype), variant=variant(root, "transformer")
        )

    def load_generator_init(self, init, reference, reference_net=None, revision=None, **resolve_kwargs):
        """ "reference" (a copy of the reference's transformer) or a diffusers pipeline / transformer source (e.g. a
        distilled model's, such as FLUX.1-schnell's)."""
        if init == "reference":
            if reference_net is None:
                return self.load_denoiser(reference, dtype="fp32", revision=revision, **resolve_kwargs)
            return copy.deepcopy(reference_net).float()
        return self.load_denoiser(init, dtype="fp32", **resolve_kwargs)

    def load_vae(self, source, dtype="fp32", **resolve_kwargs):
        from diffusers import AutoencoderKL

        root = locate(source, ["vae"], **resolve_kwargs)
        weights = variant(root, "vae")
        return AutoencoderKL.from_pretrained(root, subfolder="vae", dtype=parse_dtype(dtype), variant=weights)

    def vae_config(self, source, **resolve_kwargs) -> dict:
        root = resolve_dir(source, allow_patterns=["vae/config.json", "model_index.json"], **resolve_kwargs)
        require_files(root, {"vae": [["vae/config.json"]]})
        return json.loads((root / "vae" / "config.json").read_text())

    def vae_blocks(self, vae):
        return [vae.decoder.mid_block.resnets] + [up.resnets for up in vae.decoder.up_blocks]

    def latent_channels(self, config: dict) -> int:
        return int(config.get("out_channels") or config["in_channels"])

    def build_denoiser(self, config):
        return self.net_class()(**config)

    def build_vae(self, config):
        from diffusers import AutoencoderKL

        return AutoencoderKL(**config)

    def decode(self, vae, x0):
        return decode(vae, x0)

    def encode(self, vae, images, generator=None):
        return encode(vae, images, generator)

    # the exported pipeline

    def generator_from_weights(self, reference_root: Path, weights: dict[str, torch.Tensor], source: str):
        """A transformer of the reference's config (`generator_config`) holding the generator's weights."""
        cls = self.net_class()
        config = dict(cls.load_config(reference_root, subfolder="transformer"))
        net = cls.from_config(self.generator_config(config, weights))
        missing, unexpected = net.load_state_dict(weights, strict=False)
        # buffers the config fixes (SD3's sin-cos position table) are built with the network, not trained
        missing = [k for k in missing if k not in dict(net.named_buffers())]
        if missing or unexpected:
            raise UserError(
                f"{source}: the generator's weights do not fit the reference's transformer config "
                f"({len(missing)} missing, {len(unexpected)} unexpected keys, e.g. {(missing + unexpected)[:3]})"
            )
        return net

    def generator_config(self, reference_config: dict, weights: dict[str, torch.Tensor]) -> dict:
        """The generator's transformer config from the reference's (the same, unless a family says otherwise)."""
        return reference_config

    def one_step_pipeline(self, reference_root: Path, net, vae):
        """The reference's pipeline with the generator's transformer; its FlowMatchEulerDiscreteScheduler takes one
        step from σ = 1 as it is (`num_inference_steps=1`), in fp32."""
        return self.pipeline_class().from_pretrained(reference_root, transformer=net, vae=vae, dtype=torch.float32)

    def load_ema(self, root: Path, dtype: torch.dtype):
        require_files(root, {"the EMA network": [[f"{self.ema_part}/config.json"]]})
        return self.net_class().from_pretrained(root, subfolder=self.ema_part, dtype=dtype)

    def load_pipeline(self, root: Path, dtype: torch.dtype, net=None):
        extra = {"transformer": net.to(dtype)} if net is not None else {}
        require_files(root, requirements([*(p for p in self.pipeline_parts if p not in extra), "vae"]))
        return self.pipeline_class().from_pretrained(root, dtype=dtype, **extra)

    def pipeline_dtype(self, pipe) -> torch.dtype:
        return pipe.transformer.dtype

    def pipeline_latents(self, pipe, latents: torch.Tensor) -> dict:
        """The call arguments that hand the pipeline (B, C, H, W) latents (and their image size)."""
        scale = pipe.vae_scale_factor
        return {"latents": latents, "height": latents.shape[-2] * scale, "width": latents.shape[-1] * scale}

    def pipeline_text_kwargs(self, pipe) -> dict:
        """Call arguments that make the pipeline encode prompts as the trainer's PromptEncoder does."""
        return {}

    def sample_one_step(self, pipe, texts: list[str], latents: torch.Tensor, t_star):
        if self.check_t_star(t_star) != 1.0:
            raise UserError(f"t* = {t_star}: the stock pipeline's one step starts from pure noise (t* = 1000)")
        return pipe(texts, num_inference_steps=1, guidance_scale=1.0, output_type="pt",
                    **self.pipeline_latents(pipe, latents), **self.pipeline_text_kwargs(pipe)).images  # fmt: skip

    def sample_steps(self, pipe, texts: list[str], latents: torch.Tensor, steps: int, guidance_scale: float):
        return pipe(texts, num_inference_steps=steps, guidance_scale=guidance_scale, output_type="pt",
                    **self.pipeline_latents(pipe, latents), **self.pipeline_text_kwargs(pipe)).images  # fmt: skip
