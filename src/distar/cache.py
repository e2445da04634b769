"""The model cache: everything a training or evaluation run needs, fetched once, checksummed, on any fsspec URI.

Layout: {out}/{org}/{name}/… for a repository, {out}/{org}/{name}/{file} for a single file, {out}/{key}/… for
other items (prompt sets), and {out}/manifest.json (written after every item) with each file's path, size,
sha256, source and revision. This module writes the cache; `distar.sources` reads it (a loader given `cache_dir`
verifies sizes and sha256 against the manifest and fails naming the corrupt or missing file). A second
`distar cache` skips what is present and verifies.
"""

from __future__ import annotations

import fnmatch
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from distar import backbones, sources, storage, tiny_preset
from distar.errors import UserError
from distar.prompts import HPS_URL, PARTI_URL
from distar.sources import MANIFEST, entry_dir, lookup, read_manifest, sha256_file, verify_cache, verify_entry

CLIP_FILES = ["config.json", "model.safetensors", "*.txt", "tokenizer*.json", "vocab.json", "merges.txt",
              "special_tokens_map.json", "preprocessor_config.json"]  # fmt: skip
PROCESSOR_FILES = ["*.txt", "tokenizer*.json", "vocab.json", "special_tokens_map.json", "preprocessor_config.json"]


@dataclass
class CacheItem:
    key: str
    """The name loaders ask for: "org/name" (a repository), "org/name:file" (one file), or a path ("prompts/…")."""
    source: str | None = None
    """Where to fetch it: hub id, directory, file, URI (https, gs, s3, hf), or tiny:… (default: the key)."""
    revision: str | None = None
    """Hub revision (a commit hash pins it)."""
    allow_patterns: list[str] | None = None
    """Only these files of a repository."""
    convert: str | None = None
    """"hpsv2" or "imagereward": convert the fetched checkpoint into the layout distar's reward loaders read."""
    tokenizer: str | None = None
    """The tokenizer a conversion bundles (ImageReward: bert-base-uncased)."""
    extra: list[str] = field(default_factory=list)


PRESETS = {
    # each backbone's models: the reference pipeline and the generator's initialisation (`Backbone.cache_items`)
    **{
        name: [CacheItem(key, allow_patterns=patterns) for key, patterns in backbones.get(name).cache_items()]
        for name in backbones.NAMES
    },
    "rewards": [
        CacheItem("yuvalkirstain/PickScore_v1", allow_patterns=CLIP_FILES),
        CacheItem("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", allow_patterns=PROCESSOR_FILES),
        CacheItem("openai/clip-vit-large-patch14", allow_patterns=CLIP_FILES),
        CacheItem("camenduru/improved-aesthetic-predictor:sac+logos+ava1-l14-linearMSE.pth"),
        CacheItem("xswu/HPSv2-converted", source="xswu/HPSv2:HPS_v2.1_compressed.pt", convert="hpsv2"),
        CacheItem(
            "THUDM/ImageReward-converted",
            source="THUDM/ImageReward:ImageReward.pt",
            convert="imagereward",
            tokenizer="google-bert/bert-base-uncased",
        ),
    ],
    "eval": [
        CacheItem("prompts/parti:PartiPrompts.tsv", source=PARTI_URL),
        CacheItem("prompts/hpsv2", source=HPS_URL),
    ],
}


def parse_models(specs: list[str]) -> list[CacheItem]:
    """Preset names (sdxl, rewards, eval) and items KEY[=SOURCE][@REVISION], comma-separated or repeated."""
    items: list[CacheItem] = []
    for spec in ",".join(specs).split(","):
        spec = spec.strip()
        if not spec:
            continue
        if spec in PRESETS:
            items += [CacheItem(**vars(i)) for i in PRESETS[spec]]
            continue
        key, _, source = spec.partition("=")
        revision = None
        if "@" in (source or key):
            if source:
                source, _, revision = source.rpartition("@")
            else:
                key, _, revision = key.rpartition("@")
        known = {i.key: i for p in PRESETS.values() for i in p}
        base = known.get(key, CacheItem(key))
        # a conversion applies to the original checkpoint file; a directory named instead is taken as converted
        convert = base.convert if not source or _is_file_spec(source) else None
        items.append(
            CacheItem(
                key, source or base.source, revision or base.revision, base.allow_patterns, convert, base.tokenizer
            )
        )
    if not items:
        raise UserError(f"--models {specs!r} names nothing; use presets ({', '.join(PRESETS)}) or KEY=SOURCE items")
    return items


