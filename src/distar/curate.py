"""Prompt-set curation: sources (TSV, CSV, JSONL, Parquet, text; local or remote) → normalised, filtered,
deduplicated, split Parquet shards with a manifest written last, stats.json and a Markdown summary.

Rules, in order, each counted in the report: non-text (a missing or non-string value; bytes that are not
UTF-8), empty after normalisation (Unicode NFC, whitespace collapsed), blocklist, over-long in CLIP tokens
(dropped, or truncated at a token boundary and counted), duplicate (exact after normalisation; optionally
case-insensitive), over the per-category cap. The split is a hash of the normalised prompt, so a prompt lands in
the same split whatever the order or the other sources. Everything streams in batches: memory holds one batch
and one 8-byte digest per kept prompt (about 10M prompts in 2 GB).
"""

from __future__ import annotations

import hashlib
import re
import sys
import time
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Literal

import numpy as np
from tqdm import tqdm

from distar import storage
from distar.errors import UserError
from distar.prompts import MANIFEST, SourceOptions, check_source, read_source, split_files

_SURROGATES = re.compile("[\ud800-\udfff]")
# ANSI escape sequences, C0/C1 control characters but tab and line breaks (whitespace, collapsed later), and the
# format characters that hide or reorder text (zero-width, bidi embeddings and overrides, word joiner, BOM); RE2
_CONTROL = (
    r"\x1b\[[0-9;?]*[ -/]*[@-~]|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\x{200b}-\x{200f}\x{202a}-\x{202e}"
    r"\x{2060}-\x{2064}\x{2066}-\x{2069}\x{feff}]"
)
RULES = ("non_text", "undecodable", "empty", "blocklist", "too_long", "duplicate", "category_cap")


@dataclass
class CurateConfig:
    sources: list[str]
    """Prompt sources: local paths or URIs (https, gs, s3, hf, …) of TSV, CSV, JSONL, Parquet or text files."""
    out: str
    """Output URI: train/ and eval/ shards, stats.json, summary.md, manifest.json."""
    column: str | None = None
    """The prompt column (default: the first of prompt, Prompt, text, caption present)."""
    category_column: str | None = None
    """A category column to keep and balance on (default: category or Category when present)."""
    tokenizer: str = "openai/clip-vit-large-patch14"
    """The CLIP tokenizer that counts tokens (hub id, directory, URI)."""
    backbone: str = "sdxl"
    """The model family whose text encoders read the prompts (`distar.backbones`): it sets the default token limit."""
    max_tokens: int | None = None
    """Longest prompt in CLIP tokens, with the start and end tokens; None: what the backbone's text encoders read
    (SDXL: 77)."""
    long_prompts: Literal["truncate", "drop"] = "truncate"
    """Over-long prompts: "truncate" (cut at a token boundary, counted) or "drop"."""
    case_insensitive: bool = False
    """Deduplicate ignoring case."""
    blocklist: str | None = None
    """A file of words or phrases, one a line; prompts containing any (whole words, any case) are dropped."""
    eval_fraction: float = 0.02
    """Share of prompts in the eval split (by a hash of the normalised prompt)."""
    max_per_category: int = 0
    """Keep at most this many prompts per category (0: no cap)."""
    shard_rows: int = 1_000_000
    """Rows per output Parquet shard."""
    batch_rows: int = 65_536
    """Rows read and processed at a time."""
    max_chars: int = 4096
    """Cut every row to this many characters before normalising and tokenizing (counted as `cut_chars`): 77 CLIP
    tokens never span that many, so no result changes, and a single multi-megabyte line costs no more than a
    prompt."""


def normalise(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).split())


# Python's str.split() whitespace (every character whose isspace() is true; tests/integration/test_curate.py checks),
# as one RE2 character class (RE2's \s is ASCII-only).
_WHITESPACE = (
    r"[\x{9}-\x{d}\x{1c}-\x{20}\x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}]+"
)


