"""`distar plan`'s FLOP model against torch's FLOP counter on a real tiny iteration, and its time and cost lines.
(At SDXL scale the same model gives 435.6 TFLOP against the 440.1 TFLOP counted per iteration, and 578.2 against
565.3 with the recomputation: docs/TRAINING.md.)"""

from __future__ import annotations

import pytest
from torch.utils.flop_counter import FlopCounterMode

from distar.cli import main
from distar.models.architectures import ARCHITECTURES
from distar.plan import forward_flops, iteration_flops
from distar.train import distributed
from distar.train.config import load_config
from distar.train.trainer import Trainer


@pytest.mark.parametrize("checkpointing", ["false", "true"])
def test_the_flop_model_bounds_a_counted_tiny_iteration_from_above_within_30_percent(tmp_path, checkpointing):
    """An upper bound: it counts a full backward where torch skips some (input gradients of the text
    projections, the tail of a recomputed block that nothing needs: non-reentrant checkpointing stops early)."""
    from distar import tiny_preset

    config = load_config(
        "tiny",
        [
            f"out={tmp_path}",
            "parallel.strategy=none",
            "parallel.mixed_precision=fp32",
            f"parallel.activation_checkpointing={checkpointing}",
            f"parallel.vae_checkpointing={checkpointing}",
            "log.progress=false",
            "log.tensorboard=false",
        ],
    )
    tiny_preset.prepare(config.to_dict())
    world = distributed.init("cpu", "gloo")
    try:
        trainer = Trainer(config, world)
        batches = trainer.method.micro_batches(trainer.samples_seen)
        with FlopCounterMode(display=False) as counter:
            for k in range(config.assistant_updates):
                trainer.assistant_update(k, batches)
            trainer.generator_update(batches, balance=False)
    finally:
        distributed.shutdown()
    counted = counter.get_total_flops()
    predicted = iteration_flops(config, *forward_flops(config, ARCHITECTURES["tiny"]()))
    key = "with_recompute" if checkpointing == "true" else "model"
    assert counted <= predicted[key] <= 1.3 * counted, (predicted, counted)


def test_plan_prints_time_gpu_hours_and_the_largest_batch(capsys):
    code = main(
        [
            "plan",
            "--config",
            "tiny",
            "--gpus",
            "1",
            "--gpu-memory",
            "2",
            "--gpu-type",
            "a100",
            "parallel.strategy=none",
            "steps=100",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "largest batch per GPU that fits:" in out
    assert "wall time for 100 steps" in out and "GPU-hours" in out and "model FLOPs per GPU per iteration" in out
    assert main(["plan", "--config", "tiny", "--gpus", "1", "--gpu-type", "tpu", "parallel.strategy=none"]) == 2
    assert "time from: the FLOP rate measured on an NVIDIA H200" in out and "× 0.32, a100's datasheet rate" in out


def test_the_default_rate_is_the_recorded_measurement_and_agrees_with_it():
    """Without --benchmark the plan's time comes from the recorded H200 run: its FLOPs are what this module counts
    for that run's config, and its iteration the fastest in the recorded file, so planning that config on that
    card gives the measured iteration back."""
    from pathlib import Path

    from distar.plan import GPUS, RECORDED, read_benchmark, recorded_rate

    config = load_config(
        "sdxl", ["data.prompts=x", f"data.batch_size={RECORDED['batch']}", f"data.resolution={RECORDED['resolution']}"]
    )
    recorded = Path(__file__).resolve().parents[2] / RECORDED["file"]
    assert read_benchmark(str(recorded), config)[0] == RECORDED["iteration_s"]
    flops = iteration_flops(config, *forward_flops(config, ARCHITECTURES["sdxl"]()))
    assert flops["with_recompute"] == pytest.approx(RECORDED["flops_with_recompute"], rel=1e-6)
    rate, source = recorded_rate("h200")
    assert flops["with_recompute"] / rate == pytest.approx(RECORDED["iteration_s"], rel=1e-6)
    assert RECORDED["file"] in source and "--benchmark" in source
    assert rate < 0.2 * GPUS["h200"]["bf16_flops"]  # far from the datasheet: the run is bound by the host
    assert recorded_rate("b200")[0] / rate == pytest.approx(2250 / 989)
