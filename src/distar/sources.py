"""Where weights come from: one grammar for model sources, one resolver, and the read side of the model cache.

Every loader in distar turns its source into a local directory (or file) laid out like a hub repository here,
then reads it with the library's own `from_pretrained`. The grammar, parsed by `parse`:

| form                      | example                                          | kind     |
|---------------------------|--------------------------------------------------|----------|
| `org/name`                | `stabilityai/stable-diffusion-xl-base-1.0`       | hub      |
| `org/name@REVISION`       | `stabilityai/stable-diffusion-xl-base-1.0@462165` | hub      |
| `org/name:FILE`           | `tianweiy/DMD2:dmd2_sdxl_1step_unet_fp16.bin`    | hub file |
| `org/name:FILE@REVISION`  | `xswu/HPSv2:HPS_v2.1_compressed.pt@main`         | hub file |
| `SCHEME://…`              | `gs://bucket/sdxl`, `s3://b/k`, `hf://…`, `https://…`, `file:///d` | uri |
| a local path              | `/data/sdxl`, `./unet.safetensors`, `~/models/x` | path     |
| `tiny:NAME`               | `tiny:sdxl`, `tiny:rewards/pickscore`            | tiny     |
| `unet:SOURCE` (evaluate)  | `unet:tianweiy/DMD2:dmd2_sdxl_1step_unet_fp16.bin` | unet   |
| `reference:N` (evaluate)  | `reference:50`                                   | reference |

- A hub-shaped source (`org/name`) is read from the model cache when one is given and holds it; else from a local
  directory of that relative path when one exists; else from the hub.
- `tiny:NAME` is the path NAME under the tiny root ($DISTAR_TINY_DIR): a plain mapping. Building the tiny models
  is `distar.tiny_preset.materialize()`, called once by each entry point that runs on the tiny preset.
- `unet:` and `reference:N` name models only `distar evaluate` samples; everywhere else they are refused.

The model cache (`distar cache` writes it; `cache_dir` here reads it): {cache}/{org}/{name}/… per repository,
{cache}/{org}/{name}/{FILE} per file, {cache}/manifest.json with every file's size and sha256. A hub source found
in the manifest is verified and read from the cache, and the hub is never contacted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from distar import readers, storage
from distar.errors import UserError
from distar.readers import confined

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_REVISION = re.compile(r"^[\w.-]+$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
WEIGHT_SUFFIXES = (".bin", ".safetensors", ".pt", ".pth")
TINY_PREFIX = "tiny:"
TINY_VERSION = "tiny-v3"  # v3: the tiny flow families (tiny:sd3, tiny:flux, tiny:flux-schnell)
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Source:
    """One parsed model source. `text` is what the user wrote."""

    text: str
    kind: str
    repo: str | None = None  # hub, hub_file
    filename: str | None = None  # hub_file
    revision: str | None = None  # hub, hub_file
    inner: Source | None = None  # unet
    steps: int | None = None  # reference

    @property
    def is_file(self) -> bool:
        """Whether the source names one file (a state dict) rather than a repository or directory."""
        if self.kind == "hub_file":
            return True
        return self.kind in ("uri", "path", "tiny") and self.text.endswith(WEIGHT_SUFFIXES)

    @property
    def cache_key(self) -> str | None:
        """The name of this source in a model cache's manifest (hub sources only)."""
        if self.kind == "hub":
            return self.repo
        if self.kind == "hub_file":
            return f"{self.repo}:{self.filename}"
        return None