def normalise_array(values):
    """`normalise` over a pyarrow string array in Arrow kernels (nulls stay null): NFC, whitespace runs → one
    space, trimmed. Equal to the Python function for every string (tests/integration/test_curate.py)."""
    import pyarrow.compute as pc

    collapsed = pc.replace_substring_regex(pc.utf8_normalize(values, "NFC"), _WHITESPACE, " ")
    return pc.utf8_trim(collapsed, " ")


def _as_string_array(values):
    """A batch's prompt values as a pyarrow string array; values that are not text become nulls."""
    import pyarrow as pa

    if isinstance(values, pa.Array | pa.ChunkedArray):
        if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            return values
        return pa.nulls(len(values), pa.string())
    return pa.array([v if isinstance(v, str) else None for v in values], pa.string())


class _ShardWriter:
    def __init__(self, out: str, split: str, shard_rows: int, with_category: bool):
        self.fs, path = storage.filesystem(out)
        self.dir = f"{path.rstrip('/')}/{split}"
        self.split, self.shard_rows, self.with_category = split, shard_rows, with_category
        self.buffer: dict[str, list] = {k: [] for k in self._columns()}
        self.files: list[dict] = []
        self.rows = 0

    def _columns(self):
        return ["prompt", "id", "source", "tokens"] + (["category"] if self.with_category else [])

    def add_rows(self, columns: dict[str, list]) -> None:
        """Append rows given as columns; full shards are written as they fill. A source without the category
        column that the first source had gives its rows no category (None)."""
        n = len(columns["prompt"])
        for k in self._columns():
            self.buffer[k].extend(columns[k] if k != "category" or len(columns[k]) == n else [None] * n)
        while len(self.buffer["prompt"]) >= self.shard_rows:
            rest = {k: v[self.shard_rows :] for k, v in self.buffer.items()}
            self.buffer = {k: v[: self.shard_rows] for k, v in self.buffer.items()}
            self.flush()
            self.buffer = rest

    def flush(self):
        import pyarrow as pa
        import pyarrow.parquet as pq

        n = len(self.buffer["prompt"])
        if n == 0:
            return
        types = {
            "prompt": pa.string(),
            "id": pa.string(),
            "source": pa.string(),
            "tokens": pa.int32(),
            "category": pa.string(),
        }
        table = pa.table({k: pa.array(v, types[k]) for k, v in self.buffer.items()})
        name = f"part-{len(self.files):05d}.parquet"
        self.fs.makedirs(self.dir, exist_ok=True)
        with self.fs.open(f"{self.dir}/{name}", "wb") as fh:
            pq.write_table(table, fh)
        self.files.append({"path": f"{self.split}/{name}", "rows": n})
        self.rows += n
        self.buffer = {k: [] for k in self._columns()}


def _load_blocklist(uri: str | None) -> re.Pattern | None:
    if not uri:
        return None
    fs, path = storage.filesystem(uri)
    if not fs.exists(path):
        raise UserError(f"blocklist {uri!r} does not exist")
    words = [w.strip() for w in fs.cat_file(path).decode("utf-8", errors="replace").splitlines()]
    words = [w for w in words if w and not w.startswith("#")]
    if not words:
        return None
    return re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)


def _load_tokenizer(source: str):
    from transformers import AutoTokenizer

    from distar import sources

    root = sources.resolve_dir(source, allow_patterns=["*.json", "*.txt"])
    sub = root / "tokenizer" if (root / "tokenizer").is_dir() else root
    tokenizer = AutoTokenizer.from_pretrained(sub, use_fast=True)
    tokenizer.model_max_length = 1 << 30  # lengths are counted and handled here, not warned about per prompt
    return tokenizer


