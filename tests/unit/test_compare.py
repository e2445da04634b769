"""The evaluation protocol and the ablation comparison, on metrics.json files written here (no models): the
protocol's first differing field is named, a comparison across protocols is refused, and the table has Table 3's
layout (a row per variant, the paper's value where distar restates one, the change from the initial generator)."""

from __future__ import annotations

import copy
import json

import pytest
from PIL import Image

from distar.compare import TABLE3, compare, markdown_table
from distar.errors import UserError
from distar.evaluate import PAPER, PAPER_ABLATION, check_same_protocol, protocol_difference
from distar.evaluate.report import model_label, signed

PROTOCOL = {
    "prompts": {"parti": {"source": "prompts/parti.tsv", "count": 2, "sha256": "ab"}},
    "seed": 0,
    "images_per_prompt": 1,
    "t_star": 399,
    "rewards": {"pickscore": {"source": "yuvalkirstain/PickScore_v1", "revision": "abc123"}},
    "precision": "float32",
    "image_size": 1024,
}


def test_the_first_differing_field_is_named_by_its_path():
    other = copy.deepcopy(PROTOCOL)
    assert protocol_difference(PROTOCOL, other) is None
    other["rewards"]["pickscore"]["revision"] = "def456"
    assert protocol_difference(PROTOCOL, other) == "rewards.pickscore.revision"
    other = {**PROTOCOL, "seed": 1}
    with pytest.raises(UserError, match=r"seed is 1 there and 0 here.*--allow-protocol-mismatch"):
        check_same_protocol(PROTOCOL, other, "the baseline")
    assert check_same_protocol(PROTOCOL, other, "the baseline", allow=True) == "seed"
    assert protocol_difference(PROTOCOL, {k: v for k, v in PROTOCOL.items() if k != "image_size"}) == "image_size"


def _evaluation(tmp_path, name: str, scores: dict, protocol=PROTOCOL, run=None):
    out = tmp_path / name
    (out / "images" / "model").mkdir(parents=True)
    for pid in ("parti-00000-aa", "parti-00001-bb"):
        Image.new("RGB", (8, 8), (len(name) * 20 % 255, 0, 0)).save(out / "images" / "model" / f"{pid}.png")
    metrics = {
        "model": f"/models/{name}",
        "label": name,
        "run": run,
        "protocol": protocol,
        "protocol_digest": "d",
        "results": {"model": scores},
    }
    (out / "metrics.json").write_text(json.dumps(metrics))
    return str(out)