def parse(text: str | os.PathLike, *, evaluate_forms: bool = False) -> Source:
    """The source `text` in the grammar of this module's table; a UserError names a malformed one."""
    text = str(text)
    if not text.strip():
        raise UserError("a model source is empty: name a hub id (org/name), a directory, a file or a URI")
    if text != text.strip():
        raise UserError(f"model source {text!r} has leading or trailing spaces")
    if text.startswith("unet:") or text.startswith("reference:"):
        if not evaluate_forms:
            raise UserError(f"model source {text!r}: unet:… and reference:N name models only `distar evaluate` samples")
        head, _, rest = text.partition(":")
        if head == "reference":
            if not rest.isdigit() or int(rest) < 1:
                raise UserError(f"{text!r}: write reference:N with N ≥ 1 the number of sampling steps")
            return Source(text, "reference", steps=int(rest))
        return Source(text, "unet", inner=parse(rest))
    if text.startswith(TINY_PREFIX):
        name = text[len(TINY_PREFIX) :]
        if not name or name.startswith("/") or ".." in Path(name).parts:
            raise UserError(f"{text!r}: write tiny:NAME with NAME a path inside the tiny root (e.g. tiny:sdxl)")
        return Source(text, "tiny")
    if "://" in text:
        if not _SCHEME.match(text):
            raise UserError(f"model source {text!r} is not a URI (SCHEME://PATH, e.g. gs://bucket/model)")
        return Source(text, "uri")
    if text.startswith(("/", "./", "../", "~")):
        return Source(text, "path")
    body, at, revision = text.partition("@")
    if at and not _REVISION.match(revision):
        raise UserError(f"model source {text!r}: the revision after @ must be a branch, tag or commit hash")
    repo, colon, filename = body.partition(":")
    if HUB_ID.match(repo):
        if colon:
            if not filename or filename.startswith("/"):
                raise UserError(f"model source {text!r}: write org/name:FILE with FILE a path inside the repository")
            return Source(text, "hub_file", repo=repo, filename=filename, revision=revision or None)
        return Source(text, "hub", repo=repo, revision=revision or None)
    if at or colon:
        raise UserError(f"model source {text!r} is not of the form org/name[:FILE][@REVISION], a URI or a local path")
    return Source(text, "path")


def hub_options(cache_dir: str | None = None, offline: bool = False) -> dict:
    """The resolve options of a model config: the model cache, and offline mode (None: from HF_HUB_OFFLINE)."""
    return {"cache_dir": cache_dir, "offline": True if offline else None}


def tiny_root() -> Path:
    return Path(os.environ.get("DISTAR_TINY_DIR", Path.home() / ".cache" / "distar" / TINY_VERSION))


def tiny_path(name: str) -> Path:
    """The local path of `tiny:NAME` (no building: entry points call tiny_preset.materialize first)."""
    name = name[len(TINY_PREFIX) :] if name.startswith(TINY_PREFIX) else name
    parse(TINY_PREFIX + name)
    return tiny_root() / name


def local(source: str | os.PathLike | None) -> str | None:
    """`tiny:NAME` as its local path; any other source unchanged (for readers that take paths and URIs)."""
    if source is None or not str(source).startswith(TINY_PREFIX):
        return None if source is None else str(source)
    path = tiny_path(str(source))
    if not path.exists():
        raise UserError(f"{source!r}: {path} does not exist (the tiny preset is not built there, or has no such name)")
    return str(path)


def uses_tiny(mapping) -> bool:
    """Whether any string in a (nested) mapping or list is a `tiny:` source."""
    if isinstance(mapping, dict):
        return any(uses_tiny(v) for v in mapping.values())
    if isinstance(mapping, (list, tuple)):
        return any(uses_tiny(v) for v in mapping)
    return isinstance(mapping, str) and mapping.startswith(TINY_PREFIX)


def runs_on_tiny(config: dict, cache_dir: str | None = None) -> bool:
    """Whether a run's models are the tiny preset's: a `tiny:` source in its config, or a model cache filled from
    them (the pipeline's tiny preset caches them under the real hub ids). A cache that cannot be read says no."""
    if uses_tiny(config):
        return True
    if not cache_dir:
        return False
    try:
        return uses_tiny(read_manifest(cache_dir))
    except Exception:  # a report's warning, never a reason to fail: the cache's own checks name what is wrong
        return False


def default_download_root() -> Path:
    return Path(os.environ.get("DISTAR_DOWNLOAD_DIR", Path.home() / ".cache" / "distar" / "downloads"))


def _offline(offline: bool | None) -> bool:
    if offline is None:
        return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    return offline


def download(uri: str, allow_patterns: Iterable[str] | None = None) -> Path:
    """A local copy of the tree at `uri` (only the files matching `allow_patterns`, when given), reused while it is
    complete: every part of a model loaded from one URI (UNet, encoders, VAE) reads one download."""
    key = uri if not allow_patterns else json.dumps([uri, sorted(allow_patterns)])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return storage.download_dir(uri, default_download_root() / digest, allow_patterns)


