"""What DI* needs of a model family, and the three diffusion networks written against it.

A `Backbone` answers every question the steps ask about a model family: its noise schedule and prediction type
(and the one conversion the losses need, `to_eps`), its conditioning (prompts → the network's inputs, the null
condition of CFG, precomputed embedding columns), how a network is called (`forward`), the one-step generator map,
how guidance works, the blocks that activation checkpointing, FSDP2 and regional compilation wrap, LoRA targets,
the VAE's latent scaling, the loaders, and the diffusers pipeline that export writes and evaluate samples with.
SDXL (`backbones/sdxl.py`) is the first; another family is another file.

The networks below (generator, reference, assistant) hold a backbone and a network, and know nothing else of the
family; their per-network state (LoRA adapters on or off, bf16 compute weights) is `shared.SharedBase`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import torch
from torch import nn

from distar.backbones import shared
from distar.diffusion import Schedule
from distar.losses import cfg


class Conditioning(Protocol):
    """What a network is conditioned on, for a batch of B prompts."""

    @property
    def batch_size(self) -> int: ...

    def null(self) -> Conditioning:
        """The unconditional branch of CFG."""
        ...

    def cat(self, other: Conditioning) -> Conditioning:
        """This batch followed by `other`'s."""
        ...

    def to(self, device=None, dtype=None) -> Conditioning: ...


class PromptEncoder(Protocol):
    """The frozen text encoders of a family: prompts → its conditioning."""

    def encode(self, prompts: Sequence[str], height: int, width: int) -> Conditioning: ...


def encode_rows(cache: dict | None, prompts: list[str], encode, device) -> tuple[torch.Tensor, ...]:
    """`encode(prompts)` → a tuple of (B, …) tensors, a row per prompt. With a cache (a dict: a PromptEncoder made
    with cache=True), each distinct prompt is encoded once and its rows are kept in host memory: a training set of
    a few prompts (the digits lab's ten) stops paying for the text encoders after its first batches."""
    if cache is None:
        return encode(prompts)
    todo = sorted({p for p in prompts if p not in cache})
    if todo:
        out = encode(todo)
        cache.update({k: tuple(t[i].cpu() for t in out) for i, k in enumerate(todo)})
    parts = len(cache[prompts[0]])
    return tuple(torch.stack([cache[p][j] for p in prompts]).to(device) for j in range(parts))


