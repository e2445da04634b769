"""Sampling the models an evaluation compares: an exported one-step pipeline, an initial generator given as a raw
state dict in its reference's pipeline (`unet:SOURCE`), or the reference itself with N steps and CFG
(`reference:N`). Each prompt's noise comes from (seed, prompt id) alone, so results do not depend on batching or on
where a resumed evaluation restarts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from distar import backbones, sources, storage
from distar.errors import UserError


class Sampler:
    """An exported one-step pipeline (with `ema`, its EMA network in place of the raw one); `unet:SOURCE`, a raw
    UNet state dict (the initial generator, e.g. DMD2's 1-step UNet) in the --reference pipeline, sampled in one
    step; or `reference:N`, the --reference pipeline with its own scheduler, N steps and CFG."""

    def __init__(self, spec: str, config, device: torch.device, ema: bool = False):
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
        if parsed.kind == "uri" and not Path(spec.removeprefix("file://")).is_dir():
            # an exported pipeline in object storage: only what sampling loads (no unet_ema/, no single file)
            backbone = backbones.get(recorded(spec).get("backbone", backbones.DEFAULT))
            root = sources.download(spec, sampled_files(backbone, ema))
        else:
            root = sources.resolve_dir(source, cache_dir=config.cache_dir)
        if not (root / "model_index.json").is_file():
            raise UserError(f"{source!r} is not a diffusers pipeline (no model_index.json); run `distar export`")
        self.backbone = backbones.get(_recorded_in(root).get("backbone", backbones.DEFAULT))
        net = None
        dtype = sources.parse_dtype(config.dtype)
        if raw is not None:
            net = self.backbone.load_raw_generator(raw, config.reference, cache_dir=config.cache_dir)
        elif ema:
            net = self.backbone.load_ema(root, dtype)
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


def sampled_files(backbone, ema: bool = False) -> list[str]:
    """The files of an exported pipeline that sampling reads (hub-style patterns)."""
    parts = (*backbone.pipeline_parts, "vae", "scheduler", *((backbone.ema_part,) if ema else ()))
    return ["model_index.json", "distar.json", *(f"{part}/*" for part in parts)]


def _parse_record(text: bytes | str | None, where: str, model_index: bytes | str | None = None) -> dict:
    """An exported pipeline's distar.json; where there is none (a reference, or an export from before it), the
    family its model_index.json names ({"backbone": "sd3"} for a StableDiffusion3Pipeline), else {}."""
    if text is None:
        try:
            family = backbones.of_pipeline(json.loads(model_index).get("_class_name")) if model_index else None
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            family = None  # the pipeline's own loader names what is wrong with it
        return {"backbone": family} if family else {}
    try:
        record = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{where} is not valid JSON ({err}); export the model again") from None
    if not isinstance(record, dict):
        raise UserError(f"{where} is not a JSON object; export the model again")
    name = record.get("backbone", backbones.DEFAULT)
    if name not in backbones.NAMES:
        raise UserError(f"{where} names backbone {name!r}, which this distar does not know ({backbones.NAMES})")
    return record


def _recorded_in(root: Path) -> dict:
    meta, index = root / "distar.json", root / "model_index.json"
    return _parse_record(
        meta.read_bytes() if meta.is_file() else None, str(meta), index.read_bytes() if index.is_file() else None
    )


def recorded(model: str, cache_dir: str | None = None) -> dict:
    """What a model's distar.json records, read without fetching the pipeline itself ({} for `unet:` and
    `reference:N`, which are no exported pipelines)."""
    parsed = sources.parse(model, evaluate_forms=True)
    if parsed.kind in ("unet", "reference"):
        return {}
    if parsed.kind == "uri" and not Path(model.removeprefix("file://")).is_dir():
        fs, path = storage.filesystem(model)
        where, index = (f"{path.rstrip('/')}/{name}" for name in ("distar.json", "model_index.json"))
        text = fs.cat_file(where) if fs.exists(where) else None
        model_index = fs.cat_file(index) if text is None and fs.exists(index) else None
        return _parse_record(text, f"{model.rstrip('/')}/distar.json", model_index)
    return _recorded_in(
        sources.resolve_dir(model, cache_dir=cache_dir, allow_patterns=["distar.json", "model_index.json"])
    )


def model_record(model: str, cache_dir: str | None = None, reference: str | None = None) -> dict:
    """What an evaluation needs to know of its model before sampling, read once: `recorded` of the pipeline that
    samples it (`unet:` and `reference:N` are sampled in `reference`, so every row of one family's comparison
    shares one protocol), with "backbone" and "t_star" always filled in (where no distar.json records them: the
    family of the pipeline class, and that family's default t*)."""
    kind = sources.parse(model, evaluate_forms=True).kind
    record = recorded(reference if kind in ("unet", "reference") and reference else model, cache_dir)
    backbone = record.get("backbone", backbones.DEFAULT)
    t_star = record["t_star"] if record.get("t_star") is not None else backbones.get(backbone).default_t_star
    return {**record, "backbone": backbone, "t_star": t_star}


def recorded_t_star(model: str, cache_dir: str | None = None, reference: str | None = None):
    """t* of `model` as `model_record` finds it."""
    return model_record(model, cache_dir, reference)["t_star"]