def _token_counts(tokenizer, texts: list[str]) -> list[int]:
    """CLIP tokens of each text without the start and end tokens: one parallel call into the Rust tokenizer, lengths
    only (offsets are asked for the few prompts that are cut)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [len(e) for e in encode(texts, add_special_tokens=False)]


class TokenCounter:
    """CLIP tokens of normalised prompts (no start and end tokens), counted once per distinct word.

    CLIP's tokenizer normalises (NFC, whitespace runs to one space, lower case), splits into pre-tokens that never
    hold a space, and runs BPE on each pre-token: so the count of a prompt whose only whitespace is single spaces
    is the sum of the counts of its space-separated words. Prompt sets reuse a small vocabulary, so each distinct
    word is counted once, by the tokenizer itself, and remembered. The identity is checked against the tokenizer
    on the first prompts of every batch; for a tokenizer where it fails, every prompt is counted whole."""

    def __init__(self, tokenizer, check: int = 256):
        self.tokenizer, self.check = tokenizer, check
        self.words: dict[str, int] = {}
        self.offsets: dict[str, list[tuple[int, int]]] = {}
        self.per_word = True
        self.cuts_checked = 0

    def __call__(self, texts: list[str]) -> np.ndarray:
        import pyarrow as pa
        import pyarrow.compute as pc

        whole = lambda: np.asarray(_token_counts(self.tokenizer, texts), dtype=np.int64)  # noqa: E731
        if not self.per_word:
            return whole()
        words = pc.split_pattern(pa.array(texts, pa.string()), " ")
        encoded = pc.dictionary_encode(pc.list_flatten(words))
        distinct = encoded.dictionary.to_pylist()
        new = [w for w in distinct if w not in self.words]
        if new:
            self.words.update(zip(new, _token_counts(self.tokenizer, new), strict=True))
        per_distinct = np.fromiter((self.words[w] for w in distinct), dtype=np.int64, count=len(distinct))
        offsets = words.offsets.to_numpy()
        counts = np.add.reduceat(per_distinct[encoded.indices.to_numpy()], offsets[:-1] - offsets[0])
        sample = texts[: self.check]
        if _token_counts(self.tokenizer, sample) != counts[: len(sample)].tolist():
            self.per_word = False
            return whole()
        return counts

    def cut(self, text: str, body: int) -> str:
        """`text` cut after its body-th token, at the token's end (then right-stripped), as cutting the whole
        prompt's token offsets would: the word holding that token is the only one tokenized, with offsets."""
        if self.per_word:
            start = seen = 0
            for word in text.split(" "):
                n = self.words[word]
                if seen + n >= body:
                    if word not in self.offsets:
                        encoding = self.tokenizer(word, add_special_tokens=False, return_offsets_mapping=True)
                        self.offsets[word] = encoding["offset_mapping"]
                    cut = text[: start + self.offsets[word][body - seen - 1][1]].rstrip()
                    if self.cuts_checked < self.check:  # the same check as the counts, on the first cuts
                        self.cuts_checked += 1
                        if cut != self._cut_whole(text, body):
                            self.per_word = False
                            return self._cut_whole(text, body)
                    return cut
                seen += n
                start += len(word) + 1
        return self._cut_whole(text, body)

    def _cut_whole(self, text: str, body: int) -> str:
        offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return text[: offsets[body - 1][1]].rstrip()


@dataclass
class Candidates:
    """One batch of prompts on its way through the rules: the normalised texts (None: not text), their categories,
    and which are still kept. Token counts and digests are filled in by the rules that need them."""

    texts: list
    categories: list | None
    keep: np.ndarray
    tokens: np.ndarray | None = None
    digests: list | None = None

    def kept(self) -> np.ndarray:
        return np.flatnonzero(self.keep)


class Curation:
    """What the rules share across batches: the config, the tokenizer's counter, the blocklist, the digests seen,
    the per-category counts and the tallies the report gives."""

    def __init__(self, config: CurateConfig, counter: TokenCounter, blocklist: re.Pattern | None):
        self.config, self.counter, self.blocklist = config, counter, blocklist
        self.seen: set[bytes] = set()
        self.per_category: Counter = Counter()
        self.truncated = 0


# The rules, in order: each looks at the kept prompts of a batch and returns the rows it drops (a boolean mask).


def drop_non_text(c: Candidates, run: Curation) -> np.ndarray:
    """A missing or non-string value."""
    return np.fromiter((t is None for t in c.texts), dtype=bool, count=len(c.texts))


def drop_empty(c: Candidates, run: Curation) -> np.ndarray:
    """Nothing left after normalisation (NFC, whitespace runs collapsed, trimmed)."""
    return np.fromiter((t is not None and not t for t in c.texts), dtype=bool, count=len(c.texts))


