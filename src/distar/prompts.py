"""Prompt sets: where the paper's public sets live, the readers of prompt sources (TSV, CSV, JSONL, Parquet,
text; local or remote), and the layout of a curated set (train/ and eval/ Parquet shards, stats.json and
manifest.json, written last). Curation writes this format; training and evaluation read it. Below the steps: no
step imports another for it.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

from distar import readers, storage
from distar.errors import UserError

PARTI_URL = "https://raw.githubusercontent.com/google-research/parti/main/PartiPrompts.tsv"
"""The 1,632 Parti prompts (Apache-2.0, google-research/parti): ImageReward, aesthetic, PickScore, CLIP score."""
HPS_URL = "hf://datasets/zhwang/HPDv2/benchmark"
"""The HPSv2 benchmark prompts: one JSON list per style."""
HPS_STYLES = ("anime", "concept-art", "paintings", "photo")
"""The HPSv2 benchmark's styles; HPSv2.1 is reported per style and averaged over the four."""

PROMPT_COLUMNS = ("prompt", "Prompt", "text", "caption", "TEXT", "Text")
CATEGORY_COLUMNS = ("category", "Category")
FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "txt"}
MANIFEST = "manifest.json"
"""A curated set's manifest: its splits and their shards. Written last, so a set without one is incomplete."""
SPLITS = ("train", "eval")


@dataclass
class SourceOptions:
    """How a prompt source is read."""

    column: str | None = None
    """The prompt column (default: the first of PROMPT_COLUMNS present)."""
    category_column: str | None = None
    """A category column (default: the first of CATEGORY_COLUMNS present)."""
    batch_rows: int = 65_536
    """Rows per batch."""


@dataclass
class Rows:
    """One batch read from a source: prompt values (None = not text), categories, and undecodable rows."""

    prompts: list  # a pyarrow array for Parquet sources (no conversion on the fast path); see as_list
    categories: list | None
    undecodable: int = 0

    def as_list(self) -> list:
        """The prompt values as Python objects, whatever the source."""
        return self.prompts if isinstance(self.prompts, list) else self.prompts.to_pylist()


def check_source(fs, path: str, uri: str) -> str:
    """A prompt source that exists, is a file (or a Parquet dataset directory) and has a known format; returns the
    format, or raises the one UserError naming the source."""
    if fs.isdir(path) and not path.rstrip("/").endswith(".parquet"):
        raise UserError(f"source {uri!r} is a directory: name its files, one --source each")
    fmt = check_format(uri)
    if not fs.exists(path):
        if str(uri).startswith(("http://", "https://")):  # fsspec's HTTP exists() is False for an unreachable host too
            raise UserError(f"source {uri!r} could not be fetched (no such file, or the host is unreachable)")
        raise UserError(f"source {uri!r} does not exist")
    return fmt


def check_format(uri: str) -> str:
    """The format of a prompt source, from its name; a UserError naming the source otherwise."""
    name = uri.rsplit("/", 1)[-1].lower()
    for ext, fmt in FORMATS.items():
        if name.endswith(ext) or name.endswith(ext + ".gz"):
            return fmt
    raise UserError(f"source {uri!r}: unknown format; use a .tsv, .csv, .jsonl, .parquet or .txt file")


def _pick(columns: list[str], wanted: str | None, defaults: tuple[str, ...], uri: str, what: str) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise UserError(f"source {uri!r} has no {what} column {wanted!r} (columns: {', '.join(columns)})")
        return wanted
    found = next((c for c in defaults if c in columns), None)
    if found is None and what == "prompt":
        raise UserError(f"source {uri!r} has no prompt column (columns: {', '.join(columns)}); name it with --column")
    return found


def read_source(uri: str, options: SourceOptions | None = None) -> Iterator[Rows]:
    """The rows of one prompt source, in batches of `options.batch_rows`; a UserError naming the source for a
    missing, empty or malformed one."""
    config = options or SourceOptions()
    fs, path = storage.filesystem(uri)
    fmt = check_source(fs, path, uri)
    if fs.size(path) == 0:
        raise UserError(f"source {uri!r} is empty")
    compression = "gzip" if path.endswith(".gz") else None
    import pyarrow as pa

    with fs.open(path, "rb", compression=compression) as fh:
        try:
            if fmt == "parquet":
                yield from _read_parquet(fh, uri, config)
            elif fmt == "txt":
                yield from _read_lines(fh, config)
            elif fmt == "jsonl":
                yield from _read_jsonl(fh, uri, config)
            else:
                yield from _read_delimited(fh, uri, config, "\t" if fmt == "tsv" else ",")
        except (pa.ArrowException, EOFError, OSError, UnicodeDecodeError) as err:  # truncated or corrupt
            if isinstance(err, OSError) and storage.user_error(err) is not None:
                raise
            raise UserError(f"source {uri!r} is corrupt or truncated ({err}); write or fetch it again") from None


def _read_parquet(fh, uri, config):
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(fh)
    columns = pf.schema_arrow.names
    col = _pick(columns, config.column, PROMPT_COLUMNS, uri, "prompt")
    cat = _pick(columns, config.category_column, CATEGORY_COLUMNS, uri, "category")
    for batch in pf.iter_batches(batch_size=config.batch_rows, columns=[c for c in (col, cat) if c]):
        cats = _valid_utf8(batch.column(cat)).to_pylist() if cat else None
        yield Rows(_valid_utf8(batch.column(col)), cats)