def resolve_dir(
    source: str | os.PathLike | Source,
    *,
    revision: str | None = None,
    allow_patterns: Iterable[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    offline: bool | None = None,
) -> Path:
    """A local directory holding `source`'s files.

    revision: the hub revision when the source names none. allow_patterns: only these files of a hub download.
    cache_dir: a model cache (local or URI); a hub source its manifest holds is verified and read from it.
    offline (default: HF_HUB_OFFLINE): never contact the hub.
    """
    src = source if isinstance(source, Source) else parse(source)
    return _checked(_resolve_dir(src, revision, allow_patterns, cache_dir, _offline(offline)))


_CHECKED: set[Path] = set()


def _checked(root: Path) -> Path:
    """A model directory whose safetensors headers describe their files, checked once per process before any
    loader parses them (a forged header reaches the safetensors library, which fails without naming the file)."""
    if root not in _CHECKED:
        readers.check_safetensors_under(root, fix=f"fetch or write {root} again")
        _CHECKED.add(root)
    return root


def _resolve_dir(src: Source, revision, allow_patterns, cache_dir, offline: bool) -> Path:
    if src.kind == "tiny":
        return Path(local(src.text))
    if src.kind == "hub_file":
        raise UserError(f"{src.text!r} names one file, where a directory or repository is expected")
    if src.kind in ("unet", "reference"):
        raise UserError(f"{src.text!r} is not a model directory")
    if src.kind == "uri":
        if src.text.startswith("file://"):
            path = Path(src.text[len("file://") :])
            if path.is_dir():
                return path
        return download(src.text)
    if src.kind == "hub" and cache_dir is not None:
        cached = lookup(str(cache_dir), src.repo)
        if cached is not None:
            return cached
        if offline:
            raise UserError(
                f"{src.text!r} is not in the model cache {str(cache_dir)!r} and offline mode is on; "
                f"run `distar cache` for it first"
            )
    path = Path(src.text).expanduser()
    if src.kind == "path" or (src.kind == "hub" and path.exists()):
        if path.is_dir():
            return path
        if path.exists():
            raise UserError(f"model source {src.text!r} is a file, where a directory is expected")
        raise UserError(f"model source {src.text!r} is not a directory, a URI or a hub id (org/name)")
    if offline:
        raise UserError(f"{src.text!r} is neither a local directory nor cached, and offline mode is on")
    from huggingface_hub import snapshot_download

    try:
        patterns = list(allow_patterns or []) or None
        return Path(snapshot_download(src.repo, revision=src.revision or revision, allow_patterns=patterns))
    except Exception as err:  # the hub client raises many types; all mean "could not fetch"
        raise UserError(f"could not fetch {src.text!r} from the hub: {err}") from err


def resolve_file(source: str | os.PathLike | Source, **options) -> Path:
    """A single file: a local path, an fsspec URI, `tiny:NAME`, or `org/name:FILE` (hub or model cache)."""
    src = source if isinstance(source, Source) else parse(source)
    if src.kind == "hub_file":
        repo = Source(src.repo, "hub", repo=src.repo, revision=src.revision)
        path = resolve_dir(repo, allow_patterns=[src.filename], **options) / src.filename
    elif src.kind in ("path", "tiny") or (src.kind == "uri" and src.text.startswith("file://")):
        path = Path(local(src.text) if src.kind == "tiny" else src.text.removeprefix("file://")).expanduser()
        if path.is_dir():
            raise UserError(f"{src.text!r} is a directory, where a file is expected")
    elif src.kind == "uri":
        parent, _, filename = src.text.rpartition("/")
        path = resolve_dir(parent, **options) / filename
    elif src.kind == "hub":
        raise UserError(f"{src.text!r} names a repository, where one file is expected: write {src.repo}:FILE")
    else:
        raise UserError(f"{src.text!r} is not a file source")
    if not path.is_file():
        raise UserError(f"file {src.text!r} not found (looked at {path})")
    return path


def require_files(root: Path, groups: dict[str, list[list[str]]]) -> None:
    """Check that `root` holds, for each component, at least one file of every alternative list.

    groups: {component: [[alternative paths for requirement 1], …]}. One error lists everything missing.
    """
    missing = []
    for component, requirements in groups.items():
        for alternatives in requirements:
            if not any((root / a).is_file() for a in alternatives):
                missing.append(f"{component}: {' or '.join(alternatives)}")
    if missing:
        raise UserError(
            f"model directory {str(root)!r} is missing {len(missing)} file(s):\n  - " + "\n  - ".join(missing)
        )


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch pickle (weights only; a {"state_dict": …} wrapper is unwrapped)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{str(path)!r} is a directory, where a state-dict file is expected")
    with open(path, "rb") as fh:
        head = fh.read(9)
    # safetensors: an 8-byte header length, then the JSON header; decided by content, not by the file's name
    if path.suffix == ".safetensors" or head[8:9] == b"{":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        readers.check_safetensors(path)
        try:
            return load_file(str(path))
        except SafetensorError as err:
            raise UserError(f"cannot read {str(path)!r} as safetensors: {err}") from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a file that is not a checkpoint
        raise UserError(f"cannot read {str(path)!r} as a PyTorch state dict: {err}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict")
    return state


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}  # fmt: skip


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise UserError(f"dtype {name!r} is not known; choose one of {', '.join(sorted(DTYPES))}")
    return DTYPES[name]


