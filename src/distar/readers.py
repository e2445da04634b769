"""Checked readers for every file distar takes from a user or a shared location: configs, manifests, markers, the
lease, safetensors headers.

Each turns a malformed file into one UserError that names the file, says what is wrong and what to do, before any
library parses it: a nesting depth or size that would exhaust the interpreter, a field of the wrong type, a path
entry that leaves its root, a safetensors header whose lengths or offsets do not fit the file. No torch here: the
CLI checks configs before it imports the heavy stack.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path, PurePosixPath
from typing import Any

from distar.errors import UserError

MAX_DEPTH = 64
"""Nesting deeper than this is refused in every JSON/TOML file distar reads (its own files nest at most 4 deep)."""
MAX_CONFIG_BYTES = 16 << 20
MAX_RECORD_BYTES = 64 << 20
"""Manifests, markers, metadata: a real one of an SDXL run is under 1 MB."""


def _depth(value: Any) -> int:
    """The nesting depth of parsed JSON/TOML, iteratively (a recursive walk is what the check guards against)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, depth)
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest


def _parsed(parse, text, where: str, fix: str, errors: tuple) -> Any:
    fix = f"; {fix}" if fix else ""
    try:
        value = parse(text)
    except RecursionError:
        raise UserError(f"{where} nests deeper than {MAX_DEPTH} levels{fix}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{where} is not UTF-8 text ({err.reason} at byte {err.start}){fix}") from None
    except errors as err:
        raise UserError(f"{where} does not parse: {err}{fix}") from None
    if _depth(value) > MAX_DEPTH:
        raise UserError(f"{where} nests deeper than {MAX_DEPTH} levels{fix}")
    return value


def parse_json(data: bytes | str, where: str, fix: str = "") -> Any:
    """JSON from a file's bytes; every malformation (syntax, encoding, depth) is a UserError naming `where`."""
    return _parsed(json.loads, data, where, fix, (json.JSONDecodeError, ValueError))


def parse_toml(data: bytes | str, where: str, fix: str = "") -> Any:
    import tomllib

    def parse(text: bytes | str):
        return tomllib.loads(text.decode() if isinstance(text, bytes) else text)

    return _parsed(parse, data, where, fix, (tomllib.TOMLDecodeError, ValueError))


def read_bytes(fs, path: str, where: str, limit: int, fix: str = "") -> bytes:
    """The file's bytes, refused (naming the size and the limit) before it is read when it is larger than `limit`."""
    size = fs.size(path)
    if size is not None and size > limit:
        raise UserError(f"{where} is {size:,} bytes, more than the {limit:,} such a file may have; {fix or 'check it'}")
    data = fs.cat_file(path)
    if len(data) > limit:
        raise UserError(f"{where} is over {limit:,} bytes; {fix or 'check it'}")
    return data


def read_json(fs, path: str, where: str | None = None, fix: str = "", limit: int = MAX_RECORD_BYTES) -> Any:
    where = where or path
    return parse_json(read_bytes(fs, path, where, limit, fix), where, fix)


def read_mapping(fs, path: str, where: str | None = None, fix: str = "", limit: int = MAX_RECORD_BYTES) -> dict:
    """A JSON file that must hold an object."""
    where = where or path
    value = read_json(fs, path, where, fix, limit)
    if not isinstance(value, dict):
        raise UserError(f"{where} holds a JSON {type(value).__name__}, not an object{'; ' + fix if fix else ''}")
    return value


def read_config_file(path: Path, where: str) -> dict:
    """A TOML or JSON config file (by its suffix) that must hold a table."""
    from fsspec.implementations.local import LocalFileSystem

    data = read_bytes(LocalFileSystem(), str(path), where, MAX_CONFIG_BYTES)
    value = parse_json(data, where) if path.suffix == ".json" else parse_toml(data, where)
    if not isinstance(value, dict):
        raise UserError(f"{where} holds a {type(value).__name__}, not a table of config keys")
    return value


# -- typed fields ---------------------------------------------------------------------------------------------


def is_number(value: object) -> bool:
    """A finite int or float (not a bool, not an integer beyond any float)."""
    try:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(float(value))
    except OverflowError:
        return False


def number(record: dict, key: str, where: str, fix: str = "", lo: float | None = None) -> float:
    """`record[key]` as a finite float (≥ `lo` when given); anything else names the file and the field."""
    value = record.get(key)
    if not is_number(value) or (lo is not None and value < lo):
        bound = f" ≥ {lo:g}" if lo is not None else ""
        raise UserError(f"{where}: field {key!r} is {value!r}, not a finite number{bound}{'; ' + fix if fix else ''}")
    return float(value)


