"""The real models' architectures as configs, and random-weight networks built from them.

Benchmarks and `distar plan` need the denoiser, the VAE and a reward of the real shapes without their weights: the
backbone gives the denoiser and VAE configs (the structural keys of the published config.json files), this module
the reward's, and `random_networks` builds every network of a training config from them (on any device, "meta"
included, where nothing is allocated).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distar import backbones
from distar.rewards.preprocess import CLIP_MEAN, CLIP_STD
from distar.tiny_text import tiny_clip_tokenizer

# laion/CLIP-ViT-H-14-laion2B-s32B-b79K config.json, the architecture of PickScore_v1 and HPSv2.1: 986M parameters.
CLIP_VIT_H_14_CONFIG = dict(
    text_config=dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                     num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu"),
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                       image_size=224, patch_size=14, hidden_act="gelu"),
    projection_dim=1024,
)  # fmt: skip


@dataclass
class Architecture:
    """What the networks of a run look like: the backbone's denoiser and VAE configs, and a (CLIP-type) reward's."""

    name: str
    unet: dict
    vae: dict
    reward: dict | None
    reward_image_size: int = 224
    backbone: str = backbones.DEFAULT

    @property
    def family(self) -> backbones.Backbone:
        return backbones.get(self.backbone)

    @property
    def vae_factor(self) -> int:
        return self.family.vae_factor(self.vae)

    @property
    def latent_channels(self) -> int:
        return self.family.latent_channels(self.unet)


def _of(name: str, reward: dict | None, reward_image_size: int = 224, backbone: str = backbones.DEFAULT):
    unet, vae = backbones.get(backbone).architectures()[name]
    return Architecture(name, unet, vae, reward, reward_image_size, backbone)


def sdxl() -> Architecture:
    return _of("sdxl", dict(CLIP_VIT_H_14_CONFIG))


def tiny() -> Architecture:
    from distar.rewards.tiny import TINY_IMAGE_SIZE, tiny_clip_config

    reward = tiny_clip_config(514, 512, 513).to_dict()  # the tiny tokenizer: 512 byte tokens, BOS, EOS
    return _of("tiny", reward, TINY_IMAGE_SIZE)


def medium() -> Architecture:
    """A CPU-sized SDXL shape (31M parameters per UNet, the backbone's "medium") and a small CLIP reward."""
    reward = dict(
        text_config=dict(
            vocab_size=49408,
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="gelu",
        ),
        vision_config=dict(
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=112,
            patch_size=14,
            hidden_act="gelu",
        ),
        projection_dim=128,
    )
    return _of("medium", reward, 112)


def _flow(backbone: str, name: str, tiny_shapes: bool):
    def build() -> Architecture:
        if tiny_shapes:
            arch = tiny()
            return _of("tiny", arch.reward, arch.reward_image_size, backbone)
        return _of(name, dict(CLIP_VIT_H_14_CONFIG), backbone=backbone)

    return build


ARCHITECTURES = {
    "tiny": tiny,
    "medium": medium,
    "sdxl": sdxl,
    "tiny-sd3": _flow("sd3", "tiny", True),
    "sd35m": _flow("sd3", "sd35m", False),
    "sd35l": _flow("sd3", "sd35l", False),
    "tiny-flux": _flow("flux", "tiny", True),
    "flux": _flow("flux", "flux", False),
}


def default_architecture(backbone: str, reference: str) -> str:
    """The shapes a config's networks have: the tiny ones for `tiny:` sources, else the family's published ones
    (SD3.5-Large where the reference names it, else SD3.5-Medium)."""
    tiny_ = reference.startswith("tiny:")
    if backbone == "sd3":
        return "tiny-sd3" if tiny_ else ("sd35l" if "large" in reference.lower() else "sd35m")
    if backbone == "flux":
        return "tiny-flux" if tiny_ else "flux"
    return "tiny" if tiny_ else "sdxl"


def random_networks(
    arch: Architecture, reward_name: str = "pickscore", device: str | torch.device = "cpu", seed: int = 0
) -> dict:
    """Reference, generator and assistant networks, VAE and reward of `arch` with random weights, fp32, on `device`
    (built there: an SDXL UNet initialises in seconds on a GPU and allocates nothing on "meta").
    Returns the keyword arguments of `distar.train.trainer.assemble` after `config` and `world`."""
    from transformers import CLIPConfig, CLIPModel

    from distar.rewards import ClipReward, WeightedReward

    family = arch.family
    torch.manual_seed(seed)
    with torch.device(device):
        reference = family.build_denoiser(arch.unet)
        generator = family.build_denoiser(arch.unet)
        assistant = family.build_denoiser(arch.unet)
        if str(device) != "meta":  # the assistant starts as the reference (a copy); so does the generator here
            generator.load_state_dict(reference.state_dict())
            assistant.load_state_dict(reference.state_dict())
        vae = family.build_vae(arch.vae)
        reward = None
        if arch.reward is not None:
            clip = CLIPModel(CLIPConfig(**arch.reward))
            image_config = {"size": arch.reward_image_size, "mean": CLIP_MEAN, "std": CLIP_STD}
            reward = WeightedReward([ClipReward(reward_name, clip, tiny_clip_tokenizer(), image_config)], [1.0])
    return dict(reference_unet=reference, generator_unet=generator, assistant_unet=assistant, vae=vae, reward=reward)