# -- the model cache, read side ------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    from fsspec.implementations.local import LocalFileSystem

    return storage.hash_file(LocalFileSystem(), str(path))[1]


def entry_dir(key: str) -> str:
    """The directory of a cache entry: org/name for `org/name` and `org/name:FILE`, the key itself otherwise."""
    return key.split(":", 1)[0] if ":" in key and "://" not in key else key


def in_cache(root: str, path: str) -> str:
    """A path the pipeline names relative to the model cache (prompt sets: `prompts/parti/PartiPrompts.tsv`) under
    the cache's `root`; URIs and absolute paths stay as they are, and so does an empty path (none)."""
    return f"{root.rstrip('/')}/{path}" if path and "://" not in path and not path.startswith("/") else path


def read_manifest(cache: str) -> dict:
    fs, path = storage.filesystem(cache)
    mpath = f"{path.rstrip('/')}/{MANIFEST}"
    if not fs.exists(mpath):
        return {"version": 1, "entries": {}}
    manifest = readers.read_mapping(fs, mpath, f"the cache manifest {cache}/{MANIFEST}", "run `distar cache` again")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("entries"), dict):
        raise UserError(f"the cache manifest {cache}/{MANIFEST} has no entries table; run `distar cache` again")
    for key, entry in manifest["entries"].items():
        wrong = _entry_problem(key, entry)
        if wrong:
            raise UserError(
                f"the cache manifest {cache}/{MANIFEST}, entry {key!r}: {wrong}; a manifest names only files inside "
                f"its cache, so it was edited or forged: run `distar cache` again into a fresh --out"
            )
    return manifest


