"""The trainer's parts in one process: config, prompt order, checkpoints, the non-finite guard, object storage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers.storage_servers import server
from helpers.tiny import tiny

from distar.errors import UserError
from distar.train import run
from distar.train.checkpoint import MARKER, Checkpointer, load_unet_weights, read_config
from distar.train.config import load_config
from distar.train.data import PromptSet, write_embedding_shard
from distar.train.distributed import World

FAST = ["log.progress=false", "log.tensorboard=true", "parallel.strategy=none"]

# -- config ------------------------------------------------------------------------------------------


def test_sdxl_preset_holds_the_paper_settings():
    c = load_config("sdxl", ["data.prompts=gs://bucket/prompts"])
    assert (c.loss.alpha_rew, c.loss.alpha_cfg, c.loss.cfg) == (100.0, 7.5, "divergence")
    assert (c.loss.divergence, c.loss.distance, c.model.t_star) == ("score", "pseudo_huber", 399)
    assert c.model.generator_init == "tianweiy/DMD2:dmd2_sdxl_1step_unet_fp16.bin"
    assert c.model.reference == "stabilityai/stable-diffusion-xl-base-1.0"
    assert (c.parallel.strategy, c.parallel.activation_checkpointing, c.data.resolution) == ("fsdp", True, 1024)


def test_unknown_key_names_the_closest_valid_one():
    with pytest.raises(UserError, match=r"'loss\.alpha_rw'.*did you mean 'loss\.alpha_rew'"):
        load_config("tiny", ["loss.alpha_rw=3"])


def test_config_file_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[loss]\nalpha_rew = 1.0\nhuber = 2.0\n")
    with pytest.raises(UserError, match=r"bad\.toml.*'loss\.huber'.*loss\.huber_c"):
        load_config(str(bad))
    with pytest.raises(UserError, match="neither a preset"):
        load_config(str(tmp_path / "missing.toml"))
    (tmp_path / "typed.toml").write_text('steps = "many"\n')
    with pytest.raises(UserError, match="'steps'.*not a valid int"):
        load_config(str(tmp_path / "typed.toml"))


def test_cross_field_checks():
    with pytest.raises(UserError, match="t_min"):
        load_config("tiny", ["loss.t_min=500", "loss.t_max=100"])
    with pytest.raises(UserError, match="data.prompts"):
        load_config("sdxl")
    with pytest.raises(UserError, match="parallel.strategy"):
        load_config("tiny", ["parallel.strategy=zero3"])


def test_saved_config_loads_back_equal(tmp_path):
    c = load_config("tiny", ['reward.weights={"pickscore": 1, "clip": 0.5}', "loss.alpha_rew=3"])
    path = tmp_path / "config.json"
    path.write_text(json.dumps(c.to_dict()))
    again = load_config(str(path))
    assert again == c and again.digest() == c.digest()
    assert again.reward.weights == {"pickscore": 1.0, "clip": 0.5}


# -- prompt order ------------------------------------------------------------------------------------


def _shards(tmp_path, n=10, shards=2):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "prompts"
    root.mkdir()
    per = n // shards
    for s in range(shards):
        prompts = [f"prompt {i}" for i in range(s * per, (s + 1) * per)]
        pq.write_table(pa.table({"prompt": prompts, "category": ["x"] * per}), root / f"part-{s:05d}.parquet")
    return root


def test_global_order_does_not_depend_on_the_process_count(tmp_path):
    data = PromptSet(str(_shards(tmp_path, n=10)))
    one = data.batch(6, 0, 1, 4, seed=3).prompts
    two = data.batch(6, 0, 2, 2, seed=3).prompts + data.batch(6, 1, 2, 2, seed=3).prompts
    assert one == two


def test_each_epoch_visits_every_prompt_once_in_a_new_order(tmp_path):
    data = PromptSet(str(_shards(tmp_path, n=10)))
    epoch0 = data.indices(0, 10, seed=1)
    epoch1 = data.indices(10, 10, seed=1)
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1
    assert data.indices(8, 4, seed=1) == epoch0[8:] + epoch1[:2]  # a batch that crosses the epoch boundary
    assert PromptSet(str(tmp_path / "prompts")).indices(0, 10, seed=1) == epoch0  # deterministic
    assert data.indices(0, 10, seed=1, shuffle=False) == list(range(10))


def test_prompt_set_errors(tmp_path):
    root = _shards(tmp_path)
    with pytest.raises(UserError, match=r"no column 'text' \(columns: prompt, category\)"):
        PromptSet(str(root), column="text")
    with pytest.raises(UserError, match="does not exist"):
        PromptSet(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .parquet files"):
        PromptSet(str(tmp_path / "empty"))


def test_precomputed_embeddings_round_trip(tmp_path):
    embeds, pooled = torch.randn(3, 77, 8), torch.randn(3, 4)
    columns = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    write_embedding_shard(str(tmp_path / "e" / "part-00000.parquet"), ["a", "b", "c"], columns, "float32")
    data = PromptSet(str(tmp_path / "e"))
    assert data.has_embeddings
    batch = data.batch(0, 0, 1, 3, seed=0, shuffle=False)
    assert batch.prompts == ["a", "b", "c"]
    torch.testing.assert_close(batch.embeddings[0], embeds)
    torch.testing.assert_close(batch.embeddings[1], pooled)
    assert not PromptSet(str(tmp_path / "e"), use_embeddings=False).has_embeddings


# -- checkpoints -------------------------------------------------------------------------------------


def _world():
    return World(rank=0, local_rank=0, size=1, device=torch.device("cpu"))


def _state(value, step=0):
    from distar.train.checkpoint import TensorsState, TrainState

    return TrainState({"generator": TensorsState({"w": torch.full((3,), float(value))})}, {"step": step}, 1, "d")


def _save(ckpt, step, value):
    return ckpt.save(step, _state(value, step), {"steps": step})


def test_only_complete_checkpoints_are_found_and_old_ones_pruned(tmp_path):
    ckpt = Checkpointer(str(tmp_path), _world(), keep_last=2)
    for step in (1, 2, 3):
        _save(ckpt, step, step)
    assert ckpt.complete_steps() == [2, 3]
    assert not (tmp_path / "checkpoints" / "step_00000001").exists()
    # an interrupted save of step 4: shards written, marker not
    _save(ckpt, 4, 4)
    (tmp_path / "checkpoints" / "step_00000004" / MARKER).unlink()
    assert ckpt.latest() == 3
    state = _state(0.0)
    torch.manual_seed(123)
    saved_rng = torch.get_rng_state()
    trainer_state = ckpt.load(3, state)
    assert trainer_state == {"step": 3, "world_size": 1, "config_digest": "d"} and state.counters == {"step": 3}
    assert torch.equal(state.parts["generator"].tensors["w"], torch.full((3,), 3.0))
    assert not torch.equal(torch.get_rng_state(), saved_rng)  # the rank's random state came back from the file
    with pytest.raises(UserError, match="not complete"):
        ckpt.load(4, state)
    # saving step 4 again replaces the partial directory
    _save(ckpt, 4, 40)
    assert ckpt.complete_steps() == [3, 4]
    assert torch.equal(load_unet_weights(ckpt.uri(4))["w"], torch.full((3,), 40.0))
    assert read_config(ckpt.uri(4)) == {"steps": 4}


# -- whole runs in one process -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """An uninterrupted 3-step run in one process: the reference for the object-storage resumes."""
    out = tmp_path_factory.mktemp("local") / "run"
    summary = run("tiny", [f"out={out}", "steps=3", "checkpoint.every=2", *FAST])
    return out, summary


def _assert_same_weights(a: str, b: str, network="generator"):
    wa, wb = load_unet_weights(a, network), load_unet_weights(b, network)
    assert wa.keys() == wb.keys() and len(wa) > 100
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6, msg=key)


def test_a_run_writes_checkpoints_logs_and_samples(local_run):
    out, summary = local_run
    assert summary["step"] == 3 and summary["samples_seen"] == 6
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000003"]
    lines = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "loss/generator" in x]
    assert [x["step"] for x in train_lines] == [1, 2, 3]
    for key in ("reward", "divergence", "loss/assistant", "grad_norm/generator", "images_per_s", "peak_memory_gb"):
        assert all(np.isfinite(x[key]) for x in train_lines), key
    assert any("eval/reward" in x for x in lines)
    assert list((out / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "samples" / "step_00000003.png").is_file()
    assert json.loads((out / "summary.json").read_text())["step"] == 3
    assert f"config {summary['config_digest']} · step 3 of 3" in (out / "report.html").read_text()  # the header
    # the generator moved away from its initial (DMD2-layout) weights
    from distar.sources import read_state_dict

    init = read_state_dict(tiny("tiny:dmd2_unet.safetensors"))
    final = load_unet_weights(summary["checkpoint"])
    assert final.keys() == init.keys()
    assert max((final[k] - init[k]).abs().max().item() for k in init) > 1e-5


def test_non_finite_updates_are_skipped_counted_then_abort(tmp_path, capsys):
    from distar.cli import main

    # a reward weight of 1e38 is a finite config value whose reward term overflows fp32: every generator loss is
    # non-finite, while the assistant's are not
    overflow = ['reward.weights={"pickscore": 1e38}', *FAST]
    rc = main(["train", "--config", "tiny", f"out={tmp_path / 'skip'}", "steps=2", "checkpoint.every=1",
               "max_nonfinite=10", *overflow])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "every generator update of this run was skipped (2 of 2" in err and "Traceback" not in err
    from distar.sources import read_state_dict

    init = read_state_dict(tiny("tiny:dmd2_unet.safetensors"))
    final = load_unet_weights(str(tmp_path / "skip" / "checkpoints" / "step_00000001"))
    assert all(torch.equal(final[k], init[k]) for k in init)  # skipped updates change nothing

    # the assistant's good updates no longer reset the generator's count of non-finite updates in a row
    rc = main(["train", "--config", "tiny", f"out={tmp_path / 'abort'}", "steps=5", "max_nonfinite=2", *overflow])
    err = capsys.readouterr().err
    assert rc == 2 and "2 non-finite updates in a row (last: generator" in err


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_checkpoints_and_resume_on_object_storage(scheme, local_run, tmp_path):
    import fsspec

    with server(scheme, "distar-test"):
        out = f"{scheme}://distar-test/runs/tiny"
        run("tiny", [f"out={out}", "steps=2", "checkpoint.every=2", *FAST])
        summary = run("tiny", [f"out={out}", "steps=3", "checkpoint.every=2", *FAST])  # resumes from step 2
        fs, _ = fsspec.core.url_to_fs(out)
        fs.invalidate_cache()
        for name in (
            "config.json",
            "summary.json",
            "logs/metrics.jsonl",
            "samples/step_00000003.png",
            "checkpoints/step_00000003/COMPLETE",
            "checkpoints/step_00000003/.metadata",
        ):
            assert fs.exists(f"{out}/{name}"), name
        assert fs.glob(f"{out}/logs/tensorboard/events.out.tfevents.*")
        steps = [json.loads(x)["step"] for x in fs.cat_file(f"{out}/logs/metrics.jsonl").decode().splitlines()]
        assert [s for s in steps if s] == sorted(s for s in steps if s) and steps.count(3) >= 1
        assert summary["step"] == 3
        _assert_same_weights(summary["checkpoint"], local_run[1]["checkpoint"])
        _assert_same_weights(summary["checkpoint"], local_run[1]["checkpoint"], "assistant")


@pytest.mark.parametrize(
    "overrides",
    [
        ["data.grad_accum=2", "assistant_updates=2"],
        ["loss.cfg=reward", "loss.cfg_t_min=500", "loss.cfg_weighting=sigma2", "log.every=1"],
        ["loss.divergence=kl"],
        ["loss.form=full", "loss.distance=l2", "loss.weighting=sigma2"],
        ["parallel.mixed_precision=bf16", "parallel.activation_checkpointing=true", "generator_optim.warmup_steps=4"],
        [
            "loss.cfg_convention=conditional",
            "loss.alpha_cfg=0",
            "loss.reduction=mean",
            "loss.weighting=x0",
            "loss.score_normalise=true",
        ],
        ["kimg=0.004", "steps=99"],
    ],
    ids=["accumulation", "cfg-as-reward", "kl", "full-l2", "bf16-checkpointing-warmup", "conditional-mean-x0", "kimg"],
)
def test_loop_options_run_and_log_finite_values(overrides, tmp_path):
    out = tmp_path / "run"
    summary = run("tiny", [f"out={out}", "steps=1", *FAST, *overrides])
    if "kimg=0.004" in overrides:  # 4 images at a global batch of 2: two updates, whatever `steps` says
        assert summary["step"] == 2 and summary["samples_seen"] == 4
    line = json.loads((out / "logs" / "metrics.jsonl").read_text().splitlines()[0])
    assert summary["skipped"] == {"generator": 0, "assistant": 0}
    for key in ("loss/generator", "loss/divergence", "loss/assistant", "divergence", "grad_norm/generator"):
        assert np.isfinite(line[key]), key
    if "data.grad_accum=2" in overrides:
        assert summary["samples_seen"] == 4  # 2 micro-batches of 2
    if "loss.cfg=reward" in overrides:
        assert np.isfinite(line["loss/cfg_reward"]) and line["loss/cfg_reward"] != 0
        assert line["balance/cfg_grad_rms"] > 0  # DI*-OUT's pull on x0, beside the divergence's
    if "generator_optim.warmup_steps=4" in overrides:
        assert line["lr/generator"] == pytest.approx(1e-4 / 4)
    if "loss.reduction=mean" in overrides:  # ‖y‖/√D over c: logged beside the divergence
        assert np.isfinite(line["divergence/y_over_c"]) and line["divergence/y_over_c"] > 0


def test_precomputed_embeddings_replace_the_text_encoders(tmp_path):
    from distar import tiny_preset
    from distar.backbones.sdxl import PromptEncoder

    prompts = tiny_preset.tiny_prompts()[:8]
    encoder = PromptEncoder.from_pretrained(tiny("tiny:sdxl"))
    cond = encoder.encode(prompts, 64, 64)
    shard = tmp_path / "emb" / "part-00000.parquet"
    columns = {"prompt_embeds": cond.prompt_embeds, "pooled_prompt_embeds": cond.pooled_prompt_embeds}
    write_embedding_shard(str(shard), prompts, columns, "float32")
    from distar.train import distributed
    from distar.train.trainer import Trainer

    config = load_config("tiny", [f"out={tmp_path / 'run'}", f"data.prompts={shard.parent}", "steps=1", *FAST])
    world = distributed.init("cpu")
    try:
        trainer = Trainer(config, world)
        assert trainer.nets.prompt_encoder is None and trainer.data.has_embeddings
        batch = trainer.data.batch(0, 0, 1, 2, seed=0)
        got = trainer.method.conditioning(batch)
        want = encoder.encode(batch.prompts, 64, 64)
        torch.testing.assert_close(got.prompt_embeds, want.prompt_embeds)
        torch.testing.assert_close(got.add_time_ids, want.add_time_ids)
        assert trainer.fit()["step"] == 1
    finally:
        distributed.shutdown()


@pytest.mark.parametrize(
    "implementation,flags", [("fused", {"fused": True}), ("foreach", {"foreach": True}), ("auto", {"fused": True})]
)  # fmt: skip (auto: fused on the CPU)
def test_optimizer_implementation_reaches_adamw(implementation, flags):
    from distar.backbones.sdxl import build_tiny_unet
    from distar.train.trainer import Trainer

    config = load_config("tiny", [f"generator_optim.implementation={implementation}"])
    optimizer = Trainer._optimizer(build_tiny_unet(), config.generator_optim)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert {k: optimizer.defaults[k] for k in flags} == flags


def test_auto_optimizer_is_foreach_where_torch_has_no_fused_kernel():
    from distar.backbones.sdxl import build_tiny_unet
    from distar.train.trainer import Trainer

    config = load_config("tiny", [])
    with torch.device("meta"):
        optimizer = Trainer._optimizer(build_tiny_unet(), config.generator_optim)
    assert optimizer.defaults["foreach"] is True and not optimizer.defaults.get("fused")


def test_unknown_optimizer_implementation_is_named():
    with pytest.raises(UserError, match="assistant_optim.implementation"):
        load_config("tiny", ["assistant_optim.implementation=apex"])


def test_a_lora_assistant_trains_checkpoints_only_its_adapters_and_resumes_exactly(tmp_path):
    lora = ["model.assistant=lora", "model.assistant_lora_rank=4", "checkpoint.every=2", *FAST]
    whole = run("tiny", [f"out={tmp_path / 'whole'}", "steps=3", *lora])
    run("tiny", [f"out={tmp_path / 'split'}", "steps=2", *lora])
    split = run("tiny", [f"out={tmp_path / 'split'}", "steps=3", *lora])  # resumes at step 2
    assert whole["step"] == split["step"] == 3
    adapters = load_unet_weights(whole["checkpoint"], "assistant")
    assert adapters and all(".lora_" in k for k in adapters)  # the frozen base is the reference, not saved
    _assert_same_weights(whole["checkpoint"], split["checkpoint"], "generator")
    resumed = load_unet_weights(split["checkpoint"], "assistant")
    for key, value in adapters.items():
        torch.testing.assert_close(value, resumed[key], rtol=0, atol=1e-6, msg=key)
    assert max(v.abs().max().item() for k, v in adapters.items() if "lora_B" in k) > 0  # the assistant trained


def test_a_lora_generator_trains_only_its_adapters_and_resumes_exactly(tmp_path):
    lora = ["model.generator=lora", "model.generator_lora_rank=4", "checkpoint.every=2", "ema_decay=0.5", *FAST]
    whole = run("tiny", [f"out={tmp_path / 'whole'}", "steps=3", *lora])
    run("tiny", [f"out={tmp_path / 'split'}", "steps=2", *lora])
    split = run("tiny", [f"out={tmp_path / 'split'}", "steps=3", *lora])  # resumes at step 2
    adapters = load_unet_weights(whole["checkpoint"], "generator")
    assert adapters and all(".lora_" in k for k in adapters)  # the frozen base is the initial UNet, not saved
    assert load_unet_weights(whole["checkpoint"], "ema").keys() == adapters.keys()
    resumed = load_unet_weights(split["checkpoint"], "generator")
    for key, value in adapters.items():
        torch.testing.assert_close(value, resumed[key], rtol=0, atol=1e-6, msg=key)
    assert max(v.abs().max().item() for k, v in adapters.items() if "lora_B" in k) > 0  # the generator trained


def test_a_resolution_the_latents_cannot_take_is_refused_before_any_weights_load(tmp_path, monkeypatch):
    from distar import backbones, tiny_preset
    from distar.train import distributed
    from distar.train.trainer import Trainer

    config = load_config("tiny", [f"out={tmp_path / 'run'}", "data.resolution=60", "parallel.strategy=none"])
    tiny_preset.prepare(config.to_dict())

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(type(backbones.get("sdxl")), "load_denoiser", refuse)
    world = distributed.init("cpu")
    try:
        with pytest.raises(UserError, match="data.resolution=60 must be a multiple of 16"):
            Trainer(config, world)
    finally:
        distributed.shutdown()
