"""The model families DI* trains, behind one interface (`base.Backbone`): `get(name)` serves every step.

    from distar import backbones
    sdxl = backbones.get("sdxl")      # the schedule, conditioning, loaders, blocks, pipeline of SDXL

`model.backbone` in the training config names one (default "sdxl"); checkpoints and exported pipelines record it.
A new family is a new module here with a `Backbone` subclass, listed in `_FAMILIES`.
"""

from __future__ import annotations

import functools
import importlib

from distar.backbones.base import Assistant, Backbone, Conditioning, OneStepGenerator, PromptEncoder, Reference
from distar.diffusion import Schedule

_FAMILIES = {
    "sdxl": ("distar.backbones.sdxl", "SDXL"),
    "sd3": ("distar.backbones.sd3", "SD3"),
    "flux": ("distar.backbones.flux", "Flux"),
}
NAMES: tuple[str, ...] = tuple(_FAMILIES)
DEFAULT = "sdxl"


@functools.cache
def get(name: str) -> Backbone:
    """The backbone called `name` (one instance per process); a ValueError naming the known ones otherwise."""
    if name not in _FAMILIES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(map(repr, NAMES))}")
    module, cls = _FAMILIES[name]
    return getattr(importlib.import_module(module), cls)()


def of_pipeline(class_name: str | None) -> str | None:
    """The family whose diffusers pipeline class is `class_name` (a model_index.json's `_class_name`): how a
    reference pipeline, which has no distar.json, says what it is. None when no family's pipeline is that class."""
    return next((name for name in NAMES if get(name).pipeline_name == class_name), None)


__all__ = [
    "DEFAULT",
    "NAMES",
    "Assistant",
    "Backbone",
    "Conditioning",
    "OneStepGenerator",
    "PromptEncoder",
    "Reference",
    "Schedule",
    "get",
    "of_pipeline",
]