def drop_blocklist(c: Candidates, run: Curation) -> np.ndarray:
    """A blocklisted word or phrase (whole words, any case)."""
    drop = np.zeros(len(c.texts), dtype=bool)
    if run.blocklist is not None:
        for k in c.kept():
            drop[k] = run.blocklist.search(c.texts[k]) is not None
    return drop


def drop_too_long(c: Candidates, run: Curation) -> np.ndarray:
    """Over `max_tokens` CLIP tokens: dropped under long_prompts="drop"; else cut at a token boundary (kept,
    counted in `truncated`)."""
    kept = c.kept()
    body = run.config.max_tokens - 2  # without the start and end tokens
    c.tokens = np.zeros(len(c.texts), dtype=np.int64)
    drop = np.zeros(len(c.texts), dtype=bool)
    if not len(kept):
        return drop
    c.tokens[kept] = run.counter([c.texts[k] for k in kept])
    for k in kept[c.tokens[kept] > body]:  # rare
        if run.config.long_prompts == "drop":
            drop[k] = True
            continue
        c.texts[k] = run.counter.cut(c.texts[k], body)
        c.tokens[k] = body
        run.truncated += 1
    return drop


def drop_repeats(c: Candidates, run: Curation) -> dict[str, np.ndarray]:
    """ "duplicate": the same prompt as one kept before (exact after normalisation; optionally ignoring case);
    "category_cap": over `max_per_category` prompts of its category. Decided together, row by row: a prompt the
    cap drops is not kept, so a later copy of it is judged by the cap again rather than called a duplicate."""
    n = len(c.texts)
    c.digests = [None] * n
    duplicate, capped = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    cap = run.config.max_per_category if c.categories is not None else 0
    for k in c.kept():
        key = c.texts[k].casefold() if run.config.case_insensitive else c.texts[k]
        c.digests[k] = digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
        category = c.categories[k] if c.categories is not None else None
        if digest in run.seen:
            duplicate[k] = True
        elif cap and run.per_category[category] >= cap:
            capped[k] = True
        else:
            run.seen.add(digest)
            run.per_category[category] += 1
    return {"duplicate": duplicate, "category_cap": capped}


RULE_FUNCTIONS = {
    "non_text": drop_non_text,
    "empty": drop_empty,
    "blocklist": drop_blocklist,
    "too_long": drop_too_long,
    "duplicate+category_cap": drop_repeats,
}
"""Every rule but "undecodable" (bytes that are not UTF-8, which the readers count), in order; a rule returns the
rows it drops, or one mask per reason."""


def _candidates(rows, config: CurateConfig, cut: Counter) -> Candidates:
    """A batch's prompts normalised in Arrow kernels (values over max_chars cut first, counted in `cut`)."""
    import pyarrow.compute as pc

    values = _as_string_array(rows.prompts)
    over = pc.fill_null(pc.greater(pc.utf8_length(values), config.max_chars), False)
    if pc.any(over).as_py():
        cut["chars"] += pc.sum(over).as_py()
        values = pc.utf8_slice_codeunits(values, 0, config.max_chars)
    hidden = pc.fill_null(pc.match_substring_regex(values, _CONTROL), False)
    if pc.any(hidden).as_py():  # terminal escapes, NUL, bell, bidi overrides, BOM, zero-width: invisible in a report
        cut["control"] += pc.sum(hidden).as_py()
        values = pc.replace_substring_regex(values, _CONTROL, "")
    texts = normalise_array(values).to_pylist()
    categories = None
    if rows.categories is not None:
        # a category with undecodable bytes keeps its row (the prompt decides that), its bad bytes as U+FFFD
        categories = [None if c is None else _SURROGATES.sub("\ufffd", str(c)) for c in rows.categories]
    return Candidates(texts, categories, np.ones(len(texts), dtype=bool))


