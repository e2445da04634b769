"""SDXL's parts for DI*: the one-step generator, the CFG reference, the assistant, prompt encoding, VAE decode.

Models know nothing of parallelism (FSDP and activation checkpointing are applied from outside).
Conventions (METHOD.md §2): SDXL-base VP schedule, ε-prediction, prompt embeddings = penultimate hidden
states of CLIP-L and OpenCLIP-bigG concatenated, pooled embedding from the second (with projection),
add_time_ids = [H, W, 0, 0, H, W]; the unconditional branch uses zero text and pooled embeddings.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from distar.diffusion import SDXL_GENERATOR_TIMESTEP, VPSchedule
from distar.errors import UserError
from distar.losses import cfg
from distar.sources import parse, parse_dtype, read_state_dict, require_files, resolve_dir, resolve_file

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_VAE_FP16_FIX = "madebyollin/sdxl-vae-fp16-fix"
DMD2_REPO = "tianweiy/DMD2"
DMD2_UNET_1STEP = "dmd2_sdxl_1step_unet_fp16.bin"

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the structural keys): 2,567,463,684 parameters.
SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, use_linear_projection=True,
)  # fmt: skip

_DIFFUSERS_WEIGHTS = [
    "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin", "diffusion_pytorch_model.safetensors.index.json",
]  # fmt: skip
_TRANSFORMERS_WEIGHTS = [
    "model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
]  # fmt: skip
_TOKENIZER_FILES = ["tokenizer.json", "vocab.json"]


def _requirements(parts: Sequence[str]) -> dict[str, list[list[str]]]:
    need = {}
    for part in parts:
        if part in ("unet", "vae"):
            need[part] = [[f"{part}/config.json"], [f"{part}/{w}" for w in _DIFFUSERS_WEIGHTS]]
        elif part.startswith("text_encoder"):
            need[part] = [[f"{part}/config.json"], [f"{part}/{w}" for w in _TRANSFORMERS_WEIGHTS]]
        elif part.startswith("tokenizer"):
            need[part] = [[f"{part}/{f}" for f in _TOKENIZER_FILES]]
    return need


def locate(source: str | os.PathLike, parts: Sequence[str], **resolve_kwargs) -> Path:
    """Resolve an SDXL pipeline source and check that the given parts are all there (one error lists what is not)."""
    patterns = [f"{p}/*" for p in parts] + ["model_index.json"]
    root = resolve_dir(source, allow_patterns=patterns, **resolve_kwargs)
    require_files(root, _requirements(parts))
    return root


def _variant(root: Path, part: str) -> str | None:
    """Prefer full-precision weights; fall back to the fp16 variant when it is all the directory holds."""
    files = {p.name for p in (root / part).iterdir()}
    full = any(".fp16." not in f and (f.endswith(".safetensors") or f.endswith(".bin")) for f in files)
    return None if full else "fp16"


def load_unet(source: str | os.PathLike, dtype: str | torch.dtype = "fp32", **resolve_kwargs):
    from diffusers import UNet2DConditionModel

    root = locate(source, ["unet"], **resolve_kwargs)
    return UNet2DConditionModel.from_pretrained(
        root, subfolder="unet", torch_dtype=parse_dtype(dtype), variant=_variant(root, "unet")
    )


def load_vae(source: str | os.PathLike, dtype: str | torch.dtype = "fp32", **resolve_kwargs):
    """The VAE of an SDXL pipeline directory, or a standalone VAE repository (e.g. the fp16-fix VAE)."""
    from diffusers import AutoencoderKL

    root = resolve_dir(source, **resolve_kwargs)
    subfolder = "vae" if (root / "vae").is_dir() else None
    part = "vae" if subfolder else "."
    require_files(root, {"vae": [[f"{part}/config.json"], [f"{part}/{w}" for w in _DIFFUSERS_WEIGHTS]]})
    variant = _variant(root, part)
    return AutoencoderKL.from_pretrained(root, subfolder=subfolder, torch_dtype=parse_dtype(dtype), variant=variant)


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
        if self._cache is None:
            embeds, pooled = self._encode_uncached(prompts)
        else:
            todo = sorted({p for p in prompts if p not in self._cache})
            if todo:
                e, p = self._encode_uncached(todo)
                self._cache.update({k: (e[i].cpu(), p[i].cpu()) for i, k in enumerate(todo)})
            embeds = torch.stack([self._cache[p][0] for p in prompts]).to(self.device)
            pooled = torch.stack([self._cache[p][1] for p in prompts]).to(self.device)
        return SDXLConditioning(embeds, pooled, add_time_ids(len(prompts), height, width).to(self.device, embeds.dtype))


# -- the three diffusion networks -----------------------------------------------------------------


INPUT_DTYPE = "_distar_input_dtype"
"""The dtype a UNet's inputs are cast to, where it is not its first weight's (`distar.train.precision` swaps bf16
weight copies into an fp32 UNet for some passes, and its inputs stay what they were)."""


def _unet_eps(unet, x_t: torch.Tensor, t: torch.Tensor, cond: SDXLConditioning) -> torch.Tensor:
    dtype = getattr(unet, INPUT_DTYPE, None) or next(unet.parameters()).dtype
    out = unet(x_t.to(dtype), t, **cond.to(x_t.device, dtype).unet_kwargs()).sample
    return out.to(x_t.dtype)


# -- a LoRA assistant on the reference's UNet ------------------------------------------------------------

ASSISTANT_ADAPTER = "assistant"
GENERATOR_ADAPTER = "generator"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""Every attention projection: all of them sit inside the UNet's down, mid and up blocks (activation checkpointing
wraps those blocks: `distar.train.parallel`)."""
ADAPTERS_ON = "_distar_adapters_on"


