"""The one source grammar (distar.sources): every form it reads, every malformed one with its message, and the
resolver on local directories, files, URIs, the tiny mapping and the model cache."""

from __future__ import annotations

import json

import pytest
import torch

from distar import sources
from distar.errors import UserError
from distar.sources import Source, parse

DMD2 = "tianweiy/DMD2:dmd2_sdxl_1step_unet_fp16.bin"

# text → (kind, repo, filename, revision, is_file)
GOOD = {
    "stabilityai/stable-diffusion-xl-base-1.0": ("hub", "stabilityai/stable-diffusion-xl-base-1.0", None, None, False),
    "org/name@0123abc": ("hub", "org/name", None, "0123abc", False),
    "org/name@v1.0": ("hub", "org/name", None, "v1.0", False),
    DMD2: ("hub_file", "tianweiy/DMD2", "dmd2_sdxl_1step_unet_fp16.bin", None, True),
    "xswu/HPSv2:HPS_v2.1_compressed.pt@main": ("hub_file", "xswu/HPSv2", "HPS_v2.1_compressed.pt", "main", True),
    "org/name:sub/dir/file.safetensors": ("hub_file", "org/name", "sub/dir/file.safetensors", None, True),
    "gs://bucket/models/sdxl": ("uri", None, None, None, False),
    "s3://bucket/unet.safetensors": ("uri", None, None, None, True),
    "hf://datasets/zhwang/HPDv2/benchmark": ("uri", None, None, None, False),
    "https://example.org/PartiPrompts.tsv": ("uri", None, None, None, False),
    "file:///data/sdxl": ("uri", None, None, None, False),
    "/data/sdxl": ("path", None, None, None, False),
    "./unet.bin": ("path", None, None, None, True),
    "../models/x": ("path", None, None, None, False),
    "~/models/x": ("path", None, None, None, False),
    "unet.safetensors": ("path", None, None, None, True),
    "runs/train/checkpoints/step_1": ("path", None, None, None, False),
    "tiny:sdxl": ("tiny", None, None, None, False),
    "tiny:dmd2_unet.safetensors": ("tiny", None, None, None, True),
    "tiny:rewards/pickscore": ("tiny", None, None, None, False),
}

# text → the start of the message
BAD = {
    "": "a model source is empty",
    "   ": "a model source is empty",
    " org/name": "has leading or trailing spaces",
    "org/name@": "the revision after @",
    "org/name@a b": "the revision after @",
    "org/name:": "write org/name:FILE",
    "org/name:/etc/passwd": "write org/name:FILE",
    "not a hub id:file": "is not of the form org/name[:FILE][@REVISION]",
    "name@rev": "is not of the form org/name[:FILE][@REVISION]",
    "1bad://x": "is not a URI",
    "tiny:": "write tiny:NAME",
    "tiny:../etc": "write tiny:NAME",
    "tiny:/abs": "write tiny:NAME",
    "unet:" + DMD2: "name models only `distar evaluate` samples",
    "reference:50": "name models only `distar evaluate` samples",
}


@pytest.mark.parametrize("text", sorted(GOOD))
def test_every_form_parses(text):
    kind, repo, filename, revision, is_file = GOOD[text]
    src = parse(text)
    assert (src.kind, src.repo, src.filename, src.revision, src.is_file) == (kind, repo, filename, revision, is_file)
    assert src.text == text


@pytest.mark.parametrize("text", sorted(BAD))
def test_every_malformed_form_is_refused_with_its_message(text):
    with pytest.raises(UserError) as err:
        parse(text)
    assert BAD[text] in str(err.value)


def test_evaluate_forms_parse_only_where_asked():
    src = parse("unet:" + DMD2, evaluate_forms=True)
    assert src.kind == "unet" and src.inner == parse(DMD2)
    assert parse("reference:50", evaluate_forms=True) == Source("reference:50", "reference", steps=50)
    for bad in ("reference:0", "reference:x", "reference:"):
        with pytest.raises(UserError, match="write reference:N"):
            parse(bad, evaluate_forms=True)
    with pytest.raises(UserError, match="leading or trailing"):
        parse("unet: org/name", evaluate_forms=True)


def test_cache_keys_are_the_hub_forms():
    assert parse("org/name@abc").cache_key == "org/name"
    assert parse(DMD2).cache_key == DMD2
    assert parse("/data/x").cache_key is None


def test_tiny_is_a_plain_path_mapping(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTAR_TINY_DIR", str(tmp_path / "tiny"))
    assert sources.tiny_path("tiny:rewards/clip") == tmp_path / "tiny" / "rewards" / "clip"
    with pytest.raises(UserError, match="does not exist"):
        sources.resolve_dir("tiny:sdxl")  # nothing is built as a side effect
    assert not (tmp_path / "tiny").exists()
    (tmp_path / "tiny" / "sdxl").mkdir(parents=True)
    assert sources.resolve_dir("tiny:sdxl") == tmp_path / "tiny" / "sdxl"
    assert sources.local("gs://b/x") == "gs://b/x" and sources.local(None) is None


def test_resolve_dir_and_file_on_local_paths_and_uris(tmp_path):
    (tmp_path / "repo").mkdir()
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "repo" / "w.safetensors"))
    assert sources.resolve_dir(str(tmp_path / "repo")) == tmp_path / "repo"
    assert sources.resolve_dir(f"file://{tmp_path / 'repo'}") == tmp_path / "repo"
    assert sources.resolve_file(str(tmp_path / "repo" / "w.safetensors")) == tmp_path / "repo" / "w.safetensors"
    with pytest.raises(UserError, match="is a file, where a directory is expected"):
        sources.resolve_dir(str(tmp_path / "repo" / "w.safetensors"))
    with pytest.raises(UserError, match="is a directory, where a file is expected"):
        sources.resolve_file(str(tmp_path / "repo"))
    with pytest.raises(UserError, match="names a repository, where one file is expected"):
        sources.resolve_file("org/name")
    with pytest.raises(UserError, match="names one file, where a directory"):
        sources.resolve_dir(DMD2)
    with pytest.raises(UserError, match="offline mode is on"):
        sources.resolve_dir("org/absent", offline=True)