def _split_rows(c: Candidates, uri: str, eval_fraction: float) -> dict[str, dict]:
    """The kept rows of each split. A prompt's split is the position of its hash in [0, 1): the same whatever the
    order or the other sources."""
    kept = c.kept()
    tokens = c.tokens[kept] + 2
    position = np.frombuffer(b"".join(c.digests[k] for k in kept), dtype=">u8").astype(np.float64) / 2**64
    out = {}
    for split, mask in (("train", position >= eval_fraction), ("eval", position < eval_fraction)):
        rows = kept[mask]
        out[split] = {
            "prompt": [c.texts[k] for k in rows],
            "id": [c.digests[k].hex() for k in rows],
            "source": [uri] * len(rows),
            "tokens": tokens[mask].tolist(),
            "category": [c.categories[k] for k in rows] if c.categories is not None else [],
        }
    return out


def curate(config: CurateConfig, progress: bool = False) -> dict:
    """Run the curation; returns the stats (also written to {out}/stats.json)."""
    if not config.sources:
        raise UserError("no --source given; name at least one prompt file or URI")
    from distar import tiny_preset

    tiny_preset.prepare(config.tokenizer)
    if config.max_tokens is None:
        from distar import backbones

        if config.backbone not in backbones.NAMES:
            raise UserError(f"--backbone {config.backbone!r}: choose one of {', '.join(backbones.NAMES)}")
        config = replace(config, max_tokens=backbones.get(config.backbone).max_prompt_tokens)
    if config.long_prompts not in ("truncate", "drop"):
        raise UserError(f"--long-prompts {config.long_prompts!r}: choose truncate or drop")
    if not 0.0 <= config.eval_fraction < 1.0:
        raise UserError(f"--eval-fraction must be in [0, 1), got {config.eval_fraction}")
    if config.max_tokens < 3:
        raise UserError(f"--max-tokens must be at least 3, got {config.max_tokens}")
    for uri in config.sources:  # every source is checked before anything is read or written
        check_source(*storage.filesystem(uri), uri)

    started = time.perf_counter()
    run = Curation(config, TokenCounter(_load_tokenizer(config.tokenizer)), _load_blocklist(config.blocklist))
    storage.check_output("--out", config.out)
    fs, out_path = storage.filesystem(config.out)
    if fs.exists(f"{out_path.rstrip('/')}/{MANIFEST}"):
        raise UserError(f"{config.out!r} already holds a curated set ({MANIFEST}); choose another --out")
    for split in ("train", "eval"):  # leftovers of an interrupted run: no manifest refers to them
        if fs.exists(f"{out_path.rstrip('/')}/{split}"):
            fs.rm(f"{out_path.rstrip('/')}/{split}", recursive=True)

    # Categories are known after the first batch; writers are made then.
    writers: dict[str, _ShardWriter] = {}
    dropped, cut, lengths = Counter(), Counter(), Counter()
    rows_in = 0
    per_source = {}
    for uri in config.sources:
        source_in = 0
        bar = tqdm(desc=f"distar curate {uri.rsplit('/', 1)[-1]}", total=_rows_hint(uri), unit=" prompts",
                   unit_scale=True, file=sys.stderr, dynamic_ncols=True)  # fmt: skip
        for rows in read_source(uri, SourceOptions(config.column, config.category_column, config.batch_rows)):
            rows_in += len(rows.prompts) + rows.undecodable
            source_in += len(rows.prompts) + rows.undecodable
            bar.update(len(rows.prompts) + rows.undecodable)
            dropped["undecodable"] += rows.undecodable
            if not writers:
                with_category = rows.categories is not None
                writers = {s: _ShardWriter(config.out, s, config.shard_rows, with_category) for s in ("train", "eval")}
            batch = _candidates(rows, config, cut)
            for name, rule in RULE_FUNCTIONS.items():
                drops = rule(batch, run)
                for reason, drop in drops.items() if isinstance(drops, dict) else [(name, drops)]:
                    drop &= batch.keep
                    dropped[reason] += int(drop.sum())
                    batch.keep &= ~drop
            if not batch.keep.any():
                continue
            tokens = batch.tokens[batch.keep] + 2
            lengths.update(dict(zip(*(v.tolist() for v in np.unique(tokens, return_counts=True)), strict=True)))
            for split, columns in _split_rows(batch, uri, config.eval_fraction).items():
                writers[split].add_rows(columns)
        bar.close()
        per_source[uri] = source_in
    return _finish(config, fs, out_path, writers, run, dropped, cut, lengths, rows_in, per_source, started)


