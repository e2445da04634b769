"""Sampling the models an evaluation compares: an exported one-step pipeline, an initial generator given as a raw
state dict in its reference's pipeline (`unet:SOURCE`), or the reference itself with N steps and CFG
(`reference:N`). Each prompt's noise comes from (seed, prompt id) alone, so results do not depend on batching or on
where a resumed evaluation restarts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from distar import backbones, sources
from distar.errors import UserError


class Sampler:
    """An exported one-step pipeline; `unet:SOURCE`, a raw UNet state dict (the initial generator, e.g. DMD2's
    1-step UNet) in the --reference pipeline, sampled in one step; or `reference:N`, the --reference pipeline with
    its own scheduler, N steps and CFG."""

    def __init__(self, spec: str, config, device: torch.device):
        self.steps = None
        parsed = sources.parse(spec, evaluate_forms=True)
        source, raw = spec, None
        if parsed.kind in ("unet", "reference") and not config.reference:
            raise UserError(f"{spec!r} needs --reference (the pipeline whose UNet it replaces, or that it samples)")
        if parsed.kind == "unet":  # the initial generator: a raw state dict in the reference's pipeline
            raw, source = parsed.inner.text, config.reference
        elif parsed.kind == "reference":
            self.steps = parsed.steps
            source = config.reference
        root = sources.resolve_dir(source, cache_dir=config.cache_dir)
        if not (root / "model_index.json").is_file():
            raise UserError(f"{source!r} is not a diffusers pipeline (no model_index.json); run `distar export`")
        self.backbone = backbones.get(_recorded_backbone(root))
        net = None
        if raw is not None:
            net = self.backbone.load_raw_generator(raw, config.reference, cache_dir=config.cache_dir)
        dtype = sources.parse_dtype(config.dtype)
        self.pipe = self.backbone.load_pipeline(root, dtype, net).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.config, self.device, self.name = config, device, spec
        self.latent_shape = self.backbone.pipeline_latent_shape(self.pipe)

    def noise(self, prompt) -> torch.Tensor:
        seed = int.from_bytes(
            hashlib.blake2b(f"{self.config.seed}/{prompt.id}".encode(), digest_size=8).digest(), "big"
        )
        g = torch.Generator().manual_seed(seed)
        return torch.randn(*self.latent_shape, generator=g)

    @torch.no_grad()
    def __call__(self, prompts: list) -> torch.Tensor:
        dtype = self.backbone.pipeline_dtype(self.pipe)
        latents = torch.stack([self.noise(p) for p in prompts]).to(self.device, dtype)
        texts = [p.text for p in prompts]
        if self.steps is None:
            images = self.backbone.sample_one_step(self.pipe, texts, latents, self.config.t_star)
        else:
            images = self.backbone.sample_steps(self.pipe, texts, latents, self.steps, self.config.guidance_scale)
        return images.float().clamp(0, 1)


def _recorded_backbone(root: Path) -> str:
    """The backbone an exported pipeline records in its distar.json; a pipeline without one (a reference, or an
    export from before the choice) is the default's."""
    meta = root / "distar.json"
    if meta.is_file():
        try:
            name = json.loads(meta.read_text()).get("backbone", backbones.DEFAULT)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
            raise UserError(f"{meta} is not valid JSON ({err}); export the model again") from None
        if name not in backbones.NAMES:
            raise UserError(f"{meta} names backbone {name!r}, which this distar does not know ({backbones.NAMES})")
        return name
    return backbones.DEFAULT


def recorded_t_star(model: str, cache_dir: str | None = None):
    """t* of an exported pipeline, as its distar.json records it; for another kind of model (`unet:`,
    `reference:N`) or a pipeline without the record, the default backbone's."""
    parsed = sources.parse(model, evaluate_forms=True)
    if parsed.kind not in ("unet", "reference"):
        root = sources.resolve_dir(model, cache_dir=cache_dir)
        meta = root / "distar.json"
        if meta.is_file():
            try:
                recorded = json.loads(meta.read_text()).get("t_star")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
                raise UserError(f"{meta} is not valid JSON ({err}); export the model again") from None
            if recorded is not None:
                return recorded
        return backbones.get(_recorded_backbone(root)).default_t_star
    return backbones.get(backbones.DEFAULT).default_t_star
