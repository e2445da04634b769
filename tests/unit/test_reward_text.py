"""Each reward's text path equals its upstream scorer's: HPSv2.1 against open_clip's own tokenizer module on the real
CLIP BPE vocabulary, PickScore and CLIP score against transformers' CLIP processor, ImageReward against the Python
BertTokenizer BLIP used. Prompts with HTML entities, mojibake, odd whitespace, accents, CJK and more than 77 tokens."""

import gzip
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from distar.rewards import RewardSpec, load_reward
from distar.rewards.text import open_clip_clean
from distar.rewards.tiny import build_tiny_clip_reward, build_tiny_image_reward

HOSTILE = [
    "café &amp; croissant on a rainy Parisian street",
    "&lt;b&gt;bold&lt;/b&gt; letters &amp;amp; a double-escaped ampersand",
    "cafÃ© au lait in a mugâ€™s shadow",  # mojibake: UTF-8 read as cp1252
    "  a\tcat\n\non  a\u00a0mat   under “curly” quotes  ",
    "Ünïcödé ACCENTS, ÉCOLE and naïve résumé",
    "東京の夜景 with neon signs 🌃",
    " ".join(f"word{i} and more" for i in range(40)),  # far beyond 77 tokens
]


def _open_clip_tokenizer():
    """open_clip's tokenizer module, loaded from its file: the package's __init__ imports torchvision, which does not
    load beside this torch; the tokenizer needs only ftfy, regex and the BPE vocabulary shipped beside it."""
    spec = importlib.util.find_spec("open_clip")
    assert spec is not None, "open_clip_torch is a test dependency (locks/nodeps.txt): run `make venv`"
    path = Path(spec.submodule_search_locations[0]) / "tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("open_clip_tokenizer_upstream", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def open_clip_tok():
    return _open_clip_tokenizer()


@pytest.fixture(scope="module")
def clip_processor_dir(tmp_path_factory, open_clip_tok):
    """transformers' CLIP tokenizer files for OpenAI's BPE vocabulary (what laion/CLIP-ViT-H-14 ships), written from
    the vocabulary inside open_clip the way OpenAI's tokenizer builds it."""
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    out = tmp_path_factory.mktemp("clip-bpe")
    lines = gzip.open(open_clip_tok.default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    units = list(open_clip_tok.bytes_to_unicode().values())
    vocab = units + [u + "</w>" for u in units] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), pad_token="!", model_max_length=77)
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def clip_model_dir(tmp_path_factory):
    return build_tiny_clip_reward(tmp_path_factory.mktemp("clip-model"))


def _through_eot(ids: torch.Tensor, eot: int) -> list[list[int]]:
    """Each row up to and including its first end token: all that CLIP's causal text tower pools from."""
    rows = []
    for row in ids.tolist():
        assert eot in row, f"no end token in {row}"
        rows.append(row[: row.index(eot) + 1])
    return rows


def test_hps_text_path_is_open_clips_tokenizer(open_clip_tok, clip_processor_dir, clip_model_dir):
    reward = load_reward(RewardSpec("hpsv2.1", source=str(clip_model_dir), processor=str(clip_processor_dir)))
    eot = reward.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ours = _through_eot(reward.tokenize(HOSTILE).input_ids, eot)
    upstream = _through_eot(open_clip_tok.tokenize(HOSTILE, context_length=77), eot)
    assert ours == upstream
    assert len(ours[-1]) == 77  # the long prompt is cut with its end token kept, as open_clip does
    # without open_clip's cleaning the entity prompt ends two tokens later (the issue this path fixes)
    raw = _through_eot(
        reward.tokenizer(HOSTILE[:1], truncation=True, max_length=77, return_tensors="pt").input_ids, eot
    )
    assert len(raw[0]) == len(upstream[0]) + 2


def test_open_clip_cleaning_is_upstreams(open_clip_tok):
    for prompt in HOSTILE:
        assert open_clip_clean(prompt) == open_clip_tok._clean_lower(prompt)
    assert open_clip_clean("cafÃ© &amp;amp;  X") == "café & x"


@pytest.mark.parametrize("kind", ["pickscore", "clip"])
def test_pickscore_and_clip_text_paths_are_the_clip_processors(kind, clip_processor_dir, clip_model_dir):
    """PickScore's code and torchmetrics' CLIPScore hand the raw prompt to transformers' CLIP processor."""
    from transformers import AutoProcessor

    reward = load_reward(RewardSpec(kind, source=str(clip_model_dir), processor=str(clip_processor_dir)))
    processor = AutoProcessor.from_pretrained(clip_processor_dir)
    eot = reward.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    upstream = processor(text=HOSTILE, padding=True, truncation=True, max_length=77, return_tensors="pt").input_ids
    assert _through_eot(reward.tokenize(HOSTILE).input_ids, eot) == _through_eot(upstream, eot)


def test_image_reward_text_path_is_blips_python_bert_tokenizer(tmp_path):
    """ImageReward's BLIP builds BertTokenizer (the Python one) from bert-base-uncased and adds [DEC] and [ENC]; distar
    loads the converted directory's tokenizer with AutoTokenizer. Same vocabulary, same ids, max_length 35."""
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    chars = sorted({c for p in HOSTILE for c in p.lower() if not c.isspace()} | set("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "word", "and", "more", "cafe", "##s"]
    vocab += chars + ["##" + c for c in chars]
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    upstream = BertTokenizerLegacy(str(vocab_file))
    upstream.add_special_tokens({"bos_token": "[DEC]"})
    upstream.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    upstream.save_pretrained(tmp_path / "tokenizer")
    reward = load_reward(
        RewardSpec(
            "imagereward", source=str(build_tiny_image_reward(tmp_path / "ir")), processor=str(tmp_path / "tokenizer")
        )
    )
    ours = reward.tokenize(HOSTILE)
    theirs = upstream(HOSTILE, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert ours.input_ids.tolist() == theirs.input_ids.tolist()
    assert ours.attention_mask.tolist() == theirs.attention_mask.tolist()
    assert int(ours.attention_mask[-1].sum()) == 35
