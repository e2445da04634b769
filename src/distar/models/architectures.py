"""The real models' architectures as configs, and random-weight networks built from them.

Benchmarks and `distar plan` need the SDXL UNet, the SDXL VAE and a reward of the real shapes without their
weights: the configs here are the structural keys of the published config.json files, and
`random_networks` builds every network of a training config from them (on any device, "meta" included, where
nothing is allocated). The tiny preset's shapes come from distar.models.tiny.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from distar.models.sdxl import SDXL_UNET_CONFIG
from distar.rewards.preprocess import CLIP_MEAN, CLIP_STD

# stabilityai/stable-diffusion-xl-base-1.0 vae/config.json (the structural keys): 83,653,863 parameters.
SDXL_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=4, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025,
)  # fmt: skip

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
    """What the networks of a run look like: UNet, VAE and (CLIP-type) reward configs."""

    name: str
    unet: dict
    vae: dict
    reward: dict | None
    reward_image_size: int = 224

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def text_dim(self) -> int:
        return int(self.unet["cross_attention_dim"])

    @property
    def pooled_dim(self) -> int:
        return int(self.unet["projection_class_embeddings_input_dim"]) - 6 * int(self.unet["addition_time_embed_dim"])


def sdxl() -> Architecture:
    return Architecture("sdxl", dict(SDXL_UNET_CONFIG), dict(SDXL_VAE_CONFIG), dict(CLIP_VIT_H_14_CONFIG))


def tiny() -> Architecture:
    from distar.models.tiny import tiny_unet_config
    from distar.rewards.tiny import TINY_IMAGE_SIZE, tiny_clip_config

    vae = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=64,
        scaling_factor=0.13025,
    )
    reward = tiny_clip_config(514, 512, 513).to_dict()  # the tiny tokenizer: 512 byte tokens, BOS, EOS
    return Architecture("tiny", tiny_unet_config(), vae, reward, reward_image_size=TINY_IMAGE_SIZE)


def medium() -> Architecture:
    """A CPU-sized SDXL shape: three resolution levels, SDXL's block types and depths scaled down (31M parameters
    per UNet), the tiny preset's text width, a three-level VAE and a small CLIP reward."""
    from distar.models.tiny import TINY_TEXT_HIDDEN, TINY_TIME_EMBED_DIM

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
    return Architecture("medium", unet, vae, reward, reward_image_size=112)


ARCHITECTURES = {"tiny": tiny, "medium": medium, "sdxl": sdxl}


def _tokenizer():
    """A real CLIPTokenizer (byte-level, no merges): the reward's text side needs token ids, not a vocabulary."""
    from transformers import CLIPTokenizer

    from distar.models.tiny import write_tiny_clip_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(Path(tmp)))


def random_networks(
    arch: Architecture, reward_name: str = "pickscore", device: str | torch.device = "cpu", seed: int = 0
) -> dict:
    """Reference, generator and assistant UNets, VAE and reward of `arch` with random weights, fp32, on `device`
    (built there: an SDXL UNet initialises in seconds on a GPU and allocates nothing on "meta").
    Returns the keyword arguments of `distar.train.trainer.assemble` after `config` and `world`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel

    from distar.rewards import ClipReward, WeightedReward

    torch.manual_seed(seed)
    with torch.device(device):
        reference = UNet2DConditionModel(**arch.unet)
        generator = UNet2DConditionModel(**arch.unet)
        assistant = UNet2DConditionModel(**arch.unet)
        if str(device) != "meta":  # the assistant starts as the reference (a copy); so does the generator here
            generator.load_state_dict(reference.state_dict())
            assistant.load_state_dict(reference.state_dict())
        vae = AutoencoderKL(**arch.vae)
        reward = None
        if arch.reward is not None:
            clip = CLIPModel(CLIPConfig(**arch.reward))
            image_config = {"size": arch.reward_image_size, "mean": CLIP_MEAN, "std": CLIP_STD}
            reward = WeightedReward([ClipReward(reward_name, clip, _tokenizer(), image_config)], [1.0])
    return dict(reference_unet=reference, generator_unet=generator, assistant_unet=assistant, vae=vae, reward=reward)