def add_lora(unet: nn.Module, name: str, rank: int, alpha: float, seed: int = 0) -> nn.Module:
    """LoRA adapters (peft, through diffusers' integration) named `name` on `unet`'s attention projections,
    zero-initialised (B = 0: the UNet computes what it computed before), in fp32 and trainable; the base weights
    stay as they are, frozen. A's random init comes from `seed`, not from the process's random state: a run and its
    restart start from the same adapters."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, target_modules=list(LORA_TARGETS))
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
        torch.manual_seed(seed)
        unet.add_adapter(config, adapter_name=name)
    for param_name, param in unet.named_parameters():
        is_adapter = is_adapter_param(param_name)
        if is_adapter:
            param.data = param.data.float()
        param.requires_grad_(is_adapter)
    return unet


def add_generator_adapter(unet: nn.Module, rank: int, alpha: float, seed: int = 0) -> nn.Module:
    """The generator as LoRA adapters on its initial UNet (model.generator = "lora"), always on; only they train."""
    return add_lora(unet, GENERATOR_ADAPTER, rank, alpha, seed)


def merge_generator_adapter(unet: nn.Module) -> nn.Module:
    """A plain UNet with the generator's adapters merged into its weights (W + (alpha / rank) B A): what a diffusers
    pipeline loads without peft."""
    unet.fuse_lora()
    unet.unload_lora()
    return unet


def add_assistant_adapter(unet: nn.Module, rank: int, alpha: float, seed: int = 0) -> nn.Module:
    """The assistant as LoRA adapters on the reference's UNet (`add_lora`): zero-initialised (with them on, the UNet
    still computes the reference's ε at step 0) and off until a forward asks for them (`adapters`)."""
    add_lora(unet, ASSISTANT_ADAPTER, rank, alpha, seed)
    from peft.tuners.tuners_utils import BaseTunerLayer

    object.__setattr__(unet, "_distar_adapter_layers", [m for m in unet.modules() if isinstance(m, BaseTunerLayer)])
    setattr(unet, ADAPTERS_ON, True)
    set_adapters(unet, False)
    return unet


def has_adapters(unet: nn.Module) -> bool:
    return hasattr(unet, ADAPTERS_ON)


def is_adapter_param(name: str) -> bool:
    return ".lora_" in name


def adapter_parameters(unet: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in unet.named_parameters() if is_adapter_param(n)]


def set_adapters(module: nn.Module, on: bool) -> None:
    """Adapters on or off in `module` (the UNet, or one of its blocks). The layers' own flag is set directly:
    peft's enable_adapters also changes requires_grad, which the training loop owns."""
    layers = getattr(module, "_distar_adapter_layers", None)
    if layers is None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer._disable_adapters = not on
    if hasattr(module, ADAPTERS_ON):
        setattr(module, ADAPTERS_ON, on)


@contextlib.contextmanager
def adapters(unet: nn.Module, on: bool):
    """A forward of the shared UNet as the assistant (`on`) or as the reference; nothing for a plain UNet."""
    if not has_adapters(unet):
        yield
        return
    before = getattr(unet, ADAPTERS_ON)
    set_adapters(unet, on)
    try:
        yield
    finally:
        set_adapters(unet, before)


