"""`distar evaluate` on tiny models: metrics, resume, baseline, the HTML report."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers.tiny import tiny

from distar.errors import UserError
from distar.evaluate import EvaluateConfig, evaluate
from distar.export import ExportConfig, export
from distar.train import run

PARTI = Path(__file__).resolve().parents[1] / "data" / "PartiPrompts.tsv"
REWARDS = ["imagereward", "aesthetic", "pickscore", "clip", "hpsv2.1"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    summary = run("tiny", [f"out={root / 'run'}", "steps=1", "parallel.strategy=none", "log.progress=false"])
    export(ExportConfig(summary["checkpoint"], str(root / "pipeline")))
    hps = root / "hps"
    hps.mkdir()
    for style in ("anime", "concept-art", "paintings", "photo"):
        (hps / f"{style}.json").write_text(json.dumps([f"a {style} picture of a fox", f"a {style} castle"]))
    return root / "pipeline", hps


def config(pipeline, out, **kwargs) -> EvaluateConfig:
    settings = dict(
        model=str(pipeline[0]),
        out=str(out),
        prompts=str(PARTI),
        hps_prompts=str(pipeline[1]),
        rewards=REWARDS,
        sources={n: f"tiny:rewards/{n}" for n in REWARDS},
        batch_size=3,
        heads={"aesthetic": "tiny:rewards/aesthetic/aesthetic_head.safetensors"},
    )
    return EvaluateConfig(**{**settings, **kwargs})


class _Report(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables, self.images, self.cells, self.captions = 0, [], [], []
        self._caption = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tables += tag == "table"
        self._caption = tag == "figcaption"
        if tag == "img":
            self.images.append(attrs.get("src", ""))

    def handle_data(self, data):
        self.cells.append(data.strip())
        if self._caption:
            self.captions.append(data)
            self._caption = False


def test_metrics_per_prompt_scores_resume_and_report(pipeline, tmp_path):
    out = tmp_path / "eval"
    baseline = dict(baseline="reference:2", reference="tiny:sdxl")
    first = evaluate(config(pipeline, out, max_prompts=4, **baseline))
    assert first["runs"]["model"] == {
        "generated": 12,
        "skipped": 0,
        "generation_seconds": pytest.approx(first["runs"]["model"]["generation_seconds"]),
    }  # 4 Parti + 4 styles × 2 HPS prompts
    # resumes: only the new Parti prompt is generated
    again = evaluate(config(pipeline, out, max_prompts=5, **baseline))
    assert again["runs"]["model"]["generated"] == 1 and again["runs"]["model"]["skipped"] == 12
    m = again["results"]["model"]
    for name in REWARDS + ["hpsv2.1/anime", "hpsv2.1/photo", "seconds_per_image"]:
        assert isinstance(m[name], float) and m[name] == m[name], name  # finite, not NaN
    assert m["images"] == 13
    scores = pq.read_table(out / "scores.parquet").to_pylist()
    assert len({r["id"] for r in scores}) == 13 and all((out / r["image"]).is_file() for r in scores)
    parti = [r for r in scores if r["set"] == "parti"]
    assert m["pickscore"] == pytest.approx(sum(r["pickscore"] for r in parti) / len(parti))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["paper"]["DI*"]["pickscore"] == 0.2304
    report = _Report()
    report.feed((out / "report.html").read_text())
    assert report.tables == 1 and "hpsv2.1" in report.cells
    for column in ("model", "baseline", "Δ vs baseline", "sd over images", "paper: DI*"):
        assert column in report.cells, column
    assert "paper: SDXL (50 steps)" in report.cells  # the paper's row of the baseline it ran
    assert sum(src.startswith("data:image/png;base64,") for src in report.images) == len(REWARDS)
    thumbnails = [src for src in report.images if src.startswith("data:image/jpeg;base64,")]  # self-contained
    assert len(thumbnails) == 2 * len(report.captions)  # the model's image beside the baseline's, per prompt
    assert {r["prompt"] for r in scores} >= set(report.captions) and report.captions
    html = (out / "report.html").read_text()
    assert "reference sampled in 2 steps, CFG 7.5" in html and "Tiny preset" in html
    assert html.index("<table id='metrics'>") < html.index("<details>") < html.index("<pre id='protocol'>")
    from helpers.html_check import in_sandboxed_iframe, outside_references, screenshot

    assert outside_references(html) == []  # shown alone in KFP's sandboxed iframe
    # as the pipeline UI's 600 px frame shows it: the metrics on the first screen, nothing cut off at the right
    seen = in_sandboxed_iframe(html, tmp_path, first_screen=["#metrics"])
    assert seen["images"] == len(report.images) and seen["broken"] == [] and seen["links"] == []
    assert seen["fetched"] == [] and seen["first_screen"] == {"#metrics": True} and seen["overflow_x"] <= 0
    screenshot(html, "evaluation-report", tmp_path)


def test_baseline_reference_sampling_and_fixed_seeds(pipeline, tmp_path):
    c = config(
        pipeline, tmp_path / "a", max_prompts=2, rewards=["pickscore"], baseline="reference:3", reference="tiny:sdxl"
    )
    a = evaluate(c)
    # the tiny preset keeps an EMA, so its export holds unet_ema/ and the evaluation scores it too
    assert set(a["results"]) == {"model", "ema", "baseline"} and a["runs"]["baseline"]["generated"] == 2
    assert a["results"]["model"]["pickscore"] != a["results"]["baseline"]["pickscore"]
    b = evaluate(config(pipeline, tmp_path / "b", max_prompts=2, rewards=["pickscore"], batch_size=1))
    assert b["results"]["model"]["pickscore"] == pytest.approx(a["results"]["model"]["pickscore"], abs=1e-5)


def test_the_ema_row_is_the_exported_ema_network_under_the_same_noise(pipeline, tmp_path):
    """The `ema` row scores unet_ema/ exactly as a pipeline whose unet/ it were; --no-ema leaves the row out. (One
    step of the tiny run moves the EMA too little to tell apart, so unet_ema/ is replaced by fresh weights.)"""
    import shutil

    import torch
    from diffusers import UNet2DConditionModel

    assert json.loads((pipeline[0] / "distar.json").read_text())["ema"] == {"part": "unet_ema", "decay": 0.9}
    rewards = ["pickscore", "aesthetic"]
    raw = evaluate(config(pipeline, tmp_path / "raw", max_prompts=3, rewards=rewards, ema=False))
    assert set(raw["results"]) == {"model"}
    variant = tmp_path / "variant"
    shutil.copytree(pipeline[0], variant, ignore=shutil.ignore_patterns("unet_ema"))
    torch.manual_seed(1)
    UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(variant / "unet")).save_pretrained(
        variant / "unet_ema"
    )
    swapped = tmp_path / "swapped"  # the same network as the pipeline's own
    shutil.copytree(variant, swapped, ignore=shutil.ignore_patterns("unet"))
    shutil.copytree(variant / "unet_ema", swapped / "unet")
    both = evaluate(config((variant, pipeline[1]), tmp_path / "both", max_prompts=3, rewards=rewards))
    alone = evaluate(config((swapped, pipeline[1]), tmp_path / "alone", max_prompts=3, rewards=rewards, ema=False))
    for name in rewards:
        assert both["results"]["ema"][name] == pytest.approx(alone["results"]["model"][name], abs=1e-6)
        assert both["results"]["model"][name] == pytest.approx(raw["results"]["model"][name], abs=1e-6)
    # the tiny rewards barely tell images apart; the images themselves do
    pngs = sorted(p.name for p in (tmp_path / "both" / "images" / "ema").glob("*.png"))
    assert len(pngs) == 3
    for png in pngs:
        ema = (tmp_path / "both" / "images" / "ema" / png).read_bytes()
        assert ema == (tmp_path / "alone" / "images" / "model" / png).read_bytes()
        assert ema != (tmp_path / "both" / "images" / "model" / png).read_bytes()
    assert "EMA weights" in (tmp_path / "both" / "report.html").read_text()
    assert (tmp_path / "both" / "ema_scores.parquet").is_file()


def test_initial_generator_baseline_from_a_raw_unet_file(pipeline, tmp_path):
    c = config(
        pipeline,
        tmp_path / "init",
        max_prompts=2,
        rewards=["clip"],
        baseline="unet:tiny:dmd2_unet.safetensors",
        reference="tiny:sdxl",
    )
    out = evaluate(c)
    assert out["runs"]["baseline"]["generated"] == 2
    # one training step moved the generator away from its initial UNet: the two sets of images differ
    import numpy as np
    from PIL import Image

    rows = pq.read_table(tmp_path / "init" / "scores.parquet").to_pylist()
    base = pq.read_table(tmp_path / "init" / "baseline_scores.parquet").to_pylist()
    a = np.asarray(Image.open(tmp_path / "init" / rows[0]["image"]), dtype=float)
    b = np.asarray(
        Image.open(tmp_path / "init" / next(r for r in base if r["id"] == rows[0]["id"])["image"]), dtype=float
    )
    assert np.abs(a - b).mean() > 0.1


def test_bad_inputs(pipeline, tmp_path):
    with pytest.raises(UserError, match="--hps-prompts"):
        evaluate(config(pipeline, tmp_path / "o", hps_prompts=None))
    with pytest.raises(UserError, match="unknown metric"):
        evaluate(config(pipeline, tmp_path / "o", rewards=["fid"]))
    with pytest.raises(UserError, match="not a diffusers pipeline"):
        evaluate(config(pipeline, tmp_path / "o", model=str(tmp_path), rewards=["clip"], max_prompts=1))
    with pytest.raises(UserError, match="needs --reference"):
        evaluate(config(pipeline, tmp_path / "o", model="reference:2", rewards=["clip"], max_prompts=1))
    assert tiny("tiny:sdxl")


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_evaluate_writes_to_object_storage(scheme, pipeline, tmp_path):
    import fsspec
    from helpers.storage_servers import server

    with server(scheme, "evals"):
        report = evaluate(config(pipeline, f"{scheme}://evals/tiny", max_prompts=2, rewards=["clip"]))
        fs, _ = fsspec.core.url_to_fs(f"{scheme}://evals/tiny")
        fs.invalidate_cache()
        assert report["results"]["model"]["images"] == 2
        for name in ("metrics.json", "scores.parquet", "report.html"):
            assert fs.exists(f"evals/tiny/{name}"), name
        assert len(fs.glob("evals/tiny/images/model/*.png")) == 2


@pytest.mark.parametrize("fmt", ["tsv", "parquet"])
def test_prompts_load_as_text_from_every_source_format(fmt, tmp_path):
    """The Parti prompts read the same from a TSV and from a Parquet file (curation's fast path keeps Arrow arrays)."""
    import pyarrow as pa

    from distar.evaluate import load_prompts

    rows = [r.split("\t") for r in PARTI.read_text().splitlines()]
    header, body = rows[0], rows[1:40]
    source = tmp_path / f"prompts.{fmt}"
    if fmt == "tsv":
        source.write_text("\n".join("\t".join(r) for r in [header, *body]) + "\n")
    else:
        pq.write_table(pa.table({h: [r[i] for r in body] for i, h in enumerate(header)}), source)
    prompts = load_prompts(
        EvaluateConfig(model="unused", out=str(tmp_path / "out"), prompts=str(source), rewards=["pickscore"])
    )
    assert [p.text for p in prompts] == [r[0].strip() for r in body]
    assert all(isinstance(p.text, str) and p.group != "all" for p in prompts)


def test_t_star_and_backbone_come_from_the_exported_record_read_on_its_own(tmp_path):
    """distar.json is read by itself (by URI, nothing else fetched); a bad record is one clear error."""
    import fsspec

    from distar.evaluate.sampler import recorded, recorded_t_star

    fs = fsspec.filesystem("memory")
    fs.pipe("/exported/distar.json", json.dumps({"backbone": "sdxl", "t_star": 250}).encode())
    assert recorded_t_star("memory://exported") == 250
    assert recorded_t_star("reference:50") == 399 and recorded("unet:tiny:dmd2_unet.safetensors") == {}
    local = tmp_path / "pipe"
    local.mkdir()
    assert recorded_t_star(str(local)) == 399  # no record: the backbone's default
    for text, match in (("{", "not valid JSON"), ("[1]", "not a JSON object"), ('{"backbone": "x"}', "names backbone")):
        (local / "distar.json").write_text(text)
        with pytest.raises(UserError, match=match):
            recorded_t_star(str(local))


def test_a_resume_takes_only_its_own_models_scores_and_only_its_prompts(pipeline, tmp_path):
    """Score shards left in --out by another model or another scoring protocol are refused, by field; shards of
    prompts outside the current selection stay out of the table."""
    import shutil

    out, one = tmp_path / "eval", {"rewards": ["clip"], "hps_prompts": None}
    assert evaluate(config(pipeline, out, max_prompts=3, **one))["prompts"] == 3
    smaller = evaluate(config(pipeline, out, max_prompts=2, **one))
    assert smaller["runs"]["model"]["generated"] == 0 and smaller["results"]["model"]["images"] == 2
    assert len(pq.read_table(out / "scores.parquet")) == 2
    with pytest.raises(UserError, match=r"differs in protocol: .* there, .* here\); choose a new --out"):
        evaluate(config(pipeline, out, max_prompts=2, t_star=300, **one))
    other = tmp_path / "other-pipeline"
    shutil.copytree(pipeline[0], other)
    with pytest.raises(UserError, match=f"differs in model: '{pipeline[0]}' there, '{other}' here"):
        evaluate(config(pipeline, out, model=str(other), max_prompts=2, **one))
    assert len(pq.read_table(out / "scores.parquet")) == 2  # nothing of the refused runs was written


def test_a_pipeline_in_object_storage_is_read_without_its_extra_files(pipeline, tmp_path, monkeypatch):
    """Evaluate downloads what sampling loads: the single file stays in the bucket, and so does the EMA network
    unless its row is asked for."""
    from helpers.storage_servers import server

    def downloaded(name):
        files = set()
        for download in (tmp_path / name).iterdir():
            files |= {str(f.relative_to(download)) for f in download.rglob("*") if f.is_file()}
        return files

    with server("s3", "exports"):
        import fsspec

        fs, _ = fsspec.core.url_to_fs("s3://exports/p")
        fs.put(str(pipeline[0]) + "/", "exports/p", recursive=True)
        fs.pipe_file("exports/p/generator_unet.fp16.safetensors", b"x" * 1000)
        monkeypatch.setenv("DISTAR_DOWNLOAD_DIR", str(tmp_path / "raw"))
        kwargs = dict(model="s3://exports/p", max_prompts=1, rewards=["clip"])
        result = evaluate(config(pipeline, tmp_path / "eval", ema=False, **kwargs))
        assert result["results"]["model"]["images"] == 1  # one Parti prompt (the HPS sets only for hpsv2.1)
        files = downloaded("raw")
        assert "unet/diffusion_pytorch_model.safetensors" in files and "model_index.json" in files
        assert not any(f.startswith("unet_ema") or f.startswith("generator_unet") for f in files)
        monkeypatch.setenv("DISTAR_DOWNLOAD_DIR", str(tmp_path / "both"))
        result = evaluate(config(pipeline, tmp_path / "eval-ema", **kwargs))
    assert result["results"]["ema"]["images"] == 1
    files = downloaded("both")
    assert "unet_ema/diffusion_pytorch_model.safetensors" in files
    assert not any(f.startswith("generator_unet") for f in files)


def test_ctrl_c_stops_after_the_batch_in_flight_and_the_same_command_resumes(pipeline, tmp_path):
    """SIGINT (Ctrl-C) and SIGTERM end an evaluation with its finished shards kept: exit 75 and one line, no
    traceback; the same command again scores only the rest."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "eval"
    argv = [sys.executable, "-m", "distar.cli", "evaluate", "--model", str(pipeline[0]), "--out", str(out),
            "--prompts", str(PARTI), "--rewards", "clip", "--source", "clip=tiny:rewards/clip", "--batch-size", "1",
            "--max-prompts", "40"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((out / "work" / "model").glob("scores-*.parquet")) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert "SIGINT: stopped with" in err and "run the same command again to resume" in err and "Traceback" not in err
    kept = len(list((out / "work" / "model").glob("scores-*.parquet")))
    assert 1 <= kept < 40
    finished = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    result = json.loads((out / "metrics.json").read_text())
    assert result["runs"]["model"] == {**result["runs"]["model"], "skipped": kept, "generated": 40 - kept}


def test_a_reference_baseline_samples_from_the_noise_it_was_given():
    """diffusers' SDXL pipeline scales the latents it is passed by its scheduler's init_noise_sigma, and the Euler
    scheduler's scale_model_input divides the first step's input by the same (σ_max² + 1)^½: the UNet's first
    input must be the N(0, I) noise itself (a second scaling made it 14.6 times too large)."""
    import torch

    from distar import backbones, sources, tiny_preset

    tiny_preset.materialize()
    backbone = backbones.get("sdxl")
    pipe = backbone.load_pipeline(sources.tiny_path("sdxl"), torch.float32)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    latents = torch.randn(2, *backbone.pipeline_latent_shape(pipe), generator=torch.Generator().manual_seed(0))
    backbone.sample_steps(pipe, ["a red cat", "a blue dog"], latents, steps=2, guidance_scale=7.5)
    torch.testing.assert_close(seen[0], torch.cat([latents, latents]), rtol=1e-5, atol=1e-5)  # CFG: ∅ and c