def _run_logs(tmp_path, name: str, breached_at: int | None = None) -> str:
    run = tmp_path / f"run-{name}"
    (run / "logs").mkdir(parents=True)
    lines = [
        {
            "step": s,
            "reward": 0.2 + s / 100,
            "divergence": 1.0 / s,
            "balance/reward_to_divergence": 2.0,
            **({"guard/breached": 1.0} if s == breached_at else {}),
        }
        for s in (1, 2, 3)
    ]
    (run / "logs" / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(run)


def test_a_row_per_variant_beside_the_paper_and_the_initial_generator(tmp_path):
    start = {"imagereward": 0.9, "pickscore": 0.22}
    initial = _evaluation(tmp_path, "initial", start)
    reference = _evaluation(tmp_path, "reference", {"imagereward": 0.85, "pickscore": 0.227})
    di_star = _evaluation(
        tmp_path, "score-rew100", {"imagereward": 1.0, "pickscore": 0.23}, run=_run_logs(tmp_path, "a")
    )
    other = _evaluation(
        tmp_path, "score-rew1", {"imagereward": 0.95, "pickscore": 0.221}, run=_run_logs(tmp_path, "b", breached_at=2)
    )
    result = compare([di_star, other], str(tmp_path / "cmp"), initial=initial, reference=reference)
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["score-rew100", "score-rew1"]
    assert rows["score-rew100"]["paper"] == PAPER_ABLATION["DI*-IN (100, 7.5)"] == PAPER["DI*"] | {"hpsv2.1": 30.22}
    assert rows["score-rew1"]["paper"] == {"imagereward": 1.031, "aesthetic": 5.69, "pickscore": 0.2274, "clip": 32.87}
    assert rows["score-rew1"]["paper_source"].startswith("the paper's ablation table")
    assert rows["score-rew100"]["vs_initial"]["imagereward"] == pytest.approx(0.1)
    assert rows["score-rew1"]["guard_breached_at"] == [2] and rows["score-rew100"]["guard_breached_at"] == []
    assert [p[1] for p in rows["score-rew100"]["curves"]["reward"]] == pytest.approx([0.21, 0.22, 0.23])
    table = (tmp_path / "cmp" / "comparison.md").read_text().splitlines()
    assert table == markdown_table(result).splitlines()
    variant_lines = [line for line in table if line.startswith("| score-")]
    assert len(variant_lines) == 2 and "1 (1.067) +0.100" in variant_lines[0] and "breached at [2]" in variant_lines[1]
    assert any(line.startswith("| initial:") and "(0.938)" in line for line in table)  # the ablation's DMD2 row
    assert table[-1].startswith("Paper values (in parentheses): the paper's ablation table")
    page = (tmp_path / "cmp" / "report.html").read_text()
    assert page.count("<tr class='variant'>") == 2 and page.count("data:image/jpeg") == 2 * 4  # 2 prompts × 4 models


def test_changes_print_with_the_decimals_of_their_metric():
    """A change is read beside its value: 4 significant digits of the value fix the decimals, so a PickScore
    change of 7e-9 reads ±0, not +7.45e-09."""
    assert signed(7.45e-9, 0.2274) == "±0" and signed(-0.0031, 0.2274) == "-0.0031"
    assert signed(0.1, 1.0) == "+0.100" and signed(0.46, 32.72) == "+0.46" and signed(-12.0, 1234.0) == "-12"
    assert signed(float("nan"), 1.0) == "—" and signed(0.5) == "+0.5000"


def test_baselines_are_named_by_what_was_run():
    assert model_label("reference:2", 7.5) == "reference sampled in 2 steps, CFG 7.5"
    assert model_label("unet:tianweiy/DMD2:x.bin") == "initial generator tianweiy/DMD2:x.bin"
    assert model_label("runs/x/export") == "runs/x/export"


def test_a_comparison_across_protocols_is_refused_naming_the_field(tmp_path):
    a = _evaluation(tmp_path, "score-rew100", {"pickscore": 0.23})
    changed = copy.deepcopy(PROTOCOL)
    changed["prompts"]["parti"]["sha256"] = "cd"
    b = _evaluation(tmp_path, "kl-rew100", {"pickscore": 0.22}, protocol=changed)
    with pytest.raises(UserError, match=r"'kl-rew100'.*prompts\.parti\.sha256 is 'cd' there and 'ab' here"):
        compare([a, b], str(tmp_path / "cmp"))
    result = compare([a, b], str(tmp_path / "cmp"), allow_protocol_mismatch=True)
    assert result["protocol_mismatches"] == {"kl-rew100": "prompts.parti.sha256"}


def test_table3_grid_covers_the_papers_axes():
    settings = [v["settings"] for v in TABLE3]
    assert {s["divergence"] for s in settings} == {"kl", "score"}
    assert {s["alpha_rew"] for s in settings} == {0, 1, 10, 100}
    assert {s["alpha_cfg"] for s in settings} == {0, 4.5, 7.5}
    assert {s["cfg"] for s in settings} == {"divergence", "reward"}
    assert len({v["name"] for v in TABLE3}) == len(TABLE3)
    # the paper's ablation rows, each once, every one but the start and the longer run
    left_out = {"DMD2 init", "DI*-IN (100, 7.5) longer training"}
    assert sorted(v["paper"] for v in TABLE3) == sorted(set(PAPER_ABLATION) - left_out)
    for v in TABLE3:  # the row's label names the variant's own (α_rew, α_cfg)
        s = v["settings"]
        assert f"({s['alpha_rew']:g}, {s['alpha_cfg']:g})" in v["paper"]
        family = "DI++" if s["divergence"] == "kl" else "DI*-OUT" if s["cfg"] == "reward" else "DI*-IN"
        assert v["paper"].startswith(family)
    from distar.train.config import load_config

    for v in TABLE3:  # every variant is a valid config of the sdxl preset
        load_config("sdxl", ["data.prompts=gs://b/p", *v["overrides"]])
