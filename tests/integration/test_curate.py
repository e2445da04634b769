"""`distar curate` on the real Parti prompts and on malformed inputs."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers.storage_servers import server

from distar.curate import CurateConfig, curate
from distar.errors import UserError
from distar.train.data import PromptSet

PARTI = Path(__file__).resolve().parents[1] / "data" / "PartiPrompts.tsv"


def config(out, *sources, **kwargs) -> CurateConfig:
    return CurateConfig(sources=[str(s) for s in sources], out=str(out), tokenizer="tiny:sdxl", **kwargs)


def read_split(out: Path, split: str) -> list[dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    rows = []
    for f in manifest["splits"][split]["files"]:
        rows += pq.read_table(out / f["path"]).to_pylist()
    assert len(rows) == manifest["splits"][split]["rows"]
    return rows


@pytest.fixture(scope="module")
def parti(tmp_path_factory):
    out = tmp_path_factory.mktemp("parti") / "prompts"
    return out, curate(config(out, PARTI, shard_rows=500))


def test_parti_counts_add_up_and_every_kept_prompt_is_clean(parti):
    out, stats = parti
    assert stats["rows_in"] == 1632
    assert stats["rows_out"] + sum(stats["dropped"].values()) == stats["rows_in"]
    assert stats["dropped"]["duplicate"] > 0  # Parti repeats some prompts
    rows = read_split(out, "train") + read_split(out, "eval")
    assert len(rows) == stats["rows_out"] and len(rows) > 1500
    prompts = [r["prompt"] for r in rows]
    assert len(set(prompts)) == len(prompts)
    assert all(p == unicodedata.normalize("NFC", p) and p == " ".join(p.split()) and p for p in prompts)
    assert all(2 < r["tokens"] <= 77 for r in rows)
    assert {r["category"] for r in rows} >= {"Animals", "People", "Vehicles"}
    assert stats["truncated"] > 0 and sum(h["prompts"] for h in stats["length_histogram"]) == stats["rows_out"]
    assert 0 < stats["splits"]["eval"] < 0.05 * stats["rows_out"]
    assert len(json.loads((out / "manifest.json").read_text())["splits"]["train"]["files"]) == 4  # 500 rows a shard
    summary = (out / "summary.md").read_text()
    assert "| duplicate | " in summary and "1632 rows in" in summary


def test_split_depends_on_the_prompt_only(parti, tmp_path):
    out, _ = parti
    other = tmp_path / "with-extra"
    extra = tmp_path / "extra.txt"
    extra.write_text("a photograph of an astronaut riding a horse\nan oil painting of a lighthouse\n")
    curate(config(other, extra, PARTI))
    before = {r["id"] for r in read_split(out, "eval")}
    after = {r["id"] for r in read_split(other, "eval")}
    assert before <= after


def test_trainer_reads_the_train_split(parti):
    out, stats = parti
    assert len(PromptSet(str(out))) == stats["splits"]["train"]


def test_rules_blocklist_case_dedupe_category_cap_and_drop(tmp_path):
    src = tmp_path / "p.tsv"
    src.write_text(
        "prompt\tcategory\n"
        "A Red  Cat\tanimals\na red cat\tanimals\nA dog with a gun\tanimals\n"
        "  \tanimals\nCafe\u0301 at night\tplaces\nCaf\u00e9 at night\tplaces\nfish\tanimals\n"
        + "x" * 200
        + "\tplaces\n"
    )
    block = tmp_path / "block.txt"
    block.write_text("# weapons\ngun\n")
    stats = curate(
        config(
            tmp_path / "o1",
            src,
            blocklist=str(block),
            case_insensitive=True,
            long_prompts="drop",
            max_per_category=1,
            eval_fraction=0.0,
        )
    )
    assert stats["dropped"] == {
        "non_text": 0,
        "undecodable": 0,
        "empty": 1,
        "blocklist": 1,
        "too_long": 1,
        "duplicate": 2,
        "category_cap": 1,
    }
    kept = sorted(r["prompt"] for r in read_split(tmp_path / "o1", "train"))
    assert kept == ["A Red Cat", "Café at night"]  # NFC: the two spellings of Café are one prompt


def test_undecodable_bytes_and_non_text_rows_are_reported(tmp_path):
    txt = tmp_path / "bad.txt"
    txt.write_bytes(b"a good prompt\n\xff\xfe broken bytes\nanother good one\n")
    tsv = tmp_path / "bad.tsv"
    tsv.write_bytes(b"prompt\nfine prompt\n\xc3\x28 invalid\n")
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"prompt": "ok prompt"}\n{"prompt": 42}\n{"prompt": null}\n')
    stats = curate(config(tmp_path / "o", txt, tsv, jsonl))
    assert stats["dropped"]["undecodable"] == 2 and stats["dropped"]["non_text"] == 2
    assert stats["rows_out"] == 4 and stats["rows_in"] == 8


def test_bad_inputs_fail_with_one_clear_message_and_write_no_manifest(tmp_path):
    tsv = tmp_path / "p.tsv"
    tsv.write_text("text_a\tcategory\nhello\tx\n")
    with pytest.raises(UserError, match=r"no prompt column \(columns: text_a, category\)"):
        curate(config(tmp_path / "o1", tsv))
    with pytest.raises(UserError, match="no prompt column 'Prompt'"):
        curate(config(tmp_path / "o1", tsv, column="Prompt"))
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    with pytest.raises(UserError, match="is empty"):
        curate(config(tmp_path / "o2", empty))
    with pytest.raises(UserError, match="does not exist"):
        curate(config(tmp_path / "o3", tmp_path / "missing.tsv"))
    with pytest.raises(UserError, match="unknown format"):
        curate(config(tmp_path / "o4", tmp_path / "prompts.xlsx"))
    block = tmp_path / "all.txt"
    block.write_text("hello\n")
    with pytest.raises(UserError, match=r"no prompt is left after curation \(1 rows in; dropped: blocklist 1\)"):
        curate(config(tmp_path / "o5", tsv, column="text_a", blocklist=str(block)))
    assert not (tmp_path / "o5" / "manifest.json").exists()
    bad_json = tmp_path / "b.jsonl"
    bad_json.write_text('{"prompt": "x"}\n{not json}\n')
    with pytest.raises(UserError, match="line 2 is not JSON"):
        curate(config(tmp_path / "o6", bad_json))
    ok = curate(config(tmp_path / "o7", tsv, column="text_a"))
    assert ok["rows_out"] == 1
    with pytest.raises(UserError, match="already holds a curated set"):
        curate(config(tmp_path / "o7", tsv, column="text_a"))


def test_cli_exit_code_2_on_bad_input(tmp_path, capsys):
    from distar.cli import main

    assert main(["curate", "--source", str(tmp_path / "none.tsv"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_curate_to_object_storage_and_train_reads_it(scheme, tmp_path):
    import fsspec

    parquet = tmp_path / "src.parquet"
    import pyarrow as pa

    pq.write_table(pa.table({"caption": [f"prompt number {i}" for i in range(50)] + ["prompt number 3"]}), parquet)
    with server(scheme, "curated"):
        uri = f"{scheme}://curated/sets/a"
        source = f"{scheme}://curated/sources/src.parquet"  # a remote source too
        fs, _ = fsspec.core.url_to_fs(uri)
        fs.put_file(str(parquet), "curated/sources/src.parquet")
        stats = curate(config(uri, source))
        assert stats["rows_out"] == 50 and stats["dropped"]["duplicate"] == 1
        fs.invalidate_cache()
        assert fs.exists("curated/sets/a/manifest.json") and fs.exists("curated/sets/a/summary.md")
        assert len(PromptSet(uri)) == stats["splits"]["train"]


def test_arrow_normalisation_equals_the_python_rule_on_every_whitespace_and_unicode_form():
    import random

    import pyarrow as pa

    from distar.curate import normalise, normalise_array

    rng = random.Random(0)
    alphabet = [chr(c) for c in range(0x110000) if chr(c).isspace()] + list("aZé😀\x00") + ["e\u0301", "\u212b"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(5000)]
    assert normalise_array(pa.array(texts + [None])).to_pylist() == [normalise(t) for t in texts] + [None]


def test_token_counts_equal_the_tokenizers_own_lengths(tiny_root):
    from distar.curate import _load_tokenizer, _token_counts

    tokenizer = _load_tokenizer("tiny:sdxl")
    texts = [row.split("\t")[0] for row in PARTI.read_text().splitlines()[1:200]]
    expected = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    assert _token_counts(tokenizer, texts) == expected


def test_whitespace_class_is_exactly_pythons():
    import pyarrow as pa
    import pyarrow.compute as pc

    from distar.curate import _WHITESPACE

    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]  # every code point UTF-8 can hold
    matched = pc.match_substring_regex(pa.array(chars), f"^{_WHITESPACE}$").to_pylist()
    assert {c for c, m in zip(chars, matched, strict=True) if m} == {c for c in chars if c.isspace()}


def test_word_level_token_counts_equal_whole_prompt_counts(tiny_root):
    from distar.curate import TokenCounter, _load_tokenizer, _token_counts, normalise

    tokenizer = _load_tokenizer("tiny:sdxl")
    rows = PARTI.read_text().splitlines()[1:]
    texts = [normalise(r.split("\t")[0]) for r in rows if normalise(r.split("\t")[0])]
    counter = TokenCounter(tokenizer, check=0)  # no sampled check: the per-word sum itself is under test
    assert counter(texts).tolist() == _token_counts(tokenizer, texts)
    assert counter.per_word and len(counter.words) < sum(len(t.split()) for t in texts)


def test_token_counter_falls_back_where_words_do_not_add_up():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from distar.curate import TokenCounter, _token_counts

    # Byte-level BPE without a merge for "Ġb": "a b" is a, Ġ, b (3 tokens) but "a" + "b" is 2.
    backend = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "Ġ": 2}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    counter = TokenCounter(tokenizer)
    texts = ["a b", "b a a", "ab"]
    assert counter(texts).tolist() == _token_counts(tokenizer, texts) == [3, 5, 2]
    assert not counter.per_word


def test_word_level_cut_equals_cutting_the_whole_prompts_offsets(tiny_root):
    from distar.curate import TokenCounter, _load_tokenizer, normalise

    tokenizer = _load_tokenizer("tiny:sdxl")
    rows = PARTI.read_text().splitlines()[1:]
    texts = [t for t in (normalise(r.split("\t")[0]) for r in rows) if t]
    counter = TokenCounter(tokenizer, check=0)  # the per-word path alone
    counts = counter(texts)
    for body in (1, 7, 30):
        for text, n in zip(texts, counts.tolist(), strict=True):
            if n > body:
                assert counter.cut(text, body) == counter._cut_whole(text, body)
    assert counter.per_word and counter.offsets


def test_the_readmes_two_sources_one_with_categories_one_without(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distar.curate import CurateConfig, curate

    captions = tmp_path / "captions.parquet"
    pq.write_table(pa.table({"caption": ["a dog asleep on a beach", "a red bicycle by a wall"]}), captions)
    parti = str(Path(__file__).parents[1] / "data" / "PartiPrompts.tsv")
    for order in ([parti, str(captions)], [str(captions), parti]):
        out = tmp_path / f"set-{len(list(tmp_path.iterdir()))}"
        stats = curate(CurateConfig(sources=order, out=str(out), tokenizer="tiny:sdxl", eval_fraction=0.0))
        table = pq.read_table(sorted((out / "train").glob("*.parquet")))
        by_source = table.group_by("source").aggregate([("prompt", "count")]).to_pydict()
        assert dict(zip(by_source["source"], by_source["prompt_count"], strict=True))[str(captions)] == 2
        assert stats["rows_out"] == table.num_rows
        if order[0] == parti:  # the first source decides the columns: the captions have no category
            rows = table.filter(pa.compute.equal(table["source"], str(captions)))
            assert rows["category"].null_count == 2


def test_control_and_format_characters_are_removed_and_counted(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distar.curate import CurateConfig, curate

    prompts = ["a \x1b[31mred\x1b[0m cube", "bell\x07 tower", "nul\x00 byte", "\u202eevil\u202c text", "\ufeffbom cat",
               "\u200b\u200d", "plain dog"]  # fmt: skip
    source = tmp_path / "hostile.parquet"
    pq.write_table(pa.table({"prompt": prompts}), source)
    out = tmp_path / "set"
    stats = curate(CurateConfig(sources=[str(source)], out=str(out), tokenizer="tiny:sdxl", eval_fraction=0.0))
    kept = sorted(pq.read_table(sorted((out / "train").glob("*.parquet")))["prompt"].to_pylist())
    assert kept == sorted(["a red cube", "bell tower", "nul byte", "evil text", "bom cat", "plain dog"])
    assert stats["control_chars_removed"] == 6 and stats["dropped"]["empty"] == 1  # the zero-width-only prompt


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("open.tsv", 'prompt\tcategory\n"a cat\tx\nb dog\tx\n', "line 2: a field opens a quote that no line closes"),
        ("open.csv", 'prompt,category\n"a cat,x\nb dog,x\n', "unexpected end of data"),
        ("folder", None, "is a directory: name its files"),
    ],
)
def test_an_unterminated_quote_or_a_directory_source_is_one_error_naming_it(tmp_path, name, text, message):
    source = tmp_path / name
    if text is None:
        source.mkdir()
        (source / "a.txt").write_text("a cat\n")
    else:
        source.write_text(text)
    with pytest.raises(UserError, match=message) as err:
        curate(config(tmp_path / "out", str(source)))
    assert name in str(err.value) and not (tmp_path / "out" / "manifest.json").exists()