class OneStepGenerator(nn.Module):
    """g_θ: noise z (read as x_{t*}) and a prompt → x0 = (z − σ_{t*} ε̂_θ(z, t*, c)) / a_{t*}."""

    def __init__(self, unet, schedule: VPSchedule | None = None, t_star: int = SDXL_GENERATOR_TIMESTEP):
        super().__init__()
        self.unet = unet
        self.schedule = schedule or VPSchedule.sdxl()
        self.t_star = int(self.schedule.check_timesteps(torch.tensor(t_star), "t_star"))

    def forward(self, z: torch.Tensor, cond: SDXLConditioning) -> torch.Tensor:
        if z.shape[0] != cond.batch_size:
            raise ValueError(f"z has batch size {z.shape[0]} but the conditioning has {cond.batch_size}")
        t = torch.full((z.shape[0],), self.t_star, device=z.device, dtype=torch.long)
        return self.schedule.one_step_x0(z, _unet_eps(self.unet, z, t, cond), self.t_star)


class Reference(nn.Module):
    """ε_ref^cfg: the frozen reference UNet with classifier-free guidance (α_cfg, default 7.5).

    The conditional and unconditional branches run as one batch of 2B. The parameters are frozen, but
    gradients flow through x_t (the DI* generator loss backpropagates through this network's input).
    """

    def __init__(self, unet, guidance_scale: float = 7.5):
        super().__init__()
        self.unet = unet.requires_grad_(False).eval()
        self.guidance_scale = float(guidance_scale)

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: SDXLConditioning, guidance_scale: float | None = None
    ) -> torch.Tensor:
        """ε_ref^cfg at `guidance_scale` (default: the one this reference was built with); 1 is the conditional
        model alone, one batch of B."""
        scale = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        if scale == 1.0:
            with adapters(self.unet, False):
                return _unet_eps(self.unet, x_t, t, cond)
        return cfg(*self.branches(x_t, t, cond), scale)

    def branches(self, x_t: torch.Tensor, t: torch.Tensor, cond: SDXLConditioning):
        """(ε_ref(x_t|∅), ε_ref(x_t|c)), computed as one batch of 2B (a shared UNet with its adapters off)."""
        with adapters(self.unet, False):
            both = _unet_eps(self.unet, torch.cat([x_t, x_t]), torch.cat([t, t]), cond.null().cat(cond))
        return both.chunk(2)


class Assistant(nn.Module):
    """ε_ψ: a trainable diffusion model of the generator's own distribution (conditional, no CFG): a whole UNet,
    or the reference's UNet with its LoRA adapters on (`add_assistant_adapter`; only the adapters train)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet if has_adapters(unet) else unet.requires_grad_(True).train()

    @classmethod
    def from_reference(cls, reference_unet, init: str | os.PathLike | None = None, **resolve_kwargs) -> Assistant:
        """A trainable copy of the reference UNet, or (init) a UNet loaded from a checkpoint."""
        unet = copy.deepcopy(reference_unet) if init is None else load_unet(init, **resolve_kwargs)
        return cls(unet.float() if init is None else unet)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: SDXLConditioning) -> torch.Tensor:
        with adapters(self.unet, True):
            return _unet_eps(self.unet, x_t, t, cond)

    def trainable(self) -> list[nn.Parameter]:
        """What the assistant's optimizer updates: every weight, or the adapters of a shared UNet."""
        return adapter_parameters(self.unet) if has_adapters(self.unet) else list(self.unet.parameters())


# -- latents ↔ images -----------------------------------------------------------------------------


def decode(vae, x0: torch.Tensor) -> torch.Tensor:
    """Differentiable VAE decode of latents x0 to images in [0, 1], shape (B, 3, H, W), in x0's dtype.

    The latents are divided by the VAE's scaling factor (SDXL: 0.13025) first. Pixels are clamped to [0, 1]
    (the reward models' input range), so gradients vanish only where a pixel is already out of range.
    """
    vae_dtype = next(vae.parameters()).dtype
    latents = (x0 / vae.config.scaling_factor).to(vae_dtype)
    # The decoder runs in its own weights' dtype (model.vae_dtype), also inside the trainer's bf16 autocast region:
    # the SDXL VAE is kept in fp32 because lower precision overflows.
    own_dtype = (
        torch.autocast(latents.device.type, enabled=False)
        if latents.device.type in ("cpu", "cuda")
        else contextlib.nullcontext()  # "meta" (distar plan's shape-only runs) has no autocast
    )
    with own_dtype:
        images = vae.decode(latents).sample
    return (images.float() / 2 + 0.5).clamp(0, 1).to(x0.dtype)


def encode(vae, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images in [0, 1] → latents (sampled from the VAE posterior), scaled by the scaling factor."""
    vae_dtype = next(vae.parameters()).dtype
    dist = vae.encode((images * 2 - 1).to(vae_dtype)).latent_dist
    return (dist.sample(generator) * vae.config.scaling_factor).to(images.dtype)


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
