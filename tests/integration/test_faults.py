"""Hostile and unlucky inputs, from the command line: each case asserts the exit code, the message, and that
nothing written earlier was lost. Real files, real signals, the S3 emulator; no fake of the failing part."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.storage_servers import server

from distar import cli
from distar.train import PREEMPTED
from distar.train import main as train_main
from distar.train.checkpoint import MARKER

TINY = ["log.progress=false", "log.tensorboard=false", "parallel.strategy=none", "log.sample_every=100"]


class _Planted:
    """A pickle that, when unpickled by a loader that executes code, creates the file `path`."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _train(out, *extra, capsys=None) -> tuple[int, str]:
    code = train_main(["--config", "tiny", f"out={out}", *TINY, *extra])
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


def _rehash(step_dir: Path, rel: str) -> None:
    """Rewrite COMPLETE as an attacker who can write the bucket would, so the planted file passes the hash check:
    what stops it then is the loader that cannot execute code."""
    import hashlib

    marker = json.loads((step_dir / MARKER).read_text())
    data = (step_dir / rel).read_bytes()
    marker["files"][rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step_dir / MARKER).write_text(json.dumps(marker))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny run with two complete checkpoints (steps 2 and 4), copied fresh for each test that damages it."""
    out = tmp_path_factory.mktemp("faults") / "run"
    assert train_main(["--config", "tiny", f"out={out}", "steps=4", "checkpoint.every=2", *TINY]) == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


# -- nothing runs that a file plants ----------------------------------------------------------------------


@pytest.mark.parametrize("rehash", [False, True], ids=["planted", "planted-and-rehashed"])
def test_a_planted_rng_pickle_never_runs_on_resume(run_copy, tmp_path, capsys, rehash):
    sentinel = tmp_path / "code-ran"
    newest = run_copy / "checkpoints" / "step_00000004"
    (newest / "rank" / "rank_00000.pt").write_bytes(pickle.dumps(_Planted(sentinel)))
    if rehash:
        _rehash(newest, "rank/rank_00000.pt")
    code, err = _train(run_copy, "steps=6", "checkpoint.every=2", capsys=capsys)
    assert not sentinel.exists()
    assert code == 0  # resumed from step 2, the previous checkpoint that verifies
    assert "rank/rank_00000.pt" in err and "falling back" in err
    assert json.loads((run_copy / "summary.json").read_text())["step"] == 6


@pytest.mark.parametrize("rehash", [False, True], ids=["planted", "planted-and-rehashed"])
def test_a_planted_dcp_metadata_never_runs_on_export(run_copy, tmp_path, capsys, rehash):
    sentinel = tmp_path / "code-ran"
    newest = run_copy / "checkpoints" / "step_00000004"
    (newest / ".metadata").write_bytes(pickle.dumps(_Planted(sentinel)))
    if rehash:
        _rehash(newest, ".metadata")
    code = cli.main(["export", "--checkpoint", str(newest), "--out", str(tmp_path / "export")])
    err = capsys.readouterr().err
    assert code == 2 and not sentinel.exists()
    assert ".metadata" in err and "Traceback" not in err
    assert not (tmp_path / "export" / "model_index.json").exists()


# -- nothing corrupt is trained on or shipped ----------------------------------------------------------------


def _damage(step_dir: Path, how: str) -> str:
    shard = next(p for p in sorted(step_dir.iterdir()) if p.name.endswith(".distcp"))
    if how == "flipped":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
    elif how == "truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
    else:
        shard.unlink()
    return shard.name


@pytest.mark.parametrize("how", ["flipped", "truncated", "missing"])
def test_a_damaged_newest_checkpoint_is_named_and_resume_falls_back(run_copy, capsys, how):
    name = _damage(run_copy / "checkpoints" / "step_00000004", how)
    code, err = _train(run_copy, "steps=5", "checkpoint.every=2", capsys=capsys)
    assert code == 0 and name in err and "falling back" in err
    log = [json.loads(line) for line in (run_copy / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in log if "loss/generator" in line][-3:] == [3, 4, 5]  # steps 3 and 4 again


@pytest.mark.parametrize("how", ["flipped", "truncated", "missing"])
def test_export_of_a_damaged_checkpoint_fails_naming_the_file(run_copy, tmp_path, capsys, how):
    newest = run_copy / "checkpoints" / "step_00000004"
    name = _damage(newest, how)
    code = cli.main(["export", "--checkpoint", str(newest), "--out", str(tmp_path / "export")])
    err = capsys.readouterr().err
    assert code == 2 and name in err and "Traceback" not in err


@pytest.mark.parametrize("how", ["flipped", "truncated", "missing"])
def test_on_object_storage_a_damaged_shard_is_caught_and_resume_falls_back(tmp_path, capsys, how):
    import s3fs

    bucket = f"distar-faults-{how}"  # moto's store outlives its server within the process
    with server("s3", bucket):
        out = f"s3://{bucket}/run"
        assert train_main(["--config", "tiny", f"out={out}", "steps=4", "checkpoint.every=2", *TINY]) == 0
        fs = s3fs.S3FileSystem()
        shard = sorted(f for f in fs.ls(f"{bucket}/run/checkpoints/step_00000004") if f.endswith(".distcp"))[0]
        data = bytearray(fs.cat_file(shard))
        if how == "missing":
            fs.rm(shard)
        else:
            if how == "flipped":
                data[len(data) // 2] ^= 0x01
            fs.pipe_file(shard, bytes(data if how == "flipped" else data[:-100]))
        newest = "s3://" + shard.rsplit("/", 1)[0]
        capsys.readouterr()
        assert cli.main(["export", "--checkpoint", newest, "--out", str(tmp_path / "bad")]) == 2
        assert shard.rsplit("/", 1)[1] in capsys.readouterr().err
        capsys.readouterr()
        code = train_main(["--config", "tiny", f"out={out}", "steps=5", "checkpoint.every=2", *TINY])
        err = capsys.readouterr().err
        assert code == 0 and shard.rsplit("/", 1)[1] in err and "falling back" in err
        code = cli.main(["export", "--checkpoint", newest, "--out", str(tmp_path / "e")])
        # step 4 was written again by the resumed run, so it verifies now
        assert code == 0, capsys.readouterr().err


# -- nothing is lost on preemption --------------------------------------------------------------------------


@pytest.mark.parametrize("launcher", ["one process", "torchrun, two processes"])
def test_sigterm_finishes_the_step_checkpoints_and_exits_75_then_resume_continues(tmp_path, launcher):
    out = tmp_path / "run"
    settings = ["--config", "tiny", f"out={out}", "steps=500", "checkpoint.every=1000", "log.every=1"]
    if launcher == "one process":
        cmd = [sys.executable, "-m", "distar.train", *settings, *TINY]
    else:  # distar train execs torchrun (distar.train.torchrun), which forwards the signal to both workers
        cmd = [str(Path(sys.executable).with_name("distar")), "train", "--nproc-per-node", "2", *settings, *TINY[:2]]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    metrics = out / "logs" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED, err
    assert "stopped by SIGTERM" in err and "rerun the same command to resume" in err
    steps = sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").iterdir() if (p / MARKER).exists())
    assert steps and steps[-1] >= 2  # a complete checkpoint of the last finished step, far before checkpoint.every
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert max(logged) == steps[-1]  # the logs were flushed up to it
    assert not (out / "LEASE.json").exists()  # released for the rerun
    code = train_main(["--config", "tiny", f"out={out}", f"steps={steps[-1] + 1}", "checkpoint.every=1000",
                       "log.every=1", *TINY])  # fmt: skip
    assert code == 0
    assert json.loads((out / "summary.json").read_text())["step"] == steps[-1] + 1


# -- one writer per run ---------------------------------------------------------------------------------------


def test_a_second_trainer_is_refused_and_a_stale_lease_is_taken_only_when_asked(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    # a heartbeat a day in the future (the holder's clock is off) and a lone stale_minutes: no clock is compared,
    # the counter is watched on this host's clock
    lease = {"holder": "node-7/abc", "host": "node-7", "pid": 4242, "started": time.time(),
             "heartbeat": time.time() + 86400, "beats": 3}  # fmt: skip
    (out / "LEASE.json").write_text(json.dumps(lease))
    watch = "lease.stale_minutes=0.002"  # 0.12 s
    code, err = _train(out, "steps=1", watch, capsys=capsys)
    assert code == 2 and "node-7/abc" in err and "pid 4242" in err and "Traceback" not in err
    assert "looks dead" not in err and "lease.take_over=true" in err  # first sight: not yet judged
    assert not (out / "checkpoints").exists()  # refused before anything was written
    time.sleep(0.2)
    code, err = _train(out, "steps=1", watch, capsys=capsys)
    assert code == 2 and "looks dead" in err and "heartbeat unchanged for" in err and "lease.take_over=true" in err
    lease["beats"] += 1  # it beat meanwhile: alive again, whatever its clock says
    (out / "LEASE.json").write_text(json.dumps(lease))
    code, err = _train(out, "steps=1", watch, capsys=capsys)
    assert code == 2 and "looks dead" not in err
    code, err = _train(out, "steps=1", "lease.take_over=true", capsys=capsys)
    assert code == 0 and not (out / "LEASE.json").exists()


@pytest.mark.parametrize("field", ["heartbeat", "pid", "holder"])
def test_a_lease_with_a_field_of_the_wrong_type_is_named_and_taken_over_only_when_asked(tmp_path, capsys, field):
    out = tmp_path / "run"
    out.mkdir()
    lease = {"holder": "node-7/abc", "host": "node-7", "pid": 4242, "started": 0.0, "heartbeat": 0.0}
    lease[field] = [1] if field == "holder" else "soon"
    (out / "LEASE.json").write_text(json.dumps(lease))
    code, err = _train(out, "steps=1", capsys=capsys)
    assert code == 2 and f"field {field!r}" in err and "LEASE.json" in err and "Traceback" not in err
    assert "lease.take_over=true" in err
    code, err = _train(out, "steps=1", "lease.take_over=true", capsys=capsys)
    assert code == 0


def test_a_dead_holder_on_this_host_is_stale_at_once(tmp_path, capsys):
    import socket

    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lease = {"holder": f"{socket.gethostname()}/{dead.pid}", "host": socket.gethostname(), "pid": dead.pid,
             "started": time.time(), "heartbeat": time.time()}  # fmt: skip
    (out / "LEASE.json").write_text(json.dumps(lease))
    code, err = _train(out, "steps=1", capsys=capsys)
    assert code == 0, err
    alive = {**lease, "holder": f"{socket.gethostname()}/{os.getppid()}", "pid": os.getppid()}
    (out / "LEASE.json").write_text(json.dumps(alive))
    code, err = _train(out, "steps=1", "steps=2", capsys=capsys)
    assert code == 2 and "held by another trainer" in err


def test_a_paused_trainer_whose_lease_was_taken_over_stops_without_writing(tmp_path):
    """Trainer A is paused (SIGSTOP) mid-run, B takes the run over and finishes it, A is resumed: A stops with
    exit 75 at its next write and leaves B's run as B left it."""
    out = tmp_path / "run"
    distar = str(Path(sys.executable).with_name("distar"))
    quiet = ["log.progress=false", "log.tensorboard=false", "log.sample_every=1000", "log.every=1"]
    a = subprocess.Popen([distar, "train", "--config", "tiny", f"out={out}", "steps=400", "checkpoint.every=2", *quiet],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        metrics = out / "logs" / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert a.poll() is None and time.monotonic() < deadline, a.stderr.read() if a.poll() is not None else ""
            time.sleep(0.2)
        a.send_signal(signal.SIGSTOP)
        latest = max(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*") if (p / MARKER).exists())
        refused = subprocess.run([distar, "train", "--config", "tiny", f"out={out}", "steps=400", "checkpoint.every=2",
                                  *quiet], capture_output=True, text=True)  # fmt: skip
        assert refused.returncode == 2 and "held by another trainer" in refused.stderr
        over = [f"steps={latest + 2}", "checkpoint.every=2", "lease.take_over=true", *quiet]
        b = subprocess.run([distar, "train", "--config", "tiny", f"out={out}", *over], capture_output=True, text=True)
        assert b.returncode == 0, b.stderr[-2000:]
        after_b = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        a.send_signal(signal.SIGCONT)
        _, a_err = a.communicate(timeout=120)
    finally:
        a.kill()
    assert a.returncode == 75, a_err[-2000:]
    assert "took this output over" in a_err and "Traceback" not in a_err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == after_b  # A wrote nothing more
    assert json.loads((out / "summary.json").read_text())["step"] == latest + 2


def test_two_trainers_started_together_get_one_lease(tmp_path):
    from distar.train.lease import Lease, LeaseHeldError

    first, second = Lease(str(tmp_path)), Lease(str(tmp_path))
    second.record["holder"] = "other-host/1"
    first.acquire()
    with pytest.raises(LeaseHeldError, match="held by another trainer"):
        second.acquire()
    first.release()
    second.acquire()


# -- inputs must be complete; no destructive defaults -------------------------------------------------------


def test_a_curated_set_without_its_manifest_is_refused(tmp_path, capsys):
    prompts = tmp_path / "prompts"
    code = cli.main(["curate", "--source", str(Path(__file__).parents[1] / "data" / "PartiPrompts.tsv"), "--out",
                     str(prompts), "--tokenizer", "tiny:sdxl"])  # fmt: skip
    assert code == 0
    (prompts / "manifest.json").unlink()  # as a curation killed before its last write leaves it
    capsys.readouterr()
    code, err = _train(tmp_path / "run", f"data.prompts={prompts}", "steps=1", capsys=capsys)
    assert code == 2 and "without its manifest.json" in err and "distar curate" in err


@pytest.mark.parametrize("out", ["", "/", "file:///", "s3://"])
def test_an_empty_or_root_output_is_refused(out, capsys):
    code, err = _train(out, "steps=1", capsys=capsys)
    assert code == 2 and "config key 'out'" in err


def test_export_never_overwrites_a_users_files_or_writes_into_the_run(run_copy, tmp_path, capsys):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "README.md").write_text("my notes")
    newest = str(run_copy / "checkpoints" / "step_00000004")
    assert cli.main(["export", "--checkpoint", newest, "--out", str(target)]) == 2
    assert "not empty" in capsys.readouterr().err and (target / "README.md").read_text() == "my notes"
    assert cli.main(["export", "--checkpoint", newest, "--out", str(run_copy / "export")]) == 2
    assert "inside the training run" in capsys.readouterr().err
    assert cli.main(["export", "--checkpoint", newest, "--out", str(target), "--force"]) == 0
    assert (target / "model_index.json").is_file()


# -- one message, exit 2 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override,message",
    [("loss.alpha_rew=-1", "'loss.alpha_rew' must be a finite number ≥ 0"),
     ("loss.alpha_rew=nan", "'loss.alpha_rew' must be a finite number ≥ 0"),
     ("generator_optim.lr=0", "'generator_optim.lr' must be a finite number > 0"),
     ("loss.huber_c=inf", "'loss.huber_c' must be a finite number > 0"),
     ("assistant_optim.beta2=1", "'assistant_optim.beta2' must be in [0, 1)")],
)  # fmt: skip
def test_numeric_fields_outside_their_domain_are_refused(tmp_path, capsys, override, message):
    code, err = _train(tmp_path / "run", override, capsys=capsys)
    assert code == 2 and message in err and not (tmp_path / "run").exists()


