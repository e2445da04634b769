"""`distar lab digits --quick`: the production trainer, export and comparison on real digits, end to end. Asserts
the mechanics that hold on every seed, never the paper's scientific claim (docs/LAB.md has the full run's numbers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


README = Path(__file__).resolve().parents[2] / "README.md"


def readme_lab_commands() -> list[str]:
    """README's `distar lab digits … --quick` commands, as written there (the README marks them as run here)."""
    commands = [line for line in README.read_text().splitlines() if line.startswith("distar lab digits --out runs/")]
    return [c for c in commands if "--quick" in c]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """README's quick run, then its run of two more variants from the same stages; each command's output."""
    work = tmp_path_factory.mktemp("lab")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    first, second = readme_lab_commands()
    outputs = []
    for command in (first, second):
        done = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
        outputs.append(done.stdout)
        if command == first:
            first_lab = json.loads((work / "runs" / "lab-quick" / "lab.json").read_text())
    return work / "runs" / "lab-quick", outputs, first_lab


def test_every_stage_runs_and_is_recorded(quick):
    out, (stdout, _), lab = quick
    assert list(lab["stages"]) == ["autoencoder", "reference", "rewards", "init"]
    assert lab["stages"]["autoencoder"]["reconstruction_mse"] < 0.05  # on [-1, 1] pixels
    # the reward and the judge are real classifiers of real digits, on images neither saw
    assert lab["stages"]["rewards"]["reward"]["test_accuracy"] > 0.85
    assert lab["stages"]["rewards"]["judge"]["test_accuracy"] > 0.85
    assert lab["real_test_images"]["fd"] == pytest.approx(0.0, abs=1e-6)
    assert set(lab["variants"]) == {"kl-rew100", "score-cfg", "score-rew100"}
    for v in lab["variants"].values():  # every trained generator exported as a stock diffusers pipeline
        assert (Path(v["path"]) / "model_index.json").is_file() and (Path(v["path"]) / "distar.json").is_file()
        assert v["paper_row"]
    assert "3 variants" in stdout


def test_the_one_step_init_is_far_closer_to_real_digits_than_an_untrained_generator(quick):
    _, _, lab = quick
    assert lab["init"]["fd"] < 0.75 * lab["untrained_one_step"]["fd"]


def test_the_reward_rises_with_alpha_rew(quick):
    _, _, lab = quick
    v = lab["variants"]
    assert v["score-rew100"]["reward"] > v["score-cfg"]["reward"] + 1.0  # log p, nats
    assert v["kl-rew100"]["reward"] > v["score-cfg"]["reward"] + 1.0


def test_the_report_is_complete(quick):
    """The comparison and the figure are the last run's: README's second command, two variants."""
    out, _, _ = quick
    assert (out / "pareto.png").stat().st_size > 10_000
    comparison = json.loads((out / "comparison" / "comparison.json").read_text())
    assert comparison["metrics"] == ["accuracy", "diversity", "fd", "heldout", "reward", "reward_accuracy"]
    rows = {r["variant"]: r for r in comparison["rows"]}
    assert rows["score-cfg0@conditional"]["paper_row"] == "DI*-IN (0, 0)" and rows["score-cfg0@conditional"]["paper"]
    assert (
        rows["score-rew100+loss.huber_c=0.1"]["paper"] == {} and rows["score-rew100+loss.huber_c=0.1"]["ours"]["fd"] > 0
    )
    assert rows["score-cfg0@conditional"]["curves"]["divergence"], "the training curves come from the variant's run"
    page = (out / "comparison" / "report.html").read_text()
    assert page.count("<tr class='variant'>") == 2 and page.count("data:image/jpeg") == 10 * 4  # 10 digits, 4 models


def test_a_second_run_reuses_every_stage_and_builds_only_its_new_variants(quick):
    out, (_, stdout), first = quick
    for stage in first["stages"].values():
        assert f"reused {Path(stage['path']).name}" in stdout
    built = [line.split(":")[0] for line in stdout.splitlines() if line.endswith(": building")]
    assert built == ["variant-score-rew100-loss.huber_c-0.1", "variant-score-cfg0-conditional"]
    second = json.loads((out / "lab.json").read_text())
    assert set(second["variants"]) == {"score-rew100+loss.huber_c=0.1", "score-cfg0@conditional"}
    assert second["variants"]["score-rew100+loss.huber_c=0.1"]["paper_row"] == ""  # a changed knob is not the paper's
    assert second["init"]["fd"] == pytest.approx(first["init"]["fd"], rel=1e-6)  # the same init, measured again


def test_the_flow_family_runs_every_stage_through_the_sd3_layout(tmp_path):
    """`distar lab digits --family sd3`, shortened: the 16-channel autoencoder with SD3's shift, the MMDiT reference
    trained with the flow-matching loss, the init and a variant trained by `distar train --config tiny-sd3`, each
    exported as a StableDiffusion3Pipeline that stock diffusers samples (prompts padded to the lab's 32 T5 tokens in
    training and sampling alike), and a comparison that shows no SDXL paper values."""
    from distar.lab import LAB_T5_TOKENS, LabConfig, run_lab

    config = LabConfig.make(
        str(tmp_path / "lab"), quick=True, family="sd3", variants=["score-rew100"], vae_steps=40, reference_steps=60,
        classifier_steps=150, init_steps=6, variant_steps=4, images_per_digit=2,
    )  # fmt: skip
    lab = run_lab(config, log=lambda line: None)
    ae = lab["stages"]["autoencoder"]
    assert ae["reconstruction_mse"] < 0.1 and ae["shift_factor"] != 0.0
    reference = Path(lab["stages"]["reference"]["path"]) / "pipeline"
    assert json.loads((reference / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    assert json.loads((reference / "tokenizer_3" / "tokenizer_config.json").read_text())["model_max_length"] == 32
    assert 0 < lab["stages"]["reference"]["flow_matching_loss_last10pct"] < 2.5  # ‖ε − x0‖² is 2 at the start
    exported = Path(lab["variants"]["score-rew100"]["path"])
    assert json.loads((exported / "distar.json").read_text())["backbone"] == "sd3"
    assert (exported / "transformer" / "config.json").is_file()
    from distar import backbones
    from distar.backbones.sd3 import t5_length

    encoder = backbones.get("sd3").prompt_encoder(exported)  # as `distar train` encodes; sampling pads alike
    assert encoder.encode(["a handwritten digit seven"], 16, 16).prompt_embeds.shape[1] == 77 + LAB_T5_TOKENS
    assert t5_length(encoder.pipe) == LAB_T5_TOKENS
    for key in ("reference_50_steps", "init", "untrained_one_step"):
        assert lab[key]["fd"] > 0 and 0 <= lab[key]["accuracy"] <= 1
    comparison = json.loads((tmp_path / "lab" / "comparison" / "comparison.json").read_text())
    assert comparison["backbones"] == ["sd3"] and all(not r["paper"] for r in comparison["rows"])
