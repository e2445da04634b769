"""A tiny CLIP text tower for the tiny model families and the tiny rewards: a byte-level tokenizer (real
CLIPTokenizer files) and a small CLIPTextConfig. Shared by `distar.backbones` and `distar.rewards`, which import
neither each other nor anything above this module for it."""

from __future__ import annotations

import json
import os
from pathlib import Path

TINY_MAX_LENGTH = 77
TINY_TEXT_HIDDEN = 32


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def write_tiny_clip_tokenizer(out_dir: str | os.PathLike) -> Path:
    """A byte-level CLIP BPE tokenizer with no merges: every character is a token. Real CLIPTokenizer files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=TINY_MAX_LENGTH)
    tok.save_pretrained(out)
    return out


def tiny_clip_tokenizer():
    """The tiny CLIP tokenizer as a loaded CLIPTokenizer (its files written to a temporary directory)."""
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(Path(tmp)))


def tiny_text_config(vocab_size: int, bos: int, eos: int, with_projection: bool):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_TEXT_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=TINY_MAX_LENGTH,
        projection_dim=TINY_TEXT_HIDDEN,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
        hidden_act="gelu",
    )