def integer(record: dict, key: str, where: str, fix: str = "", lo: int = 0) -> int:
    value = record.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise UserError(f"{where}: field {key!r} is {value!r}, not an integer ≥ {lo}{'; ' + fix if fix else ''}")
    return value


def text(record: dict, key: str, where: str, fix: str = "") -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise UserError(f"{where}: field {key!r} is {value!r}, not a string{'; ' + fix if fix else ''}")
    return value


# -- paths named inside files -----------------------------------------------------------------------------------


def confined(rel: object) -> bool:
    """Whether a path named in a manifest stays inside the manifest's root: a relative POSIX path with no `..`,
    no empty or `.` part, no backslash or NUL (which fsspec and the OS read differently), no name longer than a
    filesystem takes (255 bytes a part, 4096 in all)."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel or rel.startswith("/") or len(rel) > 4096:
        return False
    return all(part not in ("", ".", "..") and len(part.encode(errors="replace")) <= 255 for part in rel.split("/"))


def leaves(root: str | os.PathLike, rel: str) -> bool:
    """Whether the local path `rel` under `root` resolves outside `root` (through a link on its way)."""
    return not (Path(root) / PurePosixPath(rel)).resolve().is_relative_to(Path(root).resolve())


def check_out_path(key: str, value: str) -> None:
    """An output named by the user: no NUL or other control character (which no filesystem or bucket takes)."""
    bad = sorted({repr(c) for c in str(value) if ord(c) < 32 or ord(c) == 127})
    if bad:
        raise UserError(f"{key} {value!r} holds control characters ({', '.join(bad)}); name a plain path or URI")


# -- safetensors ----------------------------------------------------------------------------------------------

MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library's own bound
_ITEM_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U64": 64,
              "U32": 32, "U16": 16, "U8": 8, "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "C64": 64,
              "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}  # fmt: skip


def check_safetensors(path: str | os.PathLike, fix: str = "fetch the file again") -> None:
    """Refuse a safetensors file whose header cannot describe it: a header length past the file, a header that is
    not a JSON object of tensors, an unknown dtype, a negative or non-integer shape, offsets outside the data,
    overlapping, leaving gaps or not reaching the end, a byte length that does not match the shape. Reads the header
    only; nothing is allocated from it."""
    path = Path(path)
    where = f"{path} (safetensors)"
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise UserError(f"{where} is {size} bytes, shorter than a safetensors header; {fix}")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, MAX_SAFETENSORS_HEADER):
            raise UserError(f"{where}: its header claims {n:,} bytes, the file has {size - 8:,} after it; {fix}")
        header = parse_json(fh.read(n), where, fix)
    if not isinstance(header, dict):
        raise UserError(f"{where}: the header is not a JSON object; {fix}")
    data_size, spans = size - 8 - n, []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise UserError(f"{where}: __metadata__ is not a table of strings; {fix}")
            continue
        problem = _tensor_problem(info, data_size)
        if problem:
            raise UserError(f"{where}: tensor {name[:80]!r} {problem}; {fix}")
        spans.append((info["data_offsets"][0], info["data_offsets"][1], name))
    spans.sort()
    end, previous = 0, "the header"
    for begin, stop, name in spans:  # the library wants the tensors to tile the data exactly
        if begin != end:
            problem = "overlaps" if begin < end else "leaves a gap after"
            raise UserError(f"{where}: tensor {name[:80]!r} {problem} {previous[:80]!r}; {fix}")
        end, previous = stop, name
    if end != data_size:
        raise UserError(f"{where}: its tensors take {end:,} bytes, the file holds {data_size:,} (truncated?); {fix}")


def _tensor_problem(info: object, data_size: int) -> str | None:
    if not isinstance(info, dict):
        return "is not described by a table"
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _ITEM_BITS:
        return f"has an unknown dtype {str(dtype)[:40]!r}"
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        return "has a shape that is not a list of integers ≥ 0"
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_size
    ):
        return f"has data offsets {str(offsets)[:60]} outside the file's {data_size:,} data bytes"
    bits = _ITEM_BITS[dtype] * math.prod(shape)
    if (bits + 7) // 8 != offsets[1] - offsets[0]:
        return f"of shape {shape[:8]} and dtype {dtype} does not take the {offsets[1] - offsets[0]:,} bytes it spans"
    return None


def check_safetensors_under(root: str | os.PathLike, fix: str = "fetch the model again") -> None:
    """Every safetensors file under a model directory, checked before a loader opens any of them."""
    for found in sorted(Path(root).rglob("*.safetensors")):
        if found.is_file():
            check_safetensors(found, fix)