def test_resuming_with_a_changed_config_lists_the_keys_and_needs_the_flag(finished_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    code, err = _train(run, "steps=5", "loss.alpha_rew=3", "generator_optim.lr=2e-4", capsys=capsys)
    assert code == 2 and "generator_optim.lr" in err and "loss.alpha_rew" in err and "--allow-config-change" in err
    assert "steps" not in err.split("in:")[1].split(".")[0]  # steps is a safe key
    code = train_main(["--config", "tiny", f"out={run}", *TINY, "steps=5", "loss.alpha_rew=3",
                       "--allow-config-change"])  # fmt: skip
    assert code == 0


def test_credentials_in_uris_are_redacted_in_config_json_and_errors(tmp_path, capsys):
    secret = "https://alice:s3cr3t-token@models.example.org/sdxl"
    code, err = _train(tmp_path / "run", "steps=1", f"model.vae={secret}", "model.offline=true", capsys=capsys)
    assert code == 2 and "s3cr3t-token" not in err and "https://***@models.example.org" in err
    from distar.train.config import load_config

    config = load_config("tiny", [f"model.vae={secret}"])
    assert "s3cr3t-token" not in json.dumps(config.to_dict())


def test_storage_failures_are_one_message(tmp_path, capsys):
    out = tmp_path / "toy"
    out.mkdir()
    (out / "metrics.json").symlink_to("/dev/full")  # every write there fails with ENOSPC, as on a full disk
    code = cli.main(["toy", "--out", str(out), "steps=2", "assistant_warmup=1", "eval_samples=100", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "ENOSPC" in err and "Traceback" not in err
    code = cli.main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "e")])
    assert code == 2 and "neither a complete checkpoint" in capsys.readouterr().err
    corrupt = tmp_path / "cache"
    corrupt.mkdir()
    (corrupt / "manifest.json").write_text("{not json")
    code = cli.main(["cache", "--verify", "--out", str(corrupt)])
    assert code == 2 and "does not parse" in capsys.readouterr().err


