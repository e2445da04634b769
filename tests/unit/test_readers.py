"""Property tests over every reader of a file that distar takes from a user or a shared location: mutations of a
valid file (truncation, byte flips, type changes, huge lengths, deep nesting, path entries that escape) end in the
file's UserError or its documented fallback, within a bounded time, and never open a path outside the file's root
(watched with an audit hook on `open`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distar import readers, sources
from distar.errors import UserError

# CI draws the same examples every run (derandomize); DISTAR_EXPLORE=N draws N fresh ones per test, to search.
_EXPLORE = int(os.environ.get("DISTAR_EXPLORE", "0"))
_COMMON = {"deadline": None, "derandomize": not _EXPLORE,
           "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]}  # fmt: skip


def examples(n: int):
    return settings(max_examples=_EXPLORE or n, **_COMMON)


EXAMPLES = examples(60)
SECONDS = 10.0  # each read, however hostile the file


# -- what a reader opens ------------------------------------------------------------------------------------

_OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], str | bytes | Path):
        _OPENED.append(str(args[0]))


sys.addaudithook(_audit)


def reads(call, root: Path, also: tuple[Path, ...] = ()):
    """Run `call`; return its result or the UserError it raised. Fails when it opens a file outside `root` (nor one
    of `also`: the library files Python imports), or takes longer than SECONDS."""
    global _OPENED
    _OPENED, started = [], time.monotonic()
    try:
        result = call()
    except UserError as err:
        result = err
    finally:
        opened, _OPENED = _OPENED, None
    assert time.monotonic() - started < SECONDS
    top = root.resolve()
    outside = [
        p
        for p in opened
        if p.startswith("/")
        and not Path(p).resolve().is_relative_to(top)
        and not p.startswith((sys.prefix, sys.base_prefix, "/dev/", "/proc/", "/sys/", "/etc/localtime"))
        and not p.endswith((".py", ".pyc", ".so"))  # modules a first call imports
        and not any(Path(p).resolve().is_relative_to(a.resolve()) for a in also)
    ]
    assert not outside, f"read outside {root}: {outside}"
    return result


# -- mutations of a valid file ------------------------------------------------------------------------------

ESCAPES = ["../outside/secret", "/etc/hostname", "a/../../outside/secret", "", ".", "a//b", "a\\..\\b", "x\0y"]
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(ESCAPES),  # fmt: skip
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


def _replaced(value, path, new):
    if not path:
        return new
    head, *rest = path
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[head] = _replaced(value[head], rest, new)
    return copy


@st.composite
def mutated(draw, valid: bytes, json_like: bool = True) -> bytes:
    n = len(valid)
    kind = draw(st.sampled_from(["truncate", "flip", "junk", "nest", "swap", "huge"] if json_like else
                                ["truncate", "flip", "junk"]))  # fmt: skip
    if kind == "truncate":
        return valid[: draw(st.integers(0, max(n - 1, 0)))]
    if kind == "flip":
        i = draw(st.integers(0, n - 1))
        return valid[:i] + bytes([valid[i] ^ draw(st.integers(1, 255))]) + valid[i + 1 :]
    if kind == "junk":
        return draw(st.binary(max_size=64))
    if kind == "nest":
        depth = draw(st.integers(readers.MAX_DEPTH - 2, 20_000))
        return (b'{"a": ' * depth + b"1" + b"}" * depth) if draw(st.booleans()) else b"[" * depth + b"]" * depth
    value = json.loads(valid)
    path = draw(st.sampled_from(list(_paths(value))))
    new = draw(JSON_VALUES) if kind == "swap" else draw(st.sampled_from([2**63, -1, 10**400, "9" * 5000]))
    return json.dumps(_replaced(value, path, new)).encode()


def _digest(data: bytes) -> dict:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# -- configs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".toml"])
@EXAMPLES
@given(data=st.data())
def test_a_mutated_config_file_is_one_user_error_or_a_valid_config(tmp_path, suffix, data):
    import tomllib

    from distar.train.config import TrainConfig, load_config, preset_path

    valid = json.dumps(tomllib.loads(preset_path("tiny").read_text())).encode()
    raw = data.draw(mutated(valid))
    if suffix == ".toml":  # the same mutations, written as TOML where they still are a table
        try:
            import tomli_w  # not a dependency: without it, the JSON mutations are fed to the TOML parser as text
        except ImportError:
            tomli_w = None
        try:
            raw = tomli_w.dumps(json.loads(raw)).encode() if tomli_w else raw
        except Exception:
            pass
    path = tmp_path / f"config{suffix}"
    path.write_bytes(raw)
    result = reads(lambda: load_config(str(path)), tmp_path, also=(preset_path("tiny").parent,))
    assert isinstance(result, UserError | TrainConfig)
    if isinstance(result, UserError):
        assert "config" in str(result)


# -- the model cache's manifest -----------------------------------------------------------------------------


@pytest.fixture
def cache(tmp_path):
    root = tmp_path / "cache"
    (root / "org" / "name").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("not the cache's")
    weights = b"weights" * 10
    (root / "org" / "name" / "w.bin").write_bytes(weights)
    manifest = {"version": 1, "entries": {"org/name": {"files": [{"path": "w.bin", **_digest(weights)}]}}}
    (root / sources.MANIFEST).write_text(json.dumps(manifest))
    return root


CACHE_MANIFEST = json.dumps(
    {"version": 1, "entries": {"org/name": {"files": [{"path": "w.bin", **_digest(b"weights" * 10)}]}}}
).encode()


@EXAMPLES
@given(data=st.data())
def test_a_mutated_cache_manifest_is_refused_and_never_reads_outside_the_cache(cache, data):
    (cache / sources.MANIFEST).write_bytes(data.draw(mutated(CACHE_MANIFEST)))
    sources._VERIFIED.clear()
    for call in (lambda: sources.verify_cache(str(cache)), lambda: sources.lookup(str(cache), "org/name")):
        result = reads(call, cache)
        assert isinstance(result, UserError | dict | Path | type(None))


def test_a_cache_file_replaced_by_a_link_outside_is_refused_not_followed(cache):
    target = cache.parent / "outside" / "secret"
    (cache / "org" / "name" / "w.bin").unlink()
    (cache / "org" / "name" / "w.bin").symlink_to(target)
    sources._VERIFIED.clear()
    result = reads(lambda: sources.lookup(str(cache), "org/name"), cache)
    assert isinstance(result, UserError) and "a link" in str(result)


# -- a curated prompt set's manifest ------------------------------------------------------------------------


@EXAMPLES
@given(data=st.data())
def test_a_mutated_prompt_set_manifest_is_refused_or_names_shards_inside_the_set(tmp_path, data):
    from distar.prompts import split_files

    root = tmp_path / "set"
    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "train" / "part-00000.parquet").write_bytes(b"PAR1")
    valid = json.dumps({"splits": {"train": {"files": [{"path": "train/part-00000.parquet", "rows": 1}]}}}).encode()
    (root / "manifest.json").write_bytes(data.draw(mutated(valid)))
    result = reads(lambda: split_files(str(root)), root)
    if not isinstance(result, UserError):
        assert all(Path(f).resolve().is_relative_to(root.resolve()) for f in result)


# -- LEASE.json ---------------------------------------------------------------------------------------------


@EXAMPLES
@given(data=st.data())
def test_a_mutated_lease_is_held_by_someone_or_taken_over_when_asked(tmp_path, data):
    from distar.train.lease import Lease, LeaseHeldError

    valid = json.dumps({"holder": "node-7/abc", "host": "node-7", "pid": 4242, "started": 1.0, "heartbeat": 2.0,
                        "beats": 3}).encode()  # fmt: skip
    out = tmp_path / "run"
    out.mkdir(exist_ok=True)
    (out / "LEASE.json").write_bytes(data.draw(mutated(valid)))
    from distar.train.lease import state_dir

    result = reads(lambda: Lease(str(out)).acquire(), out, also=(state_dir(),))  # the heartbeats this host watched
    if isinstance(result, UserError):
        assert isinstance(result, LeaseHeldError) and "LEASE.json" in str(result)
        assert "lease.take_over=true" in str(result) or "a moment ago" in str(result)
        Lease(str(out), take_over=True).acquire()  # the way out the message names
    assert json.loads((out / "LEASE.json").read_text())["holder"] != "node-7/abc"
    (out / "LEASE.json").unlink()


# -- checkpoints: COMPLETE, trainer_state.json, DCP metadata, rank state ------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A complete checkpoint of a small network, written by the same Checkpointer as training."""
    from distar.train.checkpoint import Checkpointer, ModelState, OptimizerState, TrainState
    from distar.train.distributed import World

    out = tmp_path_factory.mktemp("ckpt") / "run"
    net = torch.nn.Linear(3, 2)
    optim = torch.optim.AdamW(net.parameters())
    net(torch.ones(1, 3)).sum().backward()
    optim.step()
    state = TrainState({"generator": ModelState(net), "generator_optim": OptimizerState(net, optim)},
                       {"step": 1, "samples_seen": 1, "skipped": {"generator": 0}}, 1, "digest")  # fmt: skip
    world = World(0, 0, 1, torch.device("cpu"))
    Checkpointer(str(out), world).save(1, state, {"out": str(out)})
    return out, state, world


