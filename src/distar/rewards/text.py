"""Each reward's text, cleaned as its upstream scorer cleans it before tokenizing: a prompt scored with other cleaning
is tokenized differently ("café &amp; croissant" ends two tokens later without html.unescape) and scores differently.

  hpsv2.1      hpsv2 1.2.0's bundled open_clip tokenizer: ftfy.fix_text, html.unescape twice, strip, runs of
               whitespace to one space, lower case (then CLIP BPE)
  pickscore    PickScore's own code: transformers' CLIP processor, no cleaning of its own
  clip         torchmetrics' CLIPScore: transformers' CLIP processor, no cleaning of its own
  imagereward  BLIP's BertTokenizer (bert-base-uncased), no cleaning of its own
  aesthetic    reads no text
The tokenizers themselves are loaded from the reward's own processor directory (tests/unit/test_reward_text.py holds
each to its upstream tokenizer)."""

from __future__ import annotations

import html
from collections.abc import Callable

import ftfy
import regex


def open_clip_clean(text: str) -> str:
    """open_clip's `_clean_lower` as hpsv2 1.2.0 bundles it (basic_clean, whitespace_clean, lower)."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


def _unchanged(text: str) -> str:
    return text


TEXT_CLEAN: dict[str, Callable[[str], str]] = {"hpsv2.1": open_clip_clean}


def clean_prompts(reward: str, prompts: list[str]) -> list[str]:
    """The prompts as `reward`'s upstream scorer hands them to its tokenizer."""
    return [TEXT_CLEAN.get(reward, _unchanged)(p) for p in prompts]
