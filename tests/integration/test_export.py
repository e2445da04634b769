"""`distar export`: a training checkpoint becomes a pipeline that stock diffusers loads and runs in one step."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.storage_servers import server
from helpers.tiny import tiny

from distar.errors import UserError
from distar.export import ExportConfig, export, single_file_name
from distar.train import run
from distar.train.checkpoint import MARKER, load_unet_weights


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run"
    summary = run("tiny", [f"out={out}", "steps=2", "ema_decay=0.5", "parallel.strategy=none", "log.progress=false"])
    return out, summary["checkpoint"]


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "pipeline"
    export(ExportConfig(str(trained[0]), str(out), ema=True, single_file=True))  # the run: its newest checkpoint
    return out


@pytest.fixture(scope="module")
def exported_fp32(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "pipeline"
    export(ExportConfig(trained[1], str(out), dtype="fp32"))
    return out


def _bytes(directory) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def test_stock_diffusers_one_step_equals_the_trainers_generator(trained, exported_fp32):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    from distar.backbones import OneStepGenerator
    from distar.backbones.sdxl import PromptEncoder, load_unet

    pipe = StableDiffusionXLPipeline.from_pretrained(exported_fp32)
    assert isinstance(pipe.scheduler, LCMScheduler)
    prompts = ["a red cat on a beach", "a blue boat on the moon"]
    z = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    latents = pipe(
        prompts, latents=z.clone(), num_inference_steps=1, timesteps=[399], guidance_scale=0, output_type="latent"
    ).images

    unet = load_unet(tiny("tiny:sdxl"))
    unet.load_state_dict(load_unet_weights(trained[1], "generator"))
    encoder = PromptEncoder.from_pretrained(tiny("tiny:sdxl"))
    with torch.no_grad():
        x0 = OneStepGenerator(unet)(z, encoder.encode(prompts, 64, 64))
    torch.testing.assert_close(latents, x0, atol=1e-4, rtol=1e-4)
    assert x0.abs().mean() > 0.1  # a real comparison, not of two zero tensors


def test_the_default_export_is_half_precision_with_ema_single_file_and_model_card(trained, exported, exported_fp32):
    """The generator (and its EMA, and the single file) in fp16, exactly the trained weights rounded; stock diffusers
    loads it in fp32 unless told otherwise; the reference's parts are left as they are; the generator's files take
    half the bytes of an fp32 export's."""
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open
    from safetensors.torch import load_file

    trained_weights = load_unet_weights(trained[1], "generator")
    with safe_open(str(exported / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as fh:
        stored = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open is no mapping
    assert stored.keys() == trained_weights.keys()
    for name, value in stored.items():
        assert value.dtype == torch.float16 and torch.equal(value, trained_weights[name].half()), name
    assert next(UNet2DConditionModel.from_pretrained(exported, subfolder="unet").parameters()).dtype == torch.float32
    half = UNet2DConditionModel.from_pretrained(exported, subfolder="unet", torch_dtype=torch.float16)
    assert next(half.parameters()).dtype == torch.float16
    assert _bytes(exported / "unet") / _bytes(exported_fp32 / "unet") == pytest.approx(0.5, abs=0.01)
    for part in ("text_encoder", "text_encoder_2", "vae"):  # the reference's, byte for byte the fp32 export's
        assert _bytes(exported / part) == _bytes(exported_fp32 / part) and _bytes(exported / part) > 0, part
    ema = UNet2DConditionModel.from_pretrained(exported, subfolder="unet_ema", torch_dtype=torch.float16).state_dict()
    expected = load_unet_weights(trained[1], "ema")
    assert all(torch.equal(ema[k], expected[k].half()) for k in expected)
    assert not all(torch.equal(ema[k], stored[k]) for k in expected)  # EMA is not the live weights
    single = load_file(str(exported / single_file_name("fp16")))
    assert single.keys() == stored.keys() and all(torch.equal(single[k], stored[k]) for k in stored)
    card = (exported / "README.md").read_text()
    assert "timesteps=[399]" in card and "diff-instruct-star" in card and "unet_ema" in card and "fp16" in card
    meta = json.loads((exported / "distar.json").read_text())
    assert meta["step"] == 2 and meta["checkpoint"] == trained[1] and meta["dtype"] == "fp16"
    assert json.loads((exported_fp32 / "distar.json").read_text())["dtype"] == "fp32"


def test_bf16_on_request_and_an_unknown_precision_refused_before_anything_is_read(trained, tmp_path):
    from safetensors import safe_open

    export(ExportConfig(trained[1], str(tmp_path / "bf16"), dtype="bf16"))
    with safe_open(str(tmp_path / "bf16" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.bfloat16}  # noqa: SIM118
    with pytest.raises(UserError, match="--dtype 'fp8': choose one of fp16, bf16, fp32"):
        export(ExportConfig(str(tmp_path / "no-such-run"), str(tmp_path / "o"), dtype="fp8"))


def test_export_refuses_incomplete_checkpoints_and_existing_outputs(trained, exported, tmp_path):
    import shutil

    partial = tmp_path / "step_00000009"
    shutil.copytree(trained[1], partial)
    (partial / MARKER).unlink()
    with pytest.raises(UserError, match="incomplete"):
        export(ExportConfig(str(partial), str(tmp_path / "o")))
    with pytest.raises(UserError, match="neither a complete checkpoint nor a run"):
        export(ExportConfig(str(tmp_path), str(tmp_path / "o")))
    with pytest.raises(UserError, match="is not empty; choose an empty or new directory"):
        export(ExportConfig(trained[1], str(exported)))
    no_ema = run(
        "tiny", [f"out={tmp_path / 'r'}", "steps=1", "ema_decay=0", "parallel.strategy=none", "log.progress=false"]
    )
    with pytest.raises(UserError, match="no EMA weights"):
        export(ExportConfig(no_ema["checkpoint"], str(tmp_path / "o2"), ema=True))


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_export_to_object_storage_loads_back(scheme, trained, tmp_path):
    import fsspec
    from diffusers import StableDiffusionXLPipeline

    with server(scheme, "exports"):
        uri = f"{scheme}://exports/tiny"
        export(ExportConfig(trained[1], uri))
        fs, _ = fsspec.core.url_to_fs(uri)
        local = tmp_path / "copy"
        fs.get(f"{uri}/", str(local), recursive=True)
        pipe = StableDiffusionXLPipeline.from_pretrained(local)
        assert pipe.unet.config.sample_size == 32


def test_a_lora_generator_exports_merged_into_a_plain_unet(tmp_path):
    """Its checkpoint holds adapters only; the export puts them on the initial UNet and merges them, and stock
    diffusers' one step equals the trainer's LoRA generator (adapters unmerged)."""
    from diffusers import StableDiffusionXLPipeline

    from distar.backbones import OneStepGenerator
    from distar.backbones.sdxl import SDXL, PromptEncoder, load_generator_init
    from distar.backbones.shared import add_generator_adapter

    lora = ["model.generator=lora", "model.generator_lora_rank=4", "model.generator_lora_alpha=8"]
    summary = run("tiny", [f"out={tmp_path / 'run'}", "steps=2", "parallel.strategy=none", "log.progress=false", *lora])
    adapters = load_unet_weights(summary["checkpoint"], "generator")
    assert adapters and all(".lora_" in k for k in adapters)
    assert max(v.abs().max().item() for k, v in adapters.items() if "lora_B" in k) > 0  # they trained
    export(ExportConfig(summary["checkpoint"], str(tmp_path / "pipeline"), dtype="fp32"))

    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "pipeline")
    assert not any(".lora_" in k or "base_layer" in k for k in pipe.unet.state_dict())  # a plain UNet
    prompts = ["a red cat on a beach", "a blue boat on the moon"]
    z = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    latents = pipe(
        prompts, latents=z.clone(), num_inference_steps=1, timesteps=[399], guidance_scale=0, output_type="latent"
    ).images
    unet = add_generator_adapter(
        load_generator_init("tiny:dmd2_unet.safetensors", tiny("tiny:sdxl")), SDXL.lora_targets, 4, 8
    )
    unet.load_state_dict(adapters, strict=False)
    with torch.no_grad():
        x0 = OneStepGenerator(unet)(z, PromptEncoder.from_pretrained(tiny("tiny:sdxl")).encode(prompts, 64, 64))
    torch.testing.assert_close(latents, x0, atol=1e-4, rtol=1e-4)
    # adapters that do not fit the LoRA the run's config names are refused by name, not loaded half-way
    import dataclasses

    from distar import backbones
    from distar.export import _lora_generator_unet, _train_config

    model = dataclasses.replace(_train_config(summary["checkpoint"]).model, generator_lora_rank=8)
    with pytest.raises(UserError, match="do not fit a rank-8 LoRA.*0 missing, 0 unexpected, .* of another shape"):
        _lora_generator_unet(backbones.get("sdxl"), model, {}, adapters, summary["checkpoint"])


def test_reference_parts_holding_fp16_values_are_stored_in_fp16_exactly():
    """SDXL's text encoders come from fp16 files: fp16 holds their values exactly; any other value keeps fp32."""
    from distar.export import holds_fp16_values

    part = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    assert not holds_fp16_values(part)  # random fp32 values
    with torch.no_grad():
        for p in part.parameters():
            p.copy_(p.half().float())
    assert holds_fp16_values(part)
    with torch.no_grad():
        part[0].weight[0, 0] += 1e-6  # one weight off the fp16 grid
    assert not holds_fp16_values(part)