class Backbone:
    """A model family as DI* sees it. Subclasses fill in every method; the defaults here are shared ones."""

    name: ClassVar[str]
    prediction: ClassVar[Literal["epsilon", "flow"]]
    """What the network predicts: ε ("epsilon") or the velocity ε − x0 ("flow")."""
    guidance: ClassVar[Literal["cfg", "embedded"]]
    """How the reference is guided: true CFG (two branches) or a guidance scale embedded in the network."""
    default_t_star: ClassVar[Any]
    """The one-step generator's time (VP: the table index t*; flow: σ = 1)."""
    embedding_columns: ClassVar[tuple[str, ...]]
    """Columns of precomputed text embeddings in a prompt set, in the order `conditioning_from_embeddings` takes."""
    max_prompt_tokens: ClassVar[int]
    """The longest prompt the text encoders read, in tokens with the start and end tokens."""
    lora_targets: ClassVar[tuple[str, ...]]
    """Module names that LoRA adapters wrap (peft's target_modules)."""
    pipeline_name: ClassVar[str]
    """The diffusers pipeline class that export writes and evaluate samples with."""
    text_encoder_parameters: ClassVar[int]
    """The text encoders' parameters (distar plan counts them when prompts are encoded in the loop)."""
    latent_multiple: ClassVar[int] = 8
    """What a latent side must be a multiple of (SDXL's UNet halves it three times)."""
    ema_part: ClassVar[str]
    """The folder of an exported pipeline that holds the EMA of the generator's network (beside the raw one)."""

    # -- the schedule and the prediction ---------------------------------------------------------------

    def schedule(self) -> Schedule:
        raise NotImplementedError

    def to_eps(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's output as an ε-prediction (what the losses take)."""
        raise NotImplementedError

    def forward(
        self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance: float | None = None
    ) -> torch.Tensor:
        """ε̂(x_t, t, c) of `net`, in x_t's dtype; inputs cast to the network's compute dtype. guidance: the scale
        a guidance-distilled network embeds (`guidance` = "embedded" families only)."""
        raise NotImplementedError

    def one_step(self, net: nn.Module, z: torch.Tensor, cond: Conditioning, t_star) -> torch.Tensor:
        """The one-step generator map: noise z (read as x_{t*}) → x0."""
        raise NotImplementedError

    def check_t_star(self, t_star):
        """t* as the config names it (the family's timestep units) → the schedule's t; a ValueError otherwise."""
        return t_star

    def training_schedule(self, loss, latent_height: int, latent_width: int) -> Schedule:
        """The schedule the trainer draws its times from (for the flow families: loss.sigma_density and
        loss.sigma_shift); the family's own by default."""
        return self.schedule()

    def config_times(self, lo, hi):
        """A config's t range (loss.t_min … t_max, in the family's timestep units) → the schedule's."""
        return lo, hi

    # -- conditioning ------------------------------------------------------------------------------------

    def prompt_encoder(self, source, dtype="fp32", cache: bool = False, **resolve_kwargs) -> PromptEncoder:
        raise NotImplementedError

    def conditioning_from_embeddings(self, columns: Sequence[torch.Tensor], height: int, width: int):
        """The conditioning of precomputed embeddings (`embedding_columns`, in that order)."""
        raise NotImplementedError

    def embedding_shapes(self, config: dict) -> dict[str, tuple[int, ...]]:
        """The per-prompt shape of each embedding column for a network of `config`."""
        raise NotImplementedError

    def shape_conditioning(self, batch: int, height: int, width: int, config: dict, device) -> Conditioning:
        """A conditioning of the right shapes for a network of `config` (zeros; on "meta" for `distar plan`)."""
        shapes = self.embedding_shapes(config)
        columns = [torch.zeros(batch, *shapes[name], device=device) for name in self.embedding_columns]
        return self.conditioning_from_embeddings(columns, height, width).to(device)

    # -- networks ------------------------------------------------------------------------------------

    def blocks(self, net: nn.Module) -> list[tuple[nn.Module, str | int]]:
        """(parent, key) of the network's blocks in forward order: what activation checkpointing, FSDP2 and
        regional compilation wrap."""
        raise NotImplementedError

    block_pattern: ClassVar[str]
    """A regex of the blocks' module paths inside the network (torch's FLOP counter names them so)."""

    def vae_blocks(self, vae: nn.Module) -> list[nn.ModuleList]:
        """The lists of the VAE decoder's blocks that VAE checkpointing wraps."""
        raise NotImplementedError

    vae_block_pattern: ClassVar[str]
    """A regex of those blocks' module paths inside the VAE."""

    def decode(self, vae: nn.Module, x0: torch.Tensor) -> torch.Tensor:
        """Differentiable decode of latents to images in [0, 1], (B, 3, H, W), in x0's dtype."""
        raise NotImplementedError

    def encode(self, vae: nn.Module, images: torch.Tensor, generator: torch.Generator | None = None):
        """Images in [0, 1] → latents (sampled from the VAE posterior), scaled as the networks take them."""
        raise NotImplementedError

    def vae_factor(self, vae_config: dict) -> int:
        """Pixels per latent along each side."""
        return 2 ** (len(vae_config["block_out_channels"]) - 1)

    # -- loaders ---------------------------------------------------------------------------------------

    def load_denoiser(self, source, dtype="fp32", **resolve_kwargs) -> nn.Module:
        raise NotImplementedError

    def load_ema(self, root: Path, dtype: torch.dtype) -> nn.Module:
        raise NotImplementedError

    def load_vae(self, source, dtype="fp32", **resolve_kwargs) -> nn.Module:
        raise NotImplementedError

    def load_generator_init(self, init: str, reference, reference_net=None, revision=None, **resolve_kwargs):
        raise NotImplementedError

    def vae_config(self, source, **resolve_kwargs) -> dict:
        """The VAE's config alone, read before any weights (the latent size checks need it)."""
        raise NotImplementedError

    def build_denoiser(self, config: dict) -> nn.Module:
        """A network of `config` with random weights (on the current default device)."""
        raise NotImplementedError

    def build_vae(self, config: dict) -> nn.Module:
        raise NotImplementedError


def _named(backbone: Backbone | str | None) -> Backbone:
    from distar.backbones import DEFAULT, get

    if isinstance(backbone, Backbone):
        return backbone
    return get(backbone or DEFAULT)


class OneStepGenerator(nn.Module):
    """g_θ: noise z and a prompt → x0, by the backbone's one-step map at t*."""

    def __init__(self, unet, t_star=None, *, backbone: Backbone | str | None = None):
        super().__init__()
        self.backbone = _named(backbone)
        self.unet = unet
        self.t_star = self.backbone.check_t_star(self.backbone.default_t_star if t_star is None else t_star)

    def forward(self, z: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if z.shape[0] != cond.batch_size:
            raise ValueError(f"z has batch size {z.shape[0]} but the conditioning has {cond.batch_size}")
        return self.backbone.one_step(self.unet, z, cond, self.t_star)


class Reference(nn.Module):
    """ε_ref^cfg: the frozen reference with classifier-free guidance (α_cfg, default 7.5).

    Under true CFG the conditional and unconditional branches run as one batch of 2B. The parameters are frozen,
    but gradients flow through x_t (the DI* generator loss backpropagates through this network's input).
    """

    def __init__(self, unet, guidance_scale: float = 7.5, *, backbone: Backbone | str | None = None):
        super().__init__()
        self.backbone = _named(backbone)
        self.unet = unet.requires_grad_(False).eval()
        self.guidance_scale = float(guidance_scale)

    @property
    def base(self) -> shared.SharedBase:
        return shared.base(self.unet)

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance_scale: float | None = None
    ) -> torch.Tensor:
        """ε_ref^cfg at `guidance_scale` (default: the one this reference was built with); 1 is the conditional
        model alone, one batch of B."""
        scale = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        if self.backbone.guidance == "embedded":  # one call, the scale inside the network (FLUX.1-dev)
            with self.base.adapters(False):
                return self.backbone.forward(self.unet, x_t, t, cond, guidance=scale)
        if scale == 1.0:
            with self.base.adapters(False):
                return self.backbone.forward(self.unet, x_t, t, cond)
        return cfg(*self.branches(x_t, t, cond), scale)

    def branches(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning):
        """(ε_ref(x_t|∅), ε_ref(x_t|c)), computed as one batch of 2B (a shared network with its adapters off)."""
        with self.base.adapters(False):
            both = self.backbone.forward(self.unet, torch.cat([x_t, x_t]), torch.cat([t, t]), cond.null().cat(cond))
        return both.chunk(2)


class Assistant(nn.Module):
    """ε_ψ: a trainable diffusion model of the generator's own distribution (conditional, no CFG): a whole
    network, or the reference's with its LoRA adapters on (`shared.add_assistant_adapter`; only they train)."""

    def __init__(self, unet, *, backbone: Backbone | str | None = None):
        super().__init__()
        self.backbone = _named(backbone)
        self.unet = unet if shared.base(unet).has_adapters else unet.requires_grad_(True).train()

    @property
    def base(self) -> shared.SharedBase:
        return shared.base(self.unet)

    @classmethod
    def from_reference(
        cls, reference_unet, init: str | os.PathLike | None = None, *, backbone=None, **resolve_kwargs
    ) -> Assistant:
        """A trainable copy of the reference network, or (init) a network loaded from a checkpoint."""
        backbone = _named(backbone)
        if init is None:
            return cls(copy.deepcopy(reference_unet).float(), backbone=backbone)
        return cls(backbone.load_denoiser(init, **resolve_kwargs), backbone=backbone)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        with self.base.adapters(True):
            return self.backbone.forward(self.unet, x_t, t, cond)

    def trainable(self) -> list[nn.Parameter]:
        """What the assistant's optimizer updates: every weight, or the adapters of a shared network."""
        return shared.adapter_parameters(self.unet) if self.base.has_adapters else list(self.unet.parameters())
