"""SDXL one-step generator, CFG reference, assistant, prompt encoding and VAE, plus the tiny preset."""

from distar.models.sdxl import (
    Assistant,
    DTypePolicy,
    OneStepGenerator,
    PromptEncoder,
    Reference,
    SDXLConditioning,
    add_time_ids,
    decode,
    encode,
    load_dmd2_unet,
    load_unet,
    load_vae,
    locate,
    parse_dtype,
)
from distar.models.tiny import build_tiny_sdxl

__all__ = [
    "Assistant",
    "DTypePolicy",
    "OneStepGenerator",
    "PromptEncoder",
    "Reference",
    "SDXLConditioning",
    "add_time_ids",
    "build_tiny_sdxl",
    "decode",
    "encode",
    "load_dmd2_unet",
    "load_unet",
    "load_vae",
    "locate",
    "parse_dtype",
]