@pytest.mark.parametrize("rel", ["COMPLETE", "trainer_state.json", ".metadata", "rank/rank_00000.pt", "__0_0.distcp"])
@examples(25)
@given(data=st.data())
def test_a_mutated_checkpoint_file_is_a_checkpoint_error_even_when_complete_is_forged(checkpoint, tmp_path, rel, data):
    from distar.train.checkpoint import MARKER, Checkpointer, CheckpointError

    source, state, world = checkpoint
    out = tmp_path / "run"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(source, out)
    step = out / "checkpoints" / "step_00000001"
    valid = (step / rel).read_bytes()
    json_like = rel in ("COMPLETE", "trainer_state.json")
    (step / rel).write_bytes(data.draw(mutated(valid, json_like)))
    if rel != MARKER and data.draw(st.booleans()):  # an attacker who can write the bucket forges COMPLETE too
        marker = json.loads((step / MARKER).read_text())
        marker["files"][rel] = _digest((step / rel).read_bytes())
        (step / MARKER).write_text(json.dumps(marker))
    result = reads(lambda: Checkpointer(str(out), world).load(1, state), out)
    assert isinstance(result, CheckpointError | dict)
    counters = [state.counters["step"], state.counters["samples_seen"], *state.counters["skipped"].values()]
    assert all(type(c) is int and c >= 0 for c in counters)  # what the loop indexes with is never forged