def _entry_problem(key: str, entry: object) -> str | None:
    """What is wrong with one manifest entry's shape and paths; None when nothing is."""
    if not confined(entry_dir(key)) or "://" in key:
        return "its key is no path inside the cache"
    if not isinstance(entry, dict) or not isinstance(entry.get("files"), list):
        return "it has no files list"
    for f in entry["files"]:
        if not isinstance(f, dict):
            return f"a file record is {type(f).__name__}, not an object"
        if not confined(f.get("path")):
            return f"file {f.get('path')!r} is no path inside the entry (absolute, `..`, or empty)"
        if not isinstance(f.get("size"), int) or isinstance(f.get("size"), bool) or f["size"] < 0:
            return f"file {f['path']!r} has size {f.get('size')!r}, not a byte count"
        if not isinstance(f.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", f["sha256"]):
            return f"file {f['path']!r} has no sha256 hex digest"
    return None


def verify_entry(cache: str, key: str, entry: dict, deep: bool = True, local_root: Path | None = None) -> list[str]:
    """Problems with one entry's stored files (empty when it verifies): missing, wrong size, wrong sha256."""
    fs, path = storage.filesystem(cache)
    if local_root is None and storage.is_local(fs):  # local files: checked as files, links included
        local_root = Path(path) / entry_dir(key)
    problems = []
    for f in entry["files"]:
        rel = f"{entry_dir(key)}/{f['path']}"
        if local_root is not None:
            p = local_root / f["path"]
            if p.is_symlink() or readers.leaves(local_root, f["path"]):
                problems.append(f"{rel}: a link, or a path leading outside the cache")  # never followed or repaired
                continue
            size = p.stat().st_size if p.is_file() else None
        else:
            full = f"{path.rstrip('/')}/{rel}"
            size = fs.size(full) if fs.exists(full) else None
        if size is None:
            problems.append(f"{rel}: missing")
        elif size != f["size"]:
            problems.append(f"{rel}: {size} bytes, the manifest says {f['size']}")
        elif deep:
            if local_root is not None:
                digest = sha256_file(local_root / f["path"])
            else:
                digest = storage.hash_file(fs, f"{path.rstrip('/')}/{rel}")[1]
            if digest != f["sha256"]:
                problems.append(f"{rel}: sha256 differs from the manifest (corrupt or partial file)")
    return problems


_VERIFIED: set[tuple[str, str]] = set()


def lookup(cache: str, key: str) -> Path | None:
    """The local directory of `key` in the cache, verified against the manifest; None when the cache lacks it.

    A remote cache's entry is downloaded once (to $DISTAR_DOWNLOAD_DIR) and verified there.
    """
    manifest = read_manifest(cache)
    keys = [k for k in manifest["entries"] if k == key or entry_dir(k) == key]
    if not keys:
        return None
    remote = storage.is_uri(cache) and not str(cache).startswith("file://")
    if remote:
        digest = hashlib.sha256(f"{cache}/{key}".encode()).hexdigest()[:16]
        local_dir = storage.download_dir(f"{str(cache).rstrip('/')}/{entry_dir(key)}", default_download_root() / digest)
    else:
        local_dir = Path(storage.filesystem(cache)[1]) / entry_dir(key)
    problems = []
    for k in keys:
        if (str(cache), k) not in _VERIFIED:
            entry_problems = verify_entry(cache, k, manifest["entries"][k], local_root=local_dir)
            problems += entry_problems
            if not entry_problems:
                _VERIFIED.add((str(cache), k))
    if problems:
        if remote:
            shutil.rmtree(local_dir, ignore_errors=True)
        raise UserError(
            f"model cache {str(cache)!r}, {key!r} does not verify:\n  - "
            + "\n  - ".join(problems)
            + "\nrun `distar cache` again to repair it"
        )
    return local_dir


def verify_cache(cache: str) -> dict[str, list[str]]:
    """Every entry's problems (deep); empty lists everywhere when the cache verifies."""
    manifest = read_manifest(cache)
    if not manifest["entries"]:
        raise UserError(f"{cache!r} holds no cache manifest ({MANIFEST}); run `distar cache` first")
    return {key: verify_entry(cache, key, entry) for key, entry in manifest["entries"].items()}


def provenance(text: str, cache_dir: str | None = None) -> dict:
    """Where `text` comes from, pinned: the source, its revision, and for a model-cache entry what it was cached
    from and a digest of its files' sha256 (content identity even without a hub revision). Reads the manifest
    only; nothing is downloaded."""
    src = parse(text, evaluate_forms=True)
    if src.kind == "unet":
        return {"unet": provenance(src.inner.text, cache_dir)}
    out = {"source": src.text, "revision": src.revision}
    key = src.cache_key
    if cache_dir is not None and key is not None:
        entries = read_manifest(str(cache_dir))["entries"]
        matches = sorted(k for k in entries if k == key or entry_dir(k) == key)
        if matches:
            files = [(k, f["path"], f["sha256"]) for k in matches for f in entries[k]["files"]]
            out.update(
                cached_from=[entries[k]["source"] for k in matches],
                revision=entries[matches[0]].get("revision") or src.revision,
                files_sha256=hashlib.sha256(json.dumps(files).encode()).hexdigest(),
            )
    return out
