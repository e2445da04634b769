"""Tiny stand-ins for every reward, written by the same path as the real ones: config → random weights →
save_pretrained → the real loaders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from distar.rewards.models import AestheticHead
from distar.rewards.preprocess import CLIP_MEAN, CLIP_STD
from distar.tiny_text import write_tiny_clip_tokenizer

TINY_IMAGE_SIZE = 32


def tiny_clip_config(vocab_size: int, bos: int, eos: int):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="gelu",
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=eos,
        ),
        # projection_dim inside vision_config too (as openai/clip-vit-large-patch14's config has it), so that
        # CLIPVisionModelWithProjection reads a full CLIPModel directory (the aesthetic reward does)
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=TINY_IMAGE_SIZE,
            patch_size=8,
            hidden_act="gelu",
            projection_dim=16,
        ),
        projection_dim=16,
    )


def _write_processor(out: Path) -> None:
    write_tiny_clip_tokenizer(out)
    from transformers import CLIPTokenizer

    CLIPTokenizer.from_pretrained(out).save_pretrained(out)
    (out / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "crop_size": {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
                "size": {"shortest_edge": TINY_IMAGE_SIZE},
                "image_mean": list(CLIP_MEAN),
                "image_std": list(CLIP_STD),
                "do_center_crop": True,
                "resample": 3,
            }
        )
    )


def build_tiny_clip_reward(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny CLIPModel directory with its tokenizer and preprocessor config (PickScore / HPSv2.1 / CLIP)."""
    from transformers import CLIPModel, CLIPTokenizer

    out = Path(out_dir)
    _write_processor(out)
    tok = CLIPTokenizer.from_pretrained(out)
    torch.manual_seed(seed)
    CLIPModel(tiny_clip_config(len(tok), tok.bos_token_id, tok.eos_token_id)).save_pretrained(out)
    return out


def build_tiny_aesthetic(out_dir: str | os.PathLike, seed: int = 0) -> tuple[Path, Path]:
    """A tiny CLIP vision tower directory and an aesthetic head file; returns (source, head)."""
    from transformers import CLIPTokenizer, CLIPVisionModelWithProjection

    out = Path(out_dir)
    _write_processor(out)
    tok = CLIPTokenizer.from_pretrained(out)
    torch.manual_seed(seed)
    config = tiny_clip_config(len(tok), tok.bos_token_id, tok.eos_token_id)
    vision_config = config.vision_config
    vision_config.projection_dim = config.projection_dim
    CLIPVisionModelWithProjection(vision_config).save_pretrained(out)
    head = AestheticHead(config.projection_dim)
    head_path = out / "aesthetic_head.safetensors"
    save_file(head.state_dict(), str(head_path))
    return out, head_path


def write_tiny_bert_tokenizer(out_dir: str | os.PathLike) -> Path:
    """A WordPiece tokenizer over single characters with BLIP's extra [DEC] and [ENC] tokens."""
    from transformers import BertTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?'-")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer(str(out / "vocab.txt"))
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    (out / "vocab.txt").unlink()
    tok.save_pretrained(out)
    return out


def build_tiny_image_reward(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny ImageReward directory in the layout `convert_image_reward` writes."""
    from transformers import AutoTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    from distar.rewards.image_reward import IMAGEREWARD_MAX_LENGTH, IMAGEREWARD_MEAN, IMAGEREWARD_STD, ImageRewardHead

    out = Path(out_dir)
    tok = AutoTokenizer.from_pretrained(write_tiny_bert_tokenizer(out / "tokenizer"))
    torch.manual_seed(seed)
    vision = BlipVisionModel(
        BlipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=TINY_IMAGE_SIZE,
            patch_size=8,
            layer_norm_eps=1e-6,
            hidden_act="gelu",
        )
    )
    text = BlipTextModel(
        BlipTextConfig(
            vocab_size=len(tok),
            hidden_size=24,
            encoder_hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            is_decoder=True,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            sep_token_id=tok.sep_token_id,
        ),
        add_pooling_layer=False,
    )
    vision.save_pretrained(out / "vision")
    text.save_pretrained(out / "text")
    save_file(ImageRewardHead(24).state_dict(), str(out / "head.safetensors"))
    meta = {"mean": IMAGEREWARD_MEAN, "std": IMAGEREWARD_STD, "max_length": IMAGEREWARD_MAX_LENGTH}
    (out / "imagereward.json").write_text(json.dumps(meta))
    return out


def build_tiny_rewards(out_dir: str | os.PathLike) -> dict:
    """Every reward's tiny stand-in under out_dir; returns {name: RewardSpec kwargs} for `RewardSpec(**…)`."""
    out = Path(out_dir)
    specs = {}
    for i, name in enumerate(("pickscore", "hpsv2.1", "clip")):
        specs[name] = {"name": name, "source": str(build_tiny_clip_reward(out / name, seed=10 + i))}
    source, head = build_tiny_aesthetic(out / "aesthetic", seed=20)
    specs["aesthetic"] = {"name": "aesthetic", "source": str(source), "head": str(head)}
    specs["imagereward"] = {"name": "imagereward", "source": str(build_tiny_image_reward(out / "imagereward", 30))}
    return specs