def test_the_model_cache_is_read_first_and_verified(tmp_path):
    cache = tmp_path / "cache"
    (cache / "org" / "name").mkdir(parents=True)
    data = b"weights"
    (cache / "org" / "name" / "w.bin").write_bytes(data)
    import hashlib

    entry = {
        "source": "org/name:w.bin",
        "revision": None,
        "files": [{"path": "w.bin", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}],
    }
    (cache / "manifest.json").write_text(json.dumps({"version": 1, "entries": {"org/name:w.bin": entry}}))
    assert sources.resolve_file("org/name:w.bin", cache_dir=str(cache), offline=True) == cache / "org/name/w.bin"
    with pytest.raises(UserError, match="not in the model cache"):
        sources.resolve_dir("org/other", cache_dir=str(cache), offline=True)
    (cache / "org" / "name" / "w.bin").write_bytes(b"WEIGHTS")  # same size, other bytes
    sources._VERIFIED.clear()
    with pytest.raises(UserError, match="sha256 differs"):
        sources.resolve_file("org/name:w.bin", cache_dir=str(cache), offline=True)
    (cache / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="does not parse"):
        sources.read_manifest(str(cache))


def test_hub_options_read_a_model_config():
    assert sources.hub_options("gs://c", True) == {"cache_dir": "gs://c", "offline": True}
    assert sources.hub_options(None, False) == {"cache_dir": None, "offline": None}


def test_in_cache_puts_relative_paths_under_the_cache_root_only():
    from distar.sources import in_cache

    assert in_cache("s3://b/cache/", "prompts/parti/PartiPrompts.tsv") == "s3://b/cache/prompts/parti/PartiPrompts.tsv"
    assert in_cache("s3://b/cache", "gs://other/p.tsv") == "gs://other/p.tsv"
    assert in_cache("s3://b/cache", "/data/p.tsv") == "/data/p.tsv"
    assert in_cache("s3://b/cache", "") == ""


def _small_cache(tmp_path):
    from distar.cache import CacheItem, cache_models

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"a": 1}')
    cache = tmp_path / "cache"
    cache_models(str(cache), [CacheItem("org/small", str(model))], progress=None)
    return cache


@pytest.mark.parametrize(
    "change, named",
    [
        (lambda e: e["files"][0].update(path="/etc/hostname"), "file '/etc/hostname' is no path inside the entry"),
        (lambda e: e["files"][0].update(path="../../outside"), "file '../../outside' is no path inside the entry"),
        (lambda e: e["files"][0].update(path="a/./b"), "is no path inside the entry"),
        (lambda e: e["files"][0].update(size="9"), "has size '9', not a byte count"),
        (lambda e: e["files"][0].update(sha256="x"), "has no sha256 hex digest"),
        (lambda e: e.update(files="config.json"), "it has no files list"),
    ],
)
def test_a_manifest_names_only_files_inside_its_cache(tmp_path, change, named):
    """An edited or forged manifest is refused by entry and path before any file it names is opened."""
    cache = _small_cache(tmp_path)
    manifest = json.loads((cache / sources.MANIFEST).read_text())
    change(manifest["entries"]["org/small"])
    (cache / sources.MANIFEST).write_text(json.dumps(manifest))
    for read in (sources.read_manifest, sources.verify_cache, lambda c: sources.lookup(c, "org/small")):
        with pytest.raises(UserError, match=f"entry 'org/small': .*{named}.*run `distar cache` again"):
            read(str(cache))
    manifest["entries"] = {"../../etc": manifest["entries"]["org/small"]}
    (cache / sources.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="its key is no path inside the cache"):
        sources.read_manifest(str(cache))


def test_a_cached_file_replaced_by_a_link_fails_verification_and_is_repaired_without_writing_through_it(tmp_path):
    from distar.cache import CacheItem, cache_models

    cache = _small_cache(tmp_path)
    outside = tmp_path / "outside.txt"
    outside.write_text("the user's own file")
    cached = cache / "org" / "small" / "config.json"
    cached.unlink()
    cached.symlink_to(outside)
    assert sources.verify_cache(str(cache)) == {
        "org/small": ["org/small/config.json: a link, or a path leading outside the cache"]
    }
    with pytest.raises(UserError, match="a link, or a path leading outside the cache"):
        sources.lookup(str(cache), "org/small")
    cache_models(str(cache), [CacheItem("org/small", str(tmp_path / "model"))], progress=None)  # the repair
    assert outside.read_text() == "the user's own file"  # the link was replaced, not written through
    assert not cached.is_symlink() and cached.read_text() == '{"a": 1}'
    assert sources.verify_cache(str(cache)) == {"org/small": []}


def test_a_cache_directory_leading_outside_is_refused_on_repair(tmp_path):
    from distar.cache import CacheItem, cache_models

    cache = _small_cache(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    entry = cache / "org" / "small"
    for f in entry.iterdir():
        f.unlink()
    entry.rmdir()
    entry.symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(UserError, match="leads outside .* \\(a link\\); remove the link"):
        cache_models(str(cache), [CacheItem("org/small", str(tmp_path / "model"))], progress=None)
    assert list(elsewhere.iterdir()) == []