def test_an_s3_bucket_without_credentials_is_one_message(tmp_path, capsys, monkeypatch):
    with server("s3", "distar-nocreds") as env:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(key, raising=False)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        code = cli.main(["curate", "--source", "s3://distar-nocreds/prompts.txt", "--out", str(tmp_path / "p"),
                         "--tokenizer", "tiny:sdxl"])  # fmt: skip
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]  # (botocore's own logging may print above it)
        assert env and code == 2 and last.startswith("distar curate: error:") and "credentials" in last.lower()
        s3fs.S3FileSystem.clear_instance_cache()


def test_a_ten_megabyte_line_is_cut_before_tokenizing(tmp_path):
    source = tmp_path / "one-line.txt"
    source.write_text("a red cube " * 1_000_000 + "\nshort prompt\n")
    code = cli.main(["curate", "--source", str(source), "--out", str(tmp_path / "p"), "--tokenizer", "tiny:sdxl"])
    assert code == 0
    stats = json.loads((tmp_path / "p" / "stats.json").read_text())
    assert stats["cut_chars"] == 1 and stats["rows_out"] == 2 and stats["truncated"] == 1


def test_a_config_error_before_torchrun_is_one_message_and_a_good_config_runs_under_it(tmp_path):
    distar = str(Path(sys.executable).with_name("distar"))
    launch = [distar, "train", "--config", "tiny", "--nproc-per-node", "2"]
    bad = subprocess.run([*launch, f"out={tmp_path / 'bad'}", "loss.alpha_rew=-1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "ChildFailedError" not in bad.stderr and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        "distar train: error: config key 'loss.alpha_rew' must be a finite number ≥ 0, got -1.0"
    ]
    quiet = ["steps=1", "log.progress=false", "log.tensorboard=false"]
    good = subprocess.run([*launch, f"out={tmp_path / 'good'}", *quiet], capture_output=True, text=True)
    assert good.returncode == 0, good.stderr[-2000:]
    assert json.loads((tmp_path / "good" / "summary.json").read_text())["step"] == 1


def test_an_unreachable_object_store_fails_within_seconds(tmp_path, capsys, monkeypatch):
    import socket

    with socket.socket() as sock:  # a port on loopback that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    started = time.monotonic()
    code = cli.main(["curate", "--source", "s3://bucket/prompts.txt", "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert code == 2 and f"cannot reach 127.0.0.1:{port}" in err and time.monotonic() - started < 15


@pytest.mark.parametrize("case", ["forged safetensors header", "lease held elsewhere", "prompts inside a set"])
def test_hostile_inputs_under_torchrun_are_one_line_and_exit_2(tmp_path, case):
    """Two torchrun workers meet the same bad input: rank 0 says it once, the launcher exits 2, no failure report."""
    import shutil

    from distar import sources, tiny_preset

    out, extra = tmp_path / "run", []
    if case == "forged safetensors header":
        tiny_preset.prepare(["tiny:sdxl"])
        model = tmp_path / "sdxl"
        shutil.copytree(sources.tiny_path("sdxl"), model)
        weights = next((model / "unet").glob("*.safetensors"))
        weights.write_bytes((2**63).to_bytes(8, "little") + weights.read_bytes()[8:])
        extra, named = [f"model.reference={model}"], weights.name
    elif case == "lease held elsewhere":
        out.mkdir()
        (out / "LEASE.json").write_text(json.dumps({"holder": "node-9/x", "host": "node-9", "pid": 1, "heartbeat": 1}))
        named = "LEASE.json"
    else:
        prompts = tmp_path / "set"
        code = cli.main(["curate", "--source", str(Path(__file__).parents[1] / "data" / "PartiPrompts.tsv"),
                         "--out", str(prompts), "--tokenizer", "tiny:sdxl"])  # fmt: skip
        assert code == 0
        extra, named = [f"data.prompts={prompts / 'train'}"], "inside a curated set"
    distar = str(Path(sys.executable).with_name("distar"))
    quiet = ["log.progress=false", "log.tensorboard=false"]
    cmd = [distar, "train", "--nproc-per-node", "2", "--config", "tiny", f"out={out}", "steps=1", *quiet, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("distar train: error: ") and named in lines[0], lines


def test_object_store_writes_that_never_recover_are_one_message(tmp_path, capsys):
    """Every object write answered with S3's 500 InternalError, however often retried: one message, exit 2."""
    from helpers.storage_servers import s3_refusing_writes

    parti = str(Path(__file__).parents[1] / "data" / "PartiPrompts.tsv")
    with s3_refusing_writes("bucket"):
        code = cli.main(["curate", "--source", parti, "--out", "s3://bucket/prompts", "--tokenizer", "tiny:sdxl"])
        err = capsys.readouterr().err
        assert code == 2 and "kept failing a request after every retry" in err and "Traceback" not in err
        code, err = _train("s3://bucket/run", "steps=1", capsys=capsys)
        assert code == 2 and "kept failing a request after every retry" in err and "Traceback" not in err


def test_a_pipeline_without_unet_weights_is_named_before_diffusers_reads_it(tmp_path):
    import shutil

    from distar import backbones, sources, tiny_preset
    from distar.errors import UserError

    tiny_preset.prepare(["tiny:sdxl"])
    pipeline = tmp_path / "pipeline"
    shutil.copytree(sources.tiny_path("sdxl"), pipeline)
    for weights in (pipeline / "unet").glob("diffusion_pytorch_model*"):
        weights.unlink()
    with pytest.raises(UserError, match="is missing 1 file") as err:
        backbones.get("sdxl").load_pipeline(pipeline, torch.float32)
    assert "unet/diffusion_pytorch_model.safetensors" in str(err.value)


def test_a_checkpoint_that_does_not_fit_is_one_message_and_the_earlier_one_stays(run_copy):
    """The kernel refuses writes past a file-size limit (RLIMIT_FSIZE, EFBIG), as a full disk refuses them: DCP's
    shard write fails inside its own exception, which the trainer unwraps into the one message."""
    import resource

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    before = {p: p.read_bytes() for p in (run_copy / "checkpoints" / "step_00000004").rglob("*") if p.is_file()}
    cmd = [sys.executable, "-m", "distar.train", "--config", "tiny", f"out={run_copy}", "steps=6",
           "checkpoint.every=2", *TINY]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limited)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert "Traceback" not in proc.stderr and len(lines) == 1
    assert "could not be written" in lines[0] or "no room to write (EFBIG" in lines[0]
    after = {p: p.read_bytes() for p in (run_copy / "checkpoints" / "step_00000004").rglob("*") if p.is_file()}
    assert after == before  # the complete checkpoint it resumed from is untouched
