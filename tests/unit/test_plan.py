"""`distar plan` (src/distar/plan.py), the real architectures it plans for, and the step anatomy's accounting."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from distar.cli import main as cli_main
from distar.errors import UserError
from distar.models.architectures import ARCHITECTURES, random_networks
from distar.plan import _SavedBytes, measure_activations, plan
from distar.train.config import load_config

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _config(preset="tiny", *overrides):
    return load_config(preset, ["data.prompts=unused", "parallel.strategy=none", *overrides])


def test_real_architectures_have_the_published_parameter_counts():
    nets = random_networks(ARCHITECTURES["sdxl"](), device="meta")
    count = {k: sum(p.numel() for p in v.parameters()) for k, v in nets.items()}
    assert count["reference_unet"] == count["generator_unet"] == count["assistant_unet"] == 2_567_463_684
    assert count["vae"] == 83_653_863
    assert count["reward"] == 986_109_441  # CLIP ViT-H/14, PickScore's and HPSv2.1's shape
    assert all(p.device.type == "meta" for p in nets["vae"].parameters())


def test_random_networks_start_the_assistant_and_generator_as_the_reference():
    nets = random_networks(ARCHITECTURES["tiny"]())
    ref = nets["reference_unet"].state_dict()
    for name in ("generator_unet", "assistant_unet"):
        other = nets[name].state_dict()
        assert all(torch.equal(ref[k], other[k]) for k in ref)


def test_static_items_are_exact_arithmetic_and_fsdp_divides_the_unets():
    config = _config("sdxl", "parallel.strategy=fsdp", "ema_decay=0.999")
    one, eight = plan(config, 1, "tiny"), plan(config, 8, "tiny")
    p = one["parameters"]["unet"]
    assert p == sum(
        x.numel() for x in random_networks(ARCHITECTURES["tiny"](), device="meta")["reference_unet"].parameters()
    )
    assert one["static"]["weights: generator + assistant (fp32)"] == 2 * 4 * p
    assert one["static"]["weights: reference"] == 2 * p  # bf16 in the sdxl preset
    assert one["static"]["optimizer: AdamW states, both UNets (fp32)"] == 16 * p
    assert one["static"]["EMA of the generator (fp32)"] == 4 * p
    for key in (
        "weights: generator + assistant (fp32)",
        "weights: reference",
        "optimizer: AdamW states, both UNets (fp32)",
        "EMA of the generator (fp32)",
    ):
        assert eight["static"][key] == pytest.approx(one["static"][key] / 8)
    assert eight["static"]["weights: VAE"] == one["static"]["weights: VAE"]  # replicated
    assert eight["gradients (one UNet)"] == pytest.approx(4 * p / 8)
    assert eight["fsdp blocks in flight"] > 0 and one["autocast bf16 weight copies"] == 0


def test_flash_attention_stand_in_saves_what_a_fused_kernel_keeps():
    q = torch.empty(2, 4, 100, 8, device="meta", requires_grad=True)
    original = torch.nn.functional.scaled_dot_product_attention
    counter = _SavedBytes([], {})
    with counter.counting():
        torch.nn.functional.scaled_dot_product_attention(q, q * 1, q * 2)
    # q, k, v, out (2·4·100·8 floats each) and one fp32 log-sum-exp per query; no 100×100 matrix
    assert counter.total == 4 * (2 * 4 * 100 * 8) * 4 + (2 * 4 * 100) * 4
    assert torch.nn.functional.scaled_dot_product_attention is original  # restored on the way out


def test_activations_grow_with_the_batch_and_checkpointing_keeps_less():
    small = measure_activations(_config("tiny", "data.batch_size=2"), ARCHITECTURES["tiny"]())
    large = measure_activations(_config("tiny", "data.batch_size=4"), ARCHITECTURES["tiny"]())
    ratio = sum(large.without_checkpointing.values()) / sum(small.without_checkpointing.values())
    assert 1.9 < ratio <= 2.0
    ckpt = measure_activations(_config("tiny", "parallel.activation_checkpointing=true"), ARCHITECTURES["tiny"]())
    for unet in ("generator", "assistant", "reference"):
        assert ckpt.with_checkpointing[unet] < ckpt.without_checkpointing[unet]
        assert 0 < ckpt.recompute[unet] < ckpt.without_checkpointing[unet]


def test_plan_refuses_one_process_on_many_gpus():
    with pytest.raises(UserError, match="strategy='none'"):
        plan(_config(), 8, "tiny")


def test_plan_command_prints_the_plan_and_fails_when_it_does_not_fit(capsys):
    args = ["plan", "--config", "tiny", "--gpus", "1", "parallel.strategy=none"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "predicted peak per GPU" in out and "tiny on 1 GPU(s)" in out
    assert cli_main([*args, "--gpu-memory", "0.001"]) == 2
    assert "over --gpu-memory 0.001" in capsys.readouterr().err


def test_memory_probe_counts_live_tensor_bytes_from_creation_to_release():
    import gc

    sys.path.insert(0, str(BENCHMARKS))
    from memory_probe import LiveTensorBytes

    existing = torch.zeros(10)
    mode = LiveTensorBytes({existing.untyped_storage().data_ptr(): 40})
    with mode:
        a = torch.randn(1000)  # 4,000 bytes
        b = a * 2  # 4,000 more: the peak
        del a
        gc.collect()
        view = b[:10]  # a view allocates nothing
        after = mode.current
    assert mode.peak == 40 + 8000 and after == 40 + 4000 and view.numel() == 10


# -- time and cost ---------------------------------------------------------------------------------------


def _sdxl(*overrides):
    from distar.train.config import load_config

    return load_config("sdxl", ["data.prompts=unused", *overrides])


def test_iteration_flops_closed_form():
    from distar.plan import iteration_flops

    f = {"generator": 10.0, "assistant": 10.0, "reference (CFG, 2B)": 20.0, "VAE decode": 7.0, "reward": 1.0}
    c = _sdxl("assistant_updates=5", "parallel.activation_checkpointing=false", "parallel.vae_checkpointing=false")
    out = iteration_flops(c, f)
    assert out["model"] == 3 * 10 + 2 * (7 + 1 + 10 + 20) + 5 * (10 + 3 * 10) == out["with_recompute"]
    c = _sdxl("assistant_updates=5")
    assert iteration_flops(c, f)["with_recompute"] == out["model"] + (10 + 10 + 20) + 5 * 10 + 7


def test_communication_closed_forms():
    from distar.plan import communication_bytes

    p, k, n = 1_000_000, 5, 8
    fsdp = communication_bytes(_sdxl(f"assistant_updates={k}"), p, p, n)
    assert fsdp["total"] == pytest.approx((n - 1) / n * p * (16 + 10 * k))
    ddp = communication_bytes(_sdxl(f"assistant_updates={k}", "parallel.strategy=ddp"), p, p // 100, n)
    assert ddp["total"] == pytest.approx(2 * (n - 1) / n * 4 * (p + k * (p // 100)))
    assert communication_bytes(_sdxl(), p, p, 1)["total"] == 0


def test_time_and_gpu_hours_follow_the_documented_formula():
    from distar.plan import INFINIBAND_BYTES_S, estimate_time

    c = _sdxl("steps=1000", "assistant_updates=5")
    result = {"world_size": 16, "parameters": {"unet": 2_000_000_000, "assistant": 2_000_000_000}}
    flops = {"model": 4e14, "with_recompute": 5e14}
    one_node = estimate_time(c, result, flops, "h100", achievable_flops=5e14)
    assert one_node["compute_s"] == pytest.approx(1.0)
    assert one_node["transfer_s"] == pytest.approx(one_node["communication_bytes"]["total"] / 450e9)
    assert one_node["iteration_s"] == pytest.approx(one_node["compute_s"] + one_node["transfer_s"])
    assert one_node["gpu_hours"] == pytest.approx(one_node["iteration_s"] * 1000 * 16 / 3600)
    two_nodes = estimate_time(c, result, flops, "h100", achievable_flops=5e14, nodes=2)
    assert two_nodes["transfer_s"] == pytest.approx(one_node["communication_bytes"]["total"] / INFINIBAND_BYTES_S)
    measured = estimate_time(c, result, flops, "h100", measured_iteration_s=5.0)
    assert measured["iteration_s"] == pytest.approx(5.0 + measured["transfer_s"])
    with pytest.raises(UserError, match="--gpu-type"):
        estimate_time(c, result, flops, "tpu")


def test_a_benchmark_of_another_batch_is_refused(tmp_path):
    import json

    from distar.plan import read_benchmark

    path = tmp_path / "b.json"
    path.write_text(json.dumps({"batch": 4, "resolution": 1024, "iteration_s": 9.0, "matmul_bf16_flops": 7e14}))
    with pytest.raises(UserError, match="measured batch 4 at 1024"):
        read_benchmark(str(path), _sdxl())
    assert read_benchmark(str(path), _sdxl("data.batch_size=4")) == (9.0, 7e14)


@pytest.mark.parametrize(
    "preset, gpus, transformer",
    [("sd35m", 1, 2_243_171_520), ("sd35m-8gpu", 8, 2_243_171_520), ("flux", 8, 11_901_408_320)],
)
def test_plan_of_the_flow_presets_counts_their_published_transformers(preset, gpus, transformer):
    """The flow families' real shapes on the meta device: the plan counts SD3.5-Medium's and FLUX.1's transformers
    and measures activations through their blocks (the same accounting as SDXL's)."""
    from distar import backbones
    from distar.models.architectures import default_architecture

    config = load_config(preset, ["data.prompts=unused"])
    arch = default_architecture(config.model.backbone, config.model.reference)
    result = plan(config, gpus, arch)
    assert result["parameters"]["unet"] == transformer
    used, whole = result["activations"]["used"], result["activations"]["without_checkpointing"]
    assert 0 < used["generator"] < whole["generator"]  # the transformer's blocks are checkpointed
    assert result["peak_bytes"] > sum(used.values())
    # the flow families encode text in the loop: their encoders (T5-XXL's 4.76 B with the CLIP towers) are counted
    family = backbones.get(config.model.backbone)
    assert result["static"]["text encoders"] == 2 * family.text_encoder_parameters  # bf16
    assert family.text_encoder_parameters > 4_762_310_656


def test_offloaded_text_encoders_take_gpu_memory_only_while_a_batch_is_encoded():
    """model.text_encoder_offload: the encoders leave the static items, and their bf16 weights become a phase of
    their own (the encode), which on SD3.5-Medium is far below the generator update's."""
    from distar import backbones
    from distar.models.architectures import default_architecture

    config = load_config("sd35m", ["data.prompts=unused"])
    arch = default_architecture(config.model.backbone, config.model.reference)
    resident = plan(config, 1, arch)
    offloaded = plan(load_config("sd35m", ["data.prompts=unused", "model.text_encoder_offload=true"]), 1, arch)
    encoders = 2 * backbones.get("sd3").text_encoder_parameters
    assert resident["static"]["text encoders"] == encoders and offloaded["static"]["text encoders"] == 0
    assert offloaded["phases"]["text encoding (encoders offloaded between steps)"] == encoders
    assert offloaded["peak_phase"] == resident["peak_phase"]
    assert resident["peak_bytes"] - offloaded["peak_bytes"] == encoders
