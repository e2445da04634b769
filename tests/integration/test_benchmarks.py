"""The benchmarks themselves, run end to end on the CPU: the step anatomy's accounting and the GPU script."""

from __future__ import annotations

import sys
from pathlib import Path

from distar.models.architectures import ARCHITECTURES

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_step_anatomy_parts_add_up_to_the_iteration_flops(tmp_path):
    """The anatomy's parts are the iteration's network passes: their FLOPs, counted alone, sum to the FLOPs of
    the trainer's own train_step (K_TA = 2, checkpointing on)."""
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(BENCHMARKS))
    import anatomy

    overrides = ["parallel.strategy=none", "assistant_updates=2", "parallel.activation_checkpointing=true"]
    trainer = anatomy.build_trainer(ARCHITECTURES["tiny"](), "tiny", overrides, tmp_path)
    per_part = anatomy.flops_of_parts(trainer)
    with FlopCounterMode(display=False) as counter:
        trainer.train_step()
    assert anatomy.iteration_flops(trainer, per_part) == counter.get_total_flops() > 0
    assert set(per_part) == {
        p for p in (*anatomy.ASSISTANT_PARTS, *anatomy.GENERATOR_PARTS) if not p.startswith("optimizer")
    }


def test_gpu_benchmark_script_runs_end_to_end_on_a_cpu(tmp_path):
    """benchmarks/gpu_sdxl_step.py on the tiny shapes: the variants (but compile), the anatomy, sampling, FLOP
    counts, MFU fields."""
    import json
    import subprocess

    out = tmp_path / "run.json"
    subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "gpu_sdxl_step.py"),
            "--arch",
            "tiny",
            "--device",
            "cpu",
            "--resolution",
            "64",
            "--iterations",
            "1",
            "--repeats",
            "1",
            "--sampling-steps",
            "3",
            "--set",
            "parallel.mixed_precision=fp32",
            "--set",
            "assistant_updates=1",
            # the compiled variants take minutes of inductor on 2 CPU cores: tests/integration/test_compile.py
            *("--only-variant", "autocast+foreach", "--only-variant", "lora-assistant+fused"),
            *("--only-variant", "autocast+fused+copies+nhwc+vae-bf16"),
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
        timeout=900,
    )
    result = json.loads(out.read_text())
    variants = ("autocast+foreach", "fsdp+fused", "lora-assistant+fused", "autocast+fused+copies+nhwc+vae-bf16")
    assert set(result["variants"]) == set(variants)
    for variant in variants:
        assert result[variant]["iteration_s"] > 0 and result[variant]["skipped"] == {"generator": 0, "assistant": 0}
        assert result[variant]["model_flops_per_iteration"] == result["model_flops_per_iteration"]
    assert result["anatomy"]["iteration"]["parts_s"] > 0
    assert 0 < result["sampling"]["ratio"] < 1
    assert result["model_flops_per_iteration"] > 0 and result["flops_meta"]["with_checkpointing"]["iteration"] > 0
