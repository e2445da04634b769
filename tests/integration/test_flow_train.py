"""The tiny flow presets end to end: `distar train --config tiny-sd3` and `--config tiny-flux` under torchrun with
two processes, an exact resume, `distar export` to a StableDiffusion3Pipeline / FluxPipeline that stock diffusers
loads and whose one step equals the trainer's generator, `distar evaluate` (raw and EMA weights) and `distar
compare`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers.tiny import tiny

from distar.train.checkpoint import load_unet_weights

pytestmark = pytest.mark.slow

PARTI = Path(__file__).resolve().parents[1] / "data" / "PartiPrompts.tsv"
COMMON = ["log.progress=false", "log.tensorboard=false", "checkpoint.every=2", "checkpoint.keep_last=5", "steps=3"]


def torchrun(out: Path, *overrides: str, preset="tiny-sd3", timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "distar.train", "--config", preset, f"out={out}", *COMMON, *overrides]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("sd3") / "run"
    torchrun(out)
    return out


@pytest.fixture(scope="module")
def trained_flux(tmp_path_factory):
    out = tmp_path_factory.mktemp("flux") / "run"
    torchrun(out, preset="tiny-flux")
    return out


@pytest.mark.parametrize("preset", ["tiny-sd3", "tiny-flux"])
def test_two_processes_train_and_a_resumed_run_ends_with_the_same_weights(preset, request, tmp_path):
    trained = request.getfixturevalue("trained" if preset == "tiny-sd3" else "trained_flux")
    steps = sorted(p.name for p in (trained / "checkpoints").iterdir())
    assert steps == ["step_00000002", "step_00000003"]
    resumed = tmp_path / "run"
    shutil.copytree(trained, resumed, ignore=shutil.ignore_patterns("step_00000003"))
    proc = torchrun(resumed, preset=preset)  # resumes at step 2
    assert "resuming" in (proc.stdout + proc.stderr).lower()
    for network in ("generator", "assistant", "ema"):
        a = load_unet_weights(str(trained / "checkpoints" / "step_00000003"), network)
        b = load_unet_weights(str(resumed / "checkpoints" / "step_00000003"), network)
        assert a.keys() == b.keys() and len(a) > 50
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6, network
    init = load_unet_weights(str(trained / "checkpoints" / "step_00000002"), "generator")
    assert any(not torch.equal(init[k], a[k]) for k in a)  # the generator moved between the two checkpoints


def test_fsdp2_with_activation_checkpointing_trains_as_ddp_does(trained, tmp_path):
    """The transformer's blocks sharded (FSDP2) and checkpointed: the weight updates agree with DDP's within the
    float noise of another reduction order, ‖Δa − Δb‖ ≤ 5 % of ‖Δb‖ (tests/integration/test_train_distributed.py)."""
    from distar import backbones

    out = tmp_path / "fsdp"
    torchrun(out, "parallel.strategy=fsdp", "parallel.activation_checkpointing=true")
    init = backbones.get("sd3").load_denoiser(tiny("tiny:sd3")).state_dict()  # both networks start as the reference
    for network in ("generator", "assistant"):
        a = load_unet_weights(str(out / "checkpoints" / "step_00000003"), network)
        b = load_unet_weights(str(trained / "checkpoints" / "step_00000003"), network)
        keys = [k for k in b if k in init]
        assert a.keys() == b.keys() and len(keys) > 50
        diff = sum(((a[k] - b[k]).double() ** 2).sum() for k in keys).sqrt()
        update = sum(((b[k] - init[k]).double() ** 2).sum() for k in keys).sqrt()
        assert update > 0 and diff <= 0.05 * update, f"{network}: ‖Δa − Δb‖ = {diff:.3g}, ‖Δb‖ = {update:.3g}"


def test_lora_networks_under_fsdp2_train_as_under_ddp_and_resume_exactly(tmp_path):
    """The flux preset's layout on tiny-flux: a LoRA assistant (on the frozen reference) and a LoRA generator, each
    sharded by FSDP2 as one network with their frozen bases, checkpointed blocks switching the adapters: the
    adapters' updates agree with DDP's within 5 %, and a resumed run ends with the same weights."""
    lora = ["model.assistant=lora", "model.generator=lora", "model.assistant_lora_rank=4",
            "model.generator_lora_rank=4", "parallel.activation_checkpointing=true"]  # fmt: skip
    fsdp, ddp, resumed = tmp_path / "fsdp", tmp_path / "ddp", tmp_path / "resumed"
    torchrun(fsdp, *lora, "parallel.strategy=fsdp", preset="tiny-flux")
    torchrun(ddp, *lora, "parallel.strategy=ddp", preset="tiny-flux")
    shutil.copytree(fsdp, resumed, ignore=shutil.ignore_patterns("step_00000003"))
    torchrun(resumed, *lora, "parallel.strategy=fsdp", preset="tiny-flux")
    for network in ("generator", "assistant", "ema"):
        a, b, c = (load_unet_weights(str(r / "checkpoints" / "step_00000003"), network) for r in (fsdp, ddp, resumed))
        start = load_unet_weights(str(ddp / "checkpoints" / "step_00000002"), network)
        assert a.keys() == b.keys() == c.keys() and all(".lora_" in k for k in a) and len(a) > 10
        diff = sum(((a[k] - b[k]).double() ** 2).sum() for k in a).sqrt()
        update = sum(((b[k] - start[k]).double() ** 2).sum() for k in a).sqrt()
        assert update > 0 and diff <= 0.05 * update, f"{network}: ‖Δa − Δb‖ = {diff:.3g}, ‖Δb‖ = {update:.3g}"
        assert max((a[k] - c[k]).abs().max().item() for k in a) <= 1e-6, network


@pytest.mark.parametrize("lora", [["model.assistant=lora"], ["model.generator=lora", "model.assistant=lora"]])
def test_lora_networks_on_the_flow_path_train_and_resume_exactly(lora, tmp_path):
    from distar import backbones
    from distar.train import run

    options = [*lora, "model.assistant_lora_rank=4", "model.generator_lora_rank=4", "parallel.strategy=none",
               *COMMON[:4]]  # fmt: skip
    whole = run("tiny-sd3", [f"out={tmp_path / 'whole'}", "steps=3", *options])
    run("tiny-sd3", [f"out={tmp_path / 'split'}", "steps=2", *options])
    split = run("tiny-sd3", [f"out={tmp_path / 'split'}", "steps=3", *options])  # resumes at step 2
    # the frozen base is the reference's, not saved: neither its parameters nor its buffers (SD3's position table)
    assert any("pos_embed" in k for k, _ in backbones.get("sd3").load_denoiser(tiny("tiny:sd3")).named_buffers())
    adapters = load_unet_weights(whole["checkpoint"], "assistant")
    assert adapters and all(".lora_" in k for k in adapters)
    for network in ("generator", "assistant"):
        a, b = load_unet_weights(whole["checkpoint"], network), load_unet_weights(split["checkpoint"], network)
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6, network
    if "model.generator=lora" in lora:
        assert all(".lora_" in k for k in load_unet_weights(whole["checkpoint"], "generator"))


def test_export_loads_in_stock_diffusers_and_its_one_step_is_the_generator(trained, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from distar import backbones
    from distar.backbones.base import OneStepGenerator
    from distar.compare import compare
    from distar.evaluate import EvaluateConfig, evaluate
    from distar.export import ExportConfig, export

    exported = tmp_path / "pipeline"
    meta = export(ExportConfig(str(trained), str(exported), dtype="fp32"))
    assert meta["backbone"] == "sd3" and meta["t_star"] == 1000 and meta["ema"]["part"] == "transformer_ema"
    pipe = StableDiffusion3Pipeline.from_pretrained(exported)
    pipe.set_progress_bar_config(disable=True)
    sd3 = backbones.get("sd3")
    net = sd3.generator_from_weights(Path(tiny("tiny:sd3")), load_unet_weights(meta["checkpoint"], "generator"), "")
    cond = sd3.prompt_encoder(tiny("tiny:sd3")).encode(["a red cube", "a fox"], 16, 16)
    z = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x0 = OneStepGenerator(net.eval(), 1000, backbone=sd3)(z, cond)
        stock = pipe(prompt_embeds=cond.prompt_embeds, pooled_prompt_embeds=cond.pooled_prompt_embeds,
                     guidance_scale=1.0, num_inference_steps=1, latents=z, output_type="latent").images  # fmt: skip
    torch.testing.assert_close(stock, x0, rtol=1e-5, atol=1e-5)
    rewards = ["pickscore", "clip"]
    sources = {n: f"tiny:rewards/{n}" for n in rewards}
    config = EvaluateConfig(str(exported), str(tmp_path / "eval"), prompts=str(PARTI), rewards=rewards, sources=sources)
    out = evaluate(replace(config, max_prompts=2))
    assert set(out["results"]) == {"model", "ema"} and out["results"]["model"]["images"] == 2
    assert out["backbone"] == "sd3" and out["protocol"]["t_star"] == 1000
    # the baselines of an SD3 ablation: the reference pipeline in one step (the preset's start: no distar.json,
    # its family read from model_index.json) and the reference in 2 steps, both under the export's protocol
    baselines = {}
    for role, model in (("initial", tiny("tiny:sd3")), ("reference", "reference:2")):
        baselines[role] = str(tmp_path / role)
        b = evaluate(replace(config, model=model, out=baselines[role], reference=tiny("tiny:sd3"), ema=False,
                             max_prompts=2, label=role))  # fmt: skip
        assert b["backbone"] == "sd3" and b["protocol"]["t_star"] == 1000
    report = compare([str(tmp_path / "eval")], str(tmp_path / "comparison"), **baselines)
    assert report["backbones"] == ["sd3"] and not report["protocol_mismatches"]
    # the paper's numbers are SDXL's: none stands beside an SD3 row
    assert report["paper_baselines"] == {} and all(not r["paper"] for r in report["rows"])
    table = (tmp_path / "comparison" / "comparison.md").read_text()
    assert "paper row" not in table and "No paper values" in table


def test_flux_trains_from_a_schnell_start_under_a_dev_reference_exports_and_evaluates(trained_flux, tmp_path):
    """tiny-flux: the generator starts without a guidance embedding and keeps none; the export is a FluxPipeline
    whose stock one step (packed latents) equals the trainer's generator; the card names the licences; evaluate
    and compare read it."""
    from diffusers import FluxPipeline

    from distar import backbones
    from distar.backbones.base import OneStepGenerator
    from distar.backbones.flux import pack
    from distar.export import ExportConfig, export

    checkpoint = str(trained_flux / "checkpoints" / "step_00000003")
    meta = export(ExportConfig(checkpoint, str(tmp_path / "pipeline"), dtype="fp32"))
    pipe = FluxPipeline.from_pretrained(tmp_path / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    assert meta["backbone"] == "flux" and not pipe.transformer.config.guidance_embeds
    assert "non-commercial" in (tmp_path / "pipeline" / "README.md").read_text()
    flux = backbones.get("flux")
    net = flux.generator_from_weights(Path(tiny("tiny:flux")), load_unet_weights(checkpoint, "generator"), "")
    cond = flux.prompt_encoder(tiny("tiny:flux")).encode(["a red cube", "a fox"], 16, 16)
    z = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x0 = OneStepGenerator(net.eval(), 1000, backbone=flux)(z, cond)
        stock = pipe(prompt_embeds=cond.prompt_embeds, pooled_prompt_embeds=cond.pooled_prompt_embeds, height=16,
                     width=16, num_inference_steps=1, latents=pack(z), output_type="latent").images  # fmt: skip
    torch.testing.assert_close(stock, pack(x0), rtol=1e-5, atol=1e-5)
    from distar.compare import compare
    from distar.evaluate import EvaluateConfig, evaluate

    config = EvaluateConfig(str(tmp_path / "pipeline"), str(tmp_path / "eval"), prompts=str(PARTI), rewards=["clip"])
    out = evaluate(replace(config, sources={"clip": "tiny:rewards/clip"}, max_prompts=2))
    assert set(out["results"]) == {"model", "ema"} and out["results"]["ema"]["images"] == 2
    assert compare([str(tmp_path / "eval")], str(tmp_path / "comparison"))


def test_shifted_logit_normal_sigma_draws_train(tmp_path):
    import json

    from distar.train import run

    options = ["loss.sigma_shift=true", "loss.sigma_density=logit_normal", "parallel.strategy=none", *COMMON[:2]]
    summary = run("tiny-sd3", [f"out={tmp_path / 'run'}", "steps=2", *options])
    lines = [json.loads(x) for x in (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss/generator"] for x in lines if "loss/generator" in x]
    assert summary["step"] == 2 and len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