def test_a_rank_file_linked_outside_the_checkpoint_is_refused(checkpoint, tmp_path):
    from distar.train.checkpoint import MARKER, Checkpointer, CheckpointError

    source, state, world = checkpoint
    out = tmp_path / "run"
    shutil.copytree(source, out)
    step = out / "checkpoints" / "step_00000001"
    outside = tmp_path / "passwd"
    outside.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    (step / "rank" / "rank_00000.pt").unlink()
    (step / "rank" / "rank_00000.pt").symlink_to(outside)
    marker = json.loads((step / MARKER).read_text())
    marker["files"]["rank/rank_00000.pt"] = _digest(outside.read_bytes())
    (step / MARKER).write_text(json.dumps(marker))
    result = reads(lambda: Checkpointer(str(out), world).load(1, state), out)
    assert isinstance(result, CheckpointError) and "leads outside the checkpoint" in str(result)


# -- safetensors headers ------------------------------------------------------------------------------------


@st.composite
def forged_header(draw, valid: bytes) -> bytes:
    """A safetensors file whose header is mutated (its length field, its JSON), the data kept."""
    n = int.from_bytes(valid[:8], "little")
    header, body = json.loads(valid[8 : 8 + n]), valid[8 + n :]
    kind = draw(st.sampled_from(["length", "json"]))
    if kind == "length":
        return draw(st.sampled_from([2**63, 2**64 - 1, n + 1, n - 1, 0, len(valid)])).to_bytes(8, "little") + valid[8:]
    new = draw(mutated(json.dumps(header).encode()))
    return len(new).to_bytes(8, "little") + new + body


@EXAMPLES
@given(data=st.data())
def test_a_forged_safetensors_header_is_refused_before_the_library_reads_it(tmp_path, data):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "model.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)},
              str(path))  # fmt: skip
    path.write_bytes(data.draw(st.one_of(forged_header(path.read_bytes()), mutated(path.read_bytes(), False))))
    result = reads(lambda: readers.check_safetensors(path), tmp_path)
    if not isinstance(result, UserError):  # what the check passes, the library loads
        load_file(str(path))
    else:
        assert str(path) in str(result)


# -- prompt files of each format ----------------------------------------------------------------------------

PROMPTS = ["a red cube on a table", 'two cats, one "striped"', "a city at night\twith neon", "café & croissant"]


def _prompt_file(fmt: str, path: Path) -> None:
    if fmt == "txt":
        path.write_text("\n".join(PROMPTS) + "\n")
    elif fmt == "tsv":
        path.write_text("Prompt\tCategory\n" + "".join(f"{p.replace(chr(9), ' ')}\tArt\n" for p in PROMPTS))
    elif fmt == "csv":
        import csv

        with path.open("w", newline="") as fh:
            csv.writer(fh).writerows([["prompt", "category"], *[[p, "Art"] for p in PROMPTS]])
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"prompt": PROMPTS}), path)


@pytest.mark.parametrize("fmt", ["txt", "tsv", "csv", "jsonl", "parquet"])
@examples(15)
@given(data=st.data())
def test_a_mutated_prompt_file_curates_or_is_one_error_naming_it(tmp_path, fmt, data):
    from distar.curate import CurateConfig, curate

    source = tmp_path / f"prompts.{fmt}"
    _prompt_file(fmt, source)
    source.write_bytes(data.draw(mutated(source.read_bytes(), json_like=False)))
    out = tmp_path / f"set-{time.monotonic_ns()}"
    config = CurateConfig(sources=[str(source)], out=str(out), tokenizer="tiny:sdxl")
    from distar import tiny_preset

    tiny_preset.prepare(["tiny:sdxl"])  # the tokenizer, built once, is not the file under test
    result = reads(lambda: curate(config), tmp_path, also=(sources.tiny_root(), Path(sources.__file__).parents[1]))
    if isinstance(result, UserError):
        assert source.name in str(result), str(result)
        assert not (out / "manifest.json").exists()