def _rows_hint(uri: str) -> int | None:
    """The row count of a single Parquet file from its footer (the bar's total, so it shows an ETA); None for
    text formats and directories, which are counted as they stream."""
    if not uri.endswith(".parquet"):
        return None
    try:
        import pyarrow.parquet as pq

        fs, path = storage.filesystem(uri)
        with fs.open(path, "rb") as fh:
            return pq.ParquetFile(fh).metadata.num_rows
    except Exception:  # the reader names what is wrong with the file; a missing total only loses the ETA
        return None


def _finish(config, fs, out_path, writers, run, dropped, cut, lengths, rows_in, per_source, started) -> dict:
    """Flush the shards; write stats.json, summary.md and, last, the manifest."""
    for w in writers.values():
        w.flush()
    rows_out = sum(w.rows for w in writers.values())
    stats = {
        "rows_in": rows_in,
        "rows_out": rows_out,
        "dropped": {r: dropped.get(r, 0) for r in RULES},
        "truncated": run.truncated,
        "cut_chars": cut["chars"],
        "control_chars_removed": cut["control"],
        "splits": {s: w.rows for s, w in writers.items()},
        "per_source": per_source,
        "length_histogram": _histogram(lengths, config.max_tokens),
        "categories": {str(k): v for k, v in sorted(run.per_category.items(), key=lambda kv: str(kv[0]))}
        if writers and writers["train"].with_category
        else {},
        "seconds": round(time.perf_counter() - started, 3),
        "config": asdict(config),
    }
    if rows_out == 0:
        raise UserError(
            f"no prompt is left after curation ({rows_in} rows in; dropped: "
            + ", ".join(f"{k} {v}" for k, v in stats["dropped"].items() if v)
            + f"); check the sources ({', '.join(config.sources)}), --column and the filters"
        )
    root = out_path.rstrip("/")
    storage.write_json(fs, f"{root}/stats.json", stats)
    fs.pipe_file(f"{root}/summary.md", summary_markdown(stats).encode())
    manifest = {
        "kind": "distar.prompts",
        "version": 1,
        "columns": writers["train"]._columns(),
        "splits": {s: {"rows": w.rows, "files": w.files} for s, w in writers.items()},
        "sources": config.sources,
        "rows": rows_out,
    }
    storage.write_json(fs, f"{root}/{MANIFEST}", manifest)
    return stats


def _histogram(lengths: Counter, max_tokens: int, bins: int = 8) -> list[dict]:
    width = max(1, -(-max_tokens // bins))
    hist = []
    for lo in range(0, max_tokens + 1, width):
        hi = min(lo + width - 1, max_tokens)
        hist.append({"tokens": f"{lo}-{hi}", "prompts": sum(v for k, v in lengths.items() if lo <= k <= hi)})
    return hist


def summary_markdown(stats: dict) -> str:
    lines = [
        "# Prompt-set curation",
        "",
        f"{stats['rows_in']} rows in, {stats['rows_out']} prompts out "
        f"(train {stats['splits'].get('train', 0)}, eval {stats['splits'].get('eval', 0)}); "
        f"{stats['truncated']} truncated to the token limit.",
        "",
        "| rule | dropped |",
        "|---|---|",
    ]
    lines += [f"| {rule} | {n} |" for rule, n in stats["dropped"].items()]
    lines += ["", "| source | rows in |", "|---|---|"] + [f"| {s} | {n} |" for s, n in stats["per_source"].items()]
    lines += ["", "| CLIP tokens | prompts |", "|---|---|"]
    lines += [f"| {h['tokens']} | {h['prompts']} |" for h in stats["length_histogram"]]
    if stats["categories"]:
        lines += ["", "| category | prompts |", "|---|---|"] + [
            f"| {k} | {v} |" for k, v in stats["categories"].items()
        ]
    return "\n".join(lines) + "\n"


__all__ = ["CurateConfig", "curate", "normalise", "split_files", "summary_markdown"]