def _is_file_spec(source: str) -> bool:
    return sources.parse(source).is_file


def _fetch(item: CacheItem, staging: Path, hub: dict) -> Path:
    """The item's files in a local directory `staging` (converted where needed); returns its root."""
    source = sources.local(item.source or item.key)
    src = sources.parse(source)
    root = staging / "item"
    is_file_key = ":" in item.key and "://" not in item.key
    if item.convert:
        checkpoint = sources.resolve_file(src, **hub)
        if item.convert == "hpsv2":
            from distar.rewards.convert import convert_hpsv2

            return convert_hpsv2(checkpoint, root)
        if item.convert == "imagereward":
            from distar.rewards.image_reward import convert_image_reward

            return convert_image_reward(checkpoint, root, tokenizer_source=item.tokenizer)
        raise UserError(f"{item.key}: unknown conversion {item.convert!r} (hpsv2, imagereward)")
    root.mkdir(parents=True)
    if is_file_key:
        path = sources.resolve_file(src, **hub)
        shutil.copy2(path, root / item.key.split(":", 1)[1])
        return root
    if storage.is_uri(source) and not source.startswith(("hf://", "file://")):
        fs, path = storage.filesystem(source)
        if not fs.exists(path):
            raise UserError(f"{item.key}: source {source!r} does not exist")
        if fs.isdir(path):
            fs.get(path.rstrip("/") + "/", str(root), recursive=True)
        else:
            fs.get(path, str(root / path.rsplit("/", 1)[-1]))
        return root
    if src.kind == "path" and not Path(source).expanduser().exists():
        raise UserError(f"{item.key}: source {source!r} is not a directory, file, URI or hub id")
    if Path(source).is_file():
        shutil.copy2(source, root / Path(source).name)
        return root
    # allow-patterns narrow a hub download; a directory or URI the user names is taken whole
    patterns = item.allow_patterns if src.kind == "hub" and not Path(source).exists() else None
    local = sources.resolve_dir(src, revision=item.revision, allow_patterns=patterns, **hub)
    for f in sorted(local.rglob("*")):
        rel = f.relative_to(local).as_posix()
        if f.is_file() and not rel.startswith(".") and _allowed(rel, patterns):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, root / rel)
    return root


def _allowed(rel: str, patterns: list[str] | None) -> bool:
    return not patterns or any(fnmatch.fnmatch(rel, p) for p in patterns)


def cache_models(out: str, items: list[CacheItem], cache_dir_hub: dict | None = None, progress=print) -> dict:
    """Fetch, convert and store each item under `out`; returns {key: "cached" | "present"}."""
    progress = progress or (lambda message: None)
    storage.check_output("--out", out)
    tiny_preset.prepare([i.source or i.key for i in items])
    fs, path = storage.filesystem(out)
    path = path.rstrip("/")
    fs.makedirs(path, exist_ok=True)
    manifest = read_manifest(out)
    hub = cache_dir_hub or {}
    status = {}
    for item in items:
        entry = manifest["entries"].get(item.key)
        source = item.source or item.key
        if entry and entry["source"] == source and entry.get("revision") == item.revision:
            if not verify_entry(out, item.key, entry):
                status[item.key] = "present"
                progress(f"{item.key}: present and verified")
                continue
        with tempfile.TemporaryDirectory(prefix="distar-cache-") as tmp:
            root = _fetch(item, Path(tmp), hub)
            files = []
            for f in sorted(root.rglob("*")):
                if f.is_file():
                    rel = f.relative_to(root).as_posix()
                    files.append({"path": rel, "size": f.stat().st_size, "sha256": sha256_file(f)})
            if not files:
                raise UserError(f"{item.key}: nothing was fetched from {source!r} (check the allow-patterns)")
            dest = f"{path}/{entry_dir(item.key)}"
            for f in files:
                fs.makedirs(f"{dest}/{f['path']}".rsplit("/", 1)[0], exist_ok=True)
                storage.put_file(fs, root / f["path"], f"{dest}/{f['path']}", path)
        manifest["entries"][item.key] = {
            "source": source,
            "revision": item.revision,
            "files": files,
            "convert": item.convert,
            "time": time.time(),
        }
        storage.write_json(fs, f"{path}/{MANIFEST}", manifest)
        status[item.key] = "cached"
        progress(f"{item.key}: cached {len(files)} files from {source}")
    return status


__all__ = ["PRESETS", "CacheItem", "cache_models", "lookup", "parse_models", "read_manifest", "verify_cache"]
