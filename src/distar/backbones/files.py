"""The files of a diffusers pipeline directory: which weights each part may hold, resolving a source with the parts
a step needs checked at once (one error lists every missing file), and which precision variant to read."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from distar.sources import require_files, resolve_dir

DIFFUSERS_WEIGHTS = [
    "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin", "diffusion_pytorch_model.safetensors.index.json",
]  # fmt: skip
TRANSFORMERS_WEIGHTS = [
    "model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
]  # fmt: skip
TOKENIZER_FILES = ["tokenizer.json", "vocab.json"]


def requirements(parts: Sequence[str]) -> dict[str, list[list[str]]]:
    need = {}
    for part in parts:
        if part in ("unet", "transformer", "vae"):
            need[part] = [[f"{part}/config.json"], [f"{part}/{w}" for w in DIFFUSERS_WEIGHTS]]
        elif part.startswith("text_encoder"):
            need[part] = [[f"{part}/config.json"], [f"{part}/{w}" for w in TRANSFORMERS_WEIGHTS]]
        elif part.startswith("tokenizer"):
            need[part] = [[f"{part}/{f}" for f in TOKENIZER_FILES]]
    return need


def locate(source: str | os.PathLike, parts: Sequence[str], **resolve_kwargs) -> Path:
    """Resolve a pipeline source and check that the given parts are all there (one error lists what is not)."""
    patterns = [f"{p}/*" for p in parts] + ["model_index.json"]
    root = resolve_dir(source, allow_patterns=patterns, **resolve_kwargs)
    require_files(root, requirements(parts))
    return root


def variant(root: Path, part: str) -> str | None:
    """Prefer full-precision weights; fall back to the fp16 variant when it is all the directory holds."""
    files = {p.name for p in (root / part).iterdir()}
    full = any(".fp16." not in f and (f.endswith(".safetensors") or f.endswith(".bin")) for f in files)
    return None if full else "fp16"
