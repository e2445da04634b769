"""`distar cache`: tiny models in local directories stand in for the hub; the cache lives on local disk, an S3
emulator and a GCS emulator; a flipped byte is detected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.storage_servers import server
from helpers.tiny import tiny

from distar.backbones.sdxl import load_dmd2_unet, load_unet
from distar.cache import cache_models, lookup, parse_models, read_manifest, sha256_file, verify_cache
from distar.errors import UserError

SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
DMD2 = "tianweiy/DMD2:dmd2_sdxl_1step_unet_fp16.bin"
PARTI = Path(__file__).resolve().parents[1] / "data" / "PartiPrompts.tsv"


def items():
    return parse_models(
        [
            f"{SDXL}=tiny:sdxl",
            f"{DMD2}=tiny:dmd2_unet.safetensors",
            "yuvalkirstain/PickScore_v1=tiny:rewards/pickscore",
            f"prompts/parti:PartiPrompts.tsv={PARTI}",
        ]
    )


def test_presets_and_items_parse():
    sdxl = parse_models(["sdxl"])
    assert [i.key for i in sdxl] == [SDXL, DMD2] and sdxl[0].allow_patterns
    (item,) = parse_models([f"{SDXL}=/models/sdxl@abc123"])
    assert (item.source, item.revision, item.allow_patterns) == ("/models/sdxl", "abc123", sdxl[0].allow_patterns)
    (hps,) = parse_models(["xswu/HPSv2-converted"])
    assert hps.convert == "hpsv2" and hps.source == "xswu/HPSv2:HPS_v2.1_compressed.pt"
    with pytest.raises(UserError, match="names nothing"):
        parse_models([" , "])


def test_local_cache_manifest_idempotence_loading_and_corruption(tmp_path):
    cache = str(tmp_path / "cache")
    assert set(cache_models(cache, items(), progress=None).values()) == {"cached"}
    manifest = read_manifest(cache)
    unet_file = next(
        f
        for f in manifest["entries"][SDXL]["files"]
        if f["path"].startswith("unet/") and f["path"].endswith(".safetensors")
    )
    stored = tmp_path / "cache" / SDXL / unet_file["path"]
    assert unet_file["sha256"] == sha256_file(stored) and unet_file["size"] == stored.stat().st_size
    assert manifest["entries"][SDXL]["source"] == "tiny:sdxl"
    assert (tmp_path / "cache" / "prompts/parti/PartiPrompts.tsv").is_file()
    assert set(cache_models(cache, items(), progress=None).values()) == {"present"}  # nothing fetched again
    assert all(not problems for problems in verify_cache(cache).values())

    # offline loaders read hub ids from the cache only
    assert load_unet(SDXL, cache_dir=cache, offline=True).config.cross_attention_dim == 64
    assert load_dmd2_unet(DMD2, SDXL, cache_dir=cache, offline=True) is not None

    # one flipped byte: verification names the file, loading fails clearly, `distar cache` repairs it
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    assert any("sha256 differs" in p for p in verify_cache(cache)[SDXL])
    from distar import sources as cache_module

    cache_module._VERIFIED.clear()
    with pytest.raises(UserError, match=r"unet/diffusion_pytorch_model.*sha256 differs"):
        load_unet(SDXL, cache_dir=cache, offline=True)
    status = cache_models(cache, items(), progress=None)
    assert status[SDXL] == "cached" and status[DMD2] == "present"
    assert not verify_cache(cache)[SDXL]


def test_missing_sources_and_an_empty_cache_fail_clearly(tmp_path):
    with pytest.raises(UserError, match="source '/no/such/dir' is not a directory"):
        cache_models(str(tmp_path / "c"), parse_models([f"{SDXL}=/no/such/dir"]), progress=None)
    with pytest.raises(UserError, match="holds no cache manifest"):
        verify_cache(str(tmp_path / "empty"))
    assert lookup(str(tmp_path / "empty"), SDXL) is None


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_cache_on_object_storage_is_verified_on_download(scheme, tmp_path, monkeypatch):
    import fsspec

    from distar import sources as cache_module

    monkeypatch.setenv("DISTAR_DOWNLOAD_DIR", str(tmp_path / "downloads"))
    with server(scheme, "model-cache"):
        cache = f"{scheme}://model-cache/v1"
        cache_models(cache, items()[:2], progress=None)
        assert set(cache_models(cache, items()[:2], progress=None).values()) == {"present"}
        assert load_unet(SDXL, cache_dir=cache, offline=True).config.cross_attention_dim == 64
        fs, _ = fsspec.core.url_to_fs(cache)
        manifest = json.loads(fs.cat_file("model-cache/v1/manifest.json"))
        name = next(
            f["path"]
            for f in manifest["entries"][SDXL]["files"]
            if f["path"].startswith("vae/") and f["path"].endswith(".safetensors")
        )
        blob = bytearray(fs.cat_file(f"model-cache/v1/{SDXL}/{name}"))
        blob[100] ^= 0x01
        fs.pipe_file(f"model-cache/v1/{SDXL}/{name}", bytes(blob))
        assert any("sha256 differs" in p for p in verify_cache(cache)[SDXL])
        cache_module._VERIFIED.clear()
        import shutil

        shutil.rmtree(tmp_path / "downloads")
        with pytest.raises(UserError, match="sha256 differs"):
            load_unet(SDXL, cache_dir=cache, offline=True)
        assert tiny("tiny:sdxl")


def test_cli_caches_and_verifies(tmp_path, capsys):
    from distar.cli import main

    out = str(tmp_path / "c")
    assert main(["cache", "--models", f"{DMD2}=tiny:dmd2_unet.safetensors", "--out", out]) == 0
    assert main(["cache", "--verify", "--out", out]) == 0
    stored = tmp_path / "c" / "tianweiy" / "DMD2" / "dmd2_sdxl_1step_unet_fp16.bin"
    stored.write_bytes(stored.read_bytes()[:-1])  # a partial file
    assert main(["cache", "--verify", "--out", out]) == 2
    assert "bytes, the manifest says" in capsys.readouterr().err