def _valid_utf8(values):
    """A string column whose values that are not UTF-8 (Parquet does not check) are None: rows curation drops."""
    import pyarrow as pa

    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        return values
    try:
        values.validate(full=True)
        return values
    except pa.ArrowInvalid:
        return _undecodable(values)


def _undecodable(values):
    """A string column whose invalid UTF-8 values are replaced by None, which curation counts as undecodable."""
    import pyarrow as pa

    out = []
    for v in values.cast(pa.binary()).to_pylist():
        try:
            out.append(None if v is None else v.decode("utf-8"))
        except UnicodeDecodeError:
            out.append(None)
    return pa.array(out, pa.string())


def _decode_lines(fh) -> Iterator[str | None]:
    """Each line of a binary stream, or None for a line that is not UTF-8."""
    for raw in fh:
        try:
            yield raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            yield None


def _read_lines(fh, config):
    batch, bad = [], 0
    for line in _decode_lines(fh):
        if line is None:
            bad += 1
            continue
        batch.append(line)
        if len(batch) >= config.batch_rows:
            yield Rows(batch, None, bad)
            batch, bad = [], 0
    yield Rows(batch, None, bad)


def _read_jsonl(fh, uri, config):
    col = cat = None
    batch, cats, bad = [], [], 0
    for n, line in enumerate(_decode_lines(fh), 1):
        if line is None:
            bad += 1
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"source {uri!r} line {n} is not JSON ({err.msg}); fix or remove it") from None
        if not isinstance(record, dict):
            raise UserError(f"source {uri!r} line {n} is a JSON {type(record).__name__}, not an object")
        if col is None:
            col = _pick(list(record), config.column, PROMPT_COLUMNS, uri, "prompt")
            cat = _pick(list(record), config.category_column, CATEGORY_COLUMNS, uri, "category")
        batch.append(record.get(col))
        cats.append(record.get(cat) if cat else None)
        if len(batch) >= config.batch_rows:
            yield Rows(batch, cats if cat else None, bad)
            batch, cats, bad = [], [], 0
    if col is None and not bad:
        raise UserError(f"source {uri!r} holds no JSON records")
    yield Rows(batch, cats if cat else None, bad)


def _read_delimited(fh, uri, config, delimiter):
    text = io.TextIOWrapper(fh, encoding="utf-8", errors="surrogateescape", newline="")
    # CSV has quoting, so a malformed quote is an error; TSV has none, so a quoted field never spans lines, and one
    # that does is an unterminated quote that swallowed the rows after it
    reader = csv.reader(text, delimiter=delimiter, strict=delimiter == ",")
    try:
        yield from _delimited_rows(reader, uri, config, delimiter)
    except csv.Error as err:
        raise UserError(f"source {uri!r}, line {reader.line_num}: {err} (a quote opened and never closed?)") from None


def _delimited_rows(reader, uri, config, delimiter):
    header = next(reader, None)
    if not header:
        raise UserError(f"source {uri!r} has no header row")
    col = _pick(header, config.column, PROMPT_COLUMNS, uri, "prompt")
    cat = _pick(header, config.category_column, CATEGORY_COLUMNS, uri, "category")
    ci, ki = header.index(col), (header.index(cat) if cat else None)
    batch, cats, bad = [], [], 0
    first = reader.line_num + 1  # the line the next row starts on
    for row in reader:
        value = row[ci] if ci < len(row) else None
        if delimiter == "\t" and value is not None and "\n" in value:
            raise UserError(
                f"source {uri!r}, line {first}: a field opens a quote that no line closes, so it swallows the lines "
                f"up to line {reader.line_num}; remove or close the quote"
            )
        first = reader.line_num + 1
        if value is not None and _has_surrogates(value):
            bad += 1
            continue
        batch.append(value)
        cats.append(row[ki] if ki is not None and ki < len(row) else None)
        if len(batch) >= config.batch_rows:
            yield Rows(batch, cats if cat else None, bad)
            batch, cats, bad = [], [], 0
    yield Rows(batch, cats if cat else None, bad)


_SURROGATE = re.compile("[\udc80-\udcff]")


def _has_surrogates(value: str) -> bool:
    return _SURROGATE.search(value) is not None


def split_files(uri: str, split: str = "train") -> list[str] | None:
    """The shard URIs of a split of a curated set, as its manifest lists them (None when `uri` holds no
    manifest); a UserError for a corrupt manifest or missing shards."""
    fs, path = storage.filesystem(uri)
    manifest_path = f"{path.rstrip('/')}/{MANIFEST}"
    if not fs.exists(manifest_path):
        return None
    where, fix = f"{uri}/{MANIFEST}", "run `distar curate` again"
    manifest = readers.read_mapping(fs, manifest_path, where, fix)
    splits = manifest.get("splits")
    record = splits.get(split) if isinstance(splits, dict) else None
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
        raise UserError(f"{where} lists no files for its {split!r} split; {fix}")
    for f in files:
        rel = f.get("path")
        if not readers.confined(rel):
            raise UserError(f"{where} names {rel!r}, which is no file inside the set; {fix} into a fresh --out")
        if storage.is_local(fs) and readers.leaves(path, rel):
            raise UserError(f"{where}: entry {rel!r} leads outside {path} through a link; remove the link")
    base = str(uri).rstrip("/")
    missing = [f["path"] for f in files if not fs.exists(f"{path.rstrip('/')}/{f['path']}")]
    if missing:
        raise UserError(f"{uri}: shards its manifest lists are missing ({missing[:3]}); run `distar curate` again")
    return [f"{base}/{f['path']}" for f in files]
