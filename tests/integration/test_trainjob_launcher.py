"""The TrainJob launcher against a stand-in Kubernetes API on 127.0.0.1 (tests/helpers/kube_api.py) that admits
only what Trainer v2.3.0 admits and behaves as the API server, the garbage collector and Trainer's controller do:
create, follow (Running read from the pods), stream, adopt on retry (never a job being deleted), retry transient
errors and hung connections, delete on SIGTERM, on a Suspended timeout before admission and when the keep time has
passed, own the job by the run's Workflow; and the RBAC Role grants exactly the verbs it uses."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.kube_api import Cluster, kube_api

from distar.train.trainjob import (
    KEEP_SECONDS,
    TrainJobFailed,
    TrainJobLauncher,
    TrainJobSpec,
    job_name,
    manifest,
)

ROOT = Path(__file__).resolve().parents[2]
NS = "team"


def spec(**kwargs) -> TrainJobSpec:
    base = dict(
        name=job_name("run-1", "train"),
        namespace=NS,
        image="reg/distar:0.1.0",
        overrides=["out=gs://b/r"],
        num_nodes=2,
        secret_env={"HF_TOKEN": "distar-hub/HF_TOKEN"},
        service_account="distar-trainer",
    )
    return TrainJobSpec(**{**base, **kwargs})


def launcher(api, core, lines: list, **kwargs) -> TrainJobLauncher:
    return TrainJobLauncher(api, core, poll_s=0, backoff_s=0, log=lines.append, **kwargs)


def test_created_followed_streamed_and_kept():
    cluster = Cluster(
        states=["Pending", "Running", "Running", "Running", "Complete"],
        logs=["distar train: starting fresh", "step 1", "step 2"],
        trainer_status={
            2: {
                "progressPercentage": 50,
                "estimatedRemainingSeconds": 3600,
                "lastUpdatedTime": "t1",
                "metrics": [{"name": "reward", "value": "21.5"}],
            }
        },
    )
    lines: list[str] = []
    with kube_api(cluster) as (api, core, _):
        job = launcher(api, core, lines).run(manifest(spec()))
    assert job["status"]["conditions"][0]["type"] == "Complete"
    assert len(cluster.created) == 1 and cluster.deleted == []  # kept for its keep time
    streamed = [line.split("] ", 1)[1] for line in lines if line.startswith("[")]
    assert streamed == ["distar train: starting fresh", "step 1", "step 2"]  # rank 0 only, each line once
    assert all("node-0-0" in line for line in lines if line.startswith("["))
    assert any("progress: 50% done, ETA 1:00:00, reward=21.5" in line for line in lines)


def test_a_manifest_the_webhook_refuses_fails_with_the_webhooks_words():
    job = manifest(spec())
    job["spec"]["runtimePatches"][0]["manager"] = "distar"
    with kube_api(Cluster()) as (api, core, _), pytest.raises(TrainJobFailed) as err:
        launcher(api, core, []).run(job)
    assert "403" in str(err.value) and "denied the request" in str(err.value) and "domain-prefixed" in str(err.value)


def test_a_retry_adopts_the_job_of_the_same_spec_and_refuses_another_spec():
    cluster = Cluster(states=["Running", "Running", "Running", "Complete"])
    with kube_api(cluster) as (api, core, _):
        first = manifest(spec())
        cluster.jobs[(NS, first["metadata"]["name"])] = json.loads(json.dumps(first))  # an earlier attempt's job
        lines: list[str] = []
        launcher(api, core, lines).run(manifest(spec()))
        assert cluster.created == [] and any("adopting TrainJob" in line for line in lines)
        with pytest.raises(TrainJobFailed, match="already exists with a different spec"):
            launcher(api, core, []).run(manifest(spec(image="reg/distar:0.2.0")))


def test_a_retry_after_a_failed_attempt_replaces_the_failed_job():
    cluster = Cluster(states=["Failed"])
    with kube_api(cluster) as (api, core, _):
        with pytest.raises(TrainJobFailed, match="failed: FailedReason") as err:
            launcher(api, core, []).run(manifest(spec()))
        assert "kept for inspection" in str(err.value) and cluster.deleted == []
        cluster.states = ["Running", "Complete"]
        lines: list[str] = []
        launcher(api, core, lines).run(manifest(spec()))
    assert len(cluster.created) == 2 and cluster.deleted == [spec().name]
    assert any("an earlier attempt failed" in line for line in lines)


def test_transient_errors_are_retried_and_a_create_lost_in_a_reset_is_adopted():
    cluster = Cluster(states=["Running", "Complete"])
    cluster.fault("POST", "trainjobs$", "429")
    cluster.fault("POST", "trainjobs$", "503")
    cluster.fault("POST", "trainjobs$", "reset-after")  # created, but the answer never arrives
    cluster.fault("GET", "trainjobs/", "reset")
    lines: list[str] = []
    with kube_api(cluster) as (api, core, _):
        launcher(api, core, lines).run(manifest(spec()))
    retried = [line for line in lines if "retrying in" in line]
    assert len(retried) == 4 and "429" in retried[0] and "503" in retried[1]
    assert len(cluster.created) == 1 and any("adopting" in line for line in lines)


def test_errors_that_persist_end_the_step_clearly():
    cluster = Cluster()
    cluster.fault("POST", "trainjobs$", "503", times=10)
    with kube_api(cluster) as (api, core, _), pytest.raises(TrainJobFailed, match="could not create .*503"):
        launcher(api, core, [], retries=2).run(manifest(spec()))


def test_a_job_suspended_too_long_is_deleted_and_named():
    cluster = Cluster(states=["Suspended"])
    ticks = iter(range(0, 10_000, 100))
    with kube_api(cluster) as (api, core, _), pytest.raises(TrainJobFailed, match="stayed Suspended .* 250 s"):
        launcher(api, core, [], suspend_timeout_s=250, clock=lambda: next(ticks)).run(manifest(spec(queue="gpus")))
    assert cluster.deleted == [spec().name]


def test_finished_jobs_past_their_keep_time_are_deleted_by_the_next_launch():
    cluster = Cluster(states=["Running", "Complete"])
    with kube_api(cluster) as (api, core, _):
        for run_id, keep in (("old", "60"), ("recent", "999999")):
            job = manifest(spec(name=job_name(run_id, "train")))
            job["metadata"]["annotations"][KEEP_SECONDS] = keep
            job["status"] = {
                "conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]
            }
            cluster.jobs[(NS, job["metadata"]["name"])] = job
        later = lambda: dt.datetime(2026, 1, 1, 0, 5, tzinfo=dt.UTC)  # noqa: E731
        launcher(api, core, [], now=later).run(manifest(spec()))
    assert cluster.deleted == [job_name("old", "train")]
    assert (NS, job_name("recent", "train")) in cluster.jobs and (NS, spec().name) in cluster.jobs


def test_housekeeping_and_log_streaming_never_fail_the_step():
    """A sweep whose delete is forbidden and a log read that drops its connection are logged and passed over."""
    cluster = Cluster(states=["Running", "Running", "Complete"], logs=["a", "b"])
    old = manifest(spec(name=job_name("old", "train")))
    old["metadata"]["annotations"][KEEP_SECONDS] = "0"
    old["status"] = {
        "conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]
    }
    cluster.jobs[(NS, old["metadata"]["name"])] = old
    cluster.fault("DELETE", "trainjobs/", "403")
    cluster.fault("GET", "/log$", "reset")
    lines: list[str] = []
    with kube_api(cluster) as (api, core, _):
        job = launcher(api, core, lines).run(manifest(spec()))
    assert job["status"]["conditions"][0]["type"] == "Complete"
    assert any("could not delete finished TrainJob" in line and "403" in line for line in lines)
    assert any(line.endswith("] b") for line in lines)  # streaming went on after the dropped read


SIGTERM_SCRIPT = """
import sys
from kubernetes import client
from distar.train.trainjob import TrainJobLauncher, TrainJobSpec, manifest
config = client.Configuration(); config.host = sys.argv[1]
api_client = client.ApiClient(config)
job = manifest(TrainJobSpec(name="distar-sigterm", namespace="team", image="i", overrides=["out=gs://b/r"]))
TrainJobLauncher(client.CustomObjectsApi(api_client), client.CoreV1Api(api_client), poll_s=0.2).run(job)
"""


def test_sigterm_of_the_step_deletes_its_trainjob():
    cluster = Cluster(states=["Running"], logs=["training"] * 1000)
    with kube_api(cluster) as (_, _, url):
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        proc = subprocess.Popen(
            [sys.executable, "-c", SIGTERM_SCRIPT, url],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 60
        while not cluster.gets and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0 and cluster.deleted == ["distar-sigterm"], out
    assert "stopped by SIGTERM" in out and "[distar-sigterm-node-0-0-abcde] training" in out


def test_the_role_grants_exactly_the_verbs_the_launcher_uses(monkeypatch):
    """Every path of the launcher (sweep, create, adopt, replace, follow, stream, delete, its own pod for the owner
    reference) against the stand-in, then the Role of k8s/base: the same (resource, verb) pairs, nothing more."""
    from helpers.k8s import rendered

    from distar.train.launch import _owner

    cluster = Cluster(states=["Failed"], logs=["x"])
    with kube_api(cluster) as (api, core, _):
        step = cluster.add_workflow(NS, "distar-run-abc")
        monkeypatch.setenv("HOSTNAME", step["metadata"]["name"])
        assert _owner(core, NS)[0]["uid"] == "uid-wf-distar-run-abc"
        with pytest.raises(TrainJobFailed):
            launcher(api, core, []).run(manifest(spec()))
        cluster.states = ["Running", "Complete"]
        launcher(api, core, []).run(manifest(spec()))
        launcher(api, core, []).run(manifest(spec()))  # adopts the finished job
    used = cluster.verbs
    for overlay in ("standalone", "multi-user"):
        roles = [o for o in rendered(overlay) if o["kind"] == "Role" and o["metadata"]["name"] == "distar-trainjobs"]
        granted = {
            (resource, verb) for rule in roles[0]["rules"] for resource in rule["resources"] for verb in rule["verbs"]
        }
        assert granted == used, (overlay, granted ^ used)


def test_run_trainjob_checks_uris_before_any_pod_and_reads_the_summary_from_object_storage():
    import fsspec
    from helpers.storage_servers import s3_server

    from distar.errors import UserError
    from distar.train.launch import run_trainjob

    cluster = Cluster(states=["Running", "Complete"])
    with kube_api(cluster) as (api, core, _):
        prompts = "data.prompts=s3://x/p"
        for bad, key in (
            (["out=/local/run", prompts], "out"),
            (["out=minio://mlpipeline/r", prompts], "--pipeline-root"),
            (["out=https://host/r", prompts], "out"),
            (["out=s3://x/r"], "data.prompts"),
            (["out=s3://x/r", prompts, "model.cache_dir=/cache"], "model.cache_dir"),
        ):
            with pytest.raises(UserError, match=key):
                run_trainjob("tiny", bad, spec=spec(), api=api, core=core, poll_s=0)
        assert cluster.created == []  # refused before anything was created
        with s3_server("launch-runs"):
            fs, _ = fsspec.core.url_to_fs("s3://launch-runs")
            fs.pipe_file("launch-runs/r1/summary.json", json.dumps({"step": 7, "checkpoint": "s3://x"}).encode())
            args = ["out=s3://launch-runs/r1", prompts, "steps=7"]
            summary = run_trainjob("tiny", args, spec=spec(), api=api, core=core, poll_s=0)
    assert summary["step"] == 7
    created = cluster.created[0]["spec"]["trainer"]
    assert created["command"][-3:] == args and created["numNodes"] == 2


# -- what real clusters do that the launcher must survive ----------------------------------------------------


def test_running_is_read_from_the_pods_as_trainer_writes_no_condition_for_it():
    cluster = Cluster(states=["Pending", "Running", "Running", "Complete"])
    lines: list[str] = []
    with kube_api(cluster) as (api, core, _):
        job = launcher(api, core, lines).run(manifest(spec()))
    assert [c["type"] for c in job["status"]["conditions"]] == ["Complete"]  # nothing else was ever written
    states = [line.rsplit(": ", 1)[1] for line in lines if line.startswith(f"TrainJob {NS}/")]
    assert states == ["Pending", "Running", "Complete"]


def test_the_job_is_owned_by_the_run_not_by_the_step_pod(monkeypatch):
    """Draining the node of the 1-CPU step pod must not take the GPU job with it; deleting the run must."""
    from distar.train.launch import _owner

    cluster = Cluster(states=["Running"])
    with kube_api(cluster) as (api, core, _):
        step = cluster.add_workflow(NS, "distar-run-abc")
        monkeypatch.setenv("HOSTNAME", step["metadata"]["name"])
        job = manifest(spec())
        job["metadata"]["ownerReferences"] = _owner(core, NS)
        assert job["metadata"]["ownerReferences"][0]["kind"] == "Workflow"
        api.create_namespaced_custom_object("trainer.kubeflow.org", "v1alpha1", NS, "trainjobs", job)
        cluster.delete_pod(NS, step["metadata"]["name"])  # evicted
        assert (NS, spec().name) in cluster.jobs
        cluster.delete_workflow(NS, "distar-run-abc")  # the run is deleted
        assert (NS, spec().name) not in cluster.jobs and cluster.collected == [spec().name]

        # the owner as it was (the step's pod): the eviction collects the whole job
        step = cluster.add_workflow(NS, "distar-run-def")
        job = manifest(spec())
        job["metadata"]["ownerReferences"] = [
            {"apiVersion": "v1", "kind": "Pod", "name": step["metadata"]["name"], "uid": step["metadata"]["uid"]}
        ]
        api.create_namespaced_custom_object("trainer.kubeflow.org", "v1alpha1", NS, "trainjobs", job)
        cluster.delete_pod(NS, step["metadata"]["name"])
        assert (NS, spec().name) not in cluster.jobs


def test_outside_a_workflow_the_job_gets_no_owner(monkeypatch, capsys):
    from distar.train.launch import _owner

    cluster = Cluster()
    with kube_api(cluster) as (_, core, _url):
        cluster.add_pod(NS, "a-plain-pod")
        monkeypatch.setenv("HOSTNAME", "a-plain-pod")
        assert _owner(core, NS) == []
        monkeypatch.setenv("HOSTNAME", "no-such-pod")
        assert _owner(core, NS) == []
    assert "belongs to no Argo Workflow" in capsys.readouterr().out


def test_a_retry_waits_out_a_job_still_being_deleted_then_creates_it():
    """Foreground deletion keeps the job (deletionTimestamp set) while its pods stop: adopting it would follow a job
    that is about to vanish."""
    cluster = Cluster(states=["Running", "Complete"], deletion_polls=3)
    with kube_api(cluster) as (api, core, _):
        first = manifest(spec())
        api.create_namespaced_custom_object("trainer.kubeflow.org", "v1alpha1", NS, "trainjobs", first)
        api.delete_namespaced_custom_object(
            "trainer.kubeflow.org", "v1alpha1", NS, "trainjobs", spec().name, propagation_policy="Foreground"
        )
        assert cluster.jobs[(NS, spec().name)]["metadata"]["deletionTimestamp"]
        lines: list[str] = []
        job = launcher(api, core, lines).run(manifest(spec()))
    assert any("is being deleted; waiting" in line for line in lines)
    assert not any("adopting" in line for line in lines)
    assert len(cluster.created) == 2 and job["metadata"]["uid"] == cluster.created[1]["metadata"]["uid"]


def test_a_hung_connection_times_out_and_is_retried():
    cluster = Cluster(states=["Running", "Complete"])
    cluster.fault("GET", "trainjobs/", "hang")
    lines: list[str] = []
    started = time.monotonic()
    with kube_api(cluster) as (api, core, _):
        launcher(api, core, lines, request_timeout_s=(1.0, 1.0)).run(manifest(spec()))
    assert any("Timeout" in line and "retrying" in line for line in lines), lines
    assert time.monotonic() - started < 60


def test_the_queue_timeout_counts_only_until_admission_and_a_preempted_job_is_waited_on():
    states = ["Suspended"] * 2 + ["Resumed", "Running"] + ["Suspended"] * 6 + ["Resumed", "Running", "Complete"]
    cluster = Cluster(states=states)
    ticks = iter(range(0, 100_000, 100))
    lines: list[str] = []
    with kube_api(cluster) as (api, core, _):
        launcher(api, core, lines, suspend_timeout_s=250, clock=lambda: next(ticks)).run(manifest(spec(queue="q")))
    assert cluster.deleted == [] and any("preempted; waiting" in line for line in lines)


def test_a_job_deleted_by_someone_else_ends_the_step_with_the_reason():
    cluster = Cluster(states=["Running"] * 10)
    lines: list[str] = []
    with kube_api(cluster) as (api, core, _):
        lau = launcher(api, core, lines)
        lau.log = lambda line: (
            lines.append(line),
            line.endswith(": Running")
            and api.delete_namespaced_custom_object(
                "trainer.kubeflow.org", "v1alpha1", NS, "trainjobs", spec().name, propagation_policy="Foreground"
            ),
        )
        with pytest.raises(TrainJobFailed, match="being deleted by someone else"):
            lau.run(manifest(spec()))


# -- the stand-in's own rules: each is what the real API server or Trainer answers ----------------------------


@pytest.mark.parametrize(
    "damage, code, words",
    [
        (lambda j: j["metadata"]["labels"].update(team="x" * 64), 422, "63 characters"),
        (lambda j: j["metadata"]["labels"].update(team="-bad-"), 422, "labels"),
        (lambda j: j["metadata"]["annotations"].update(big="x" * (256 * 1024)), 422, "annotations"),
        (lambda j: j["metadata"].update(namespace="other"), 400, "does not match the namespace"),
        (lambda j: j["metadata"].update(ownerReferences=[{"apiVersion": "v1", "kind": "Pod", "name": "p"}]), 422,
         "ownerReferences.uid"),
        (lambda j: j["spec"]["runtimeRef"].update(name="no-such-runtime"), 403,
         "must be created before the TrainJob"),
    ],
)  # fmt: skip
def test_the_stand_in_refuses_what_the_api_server_and_trainer_refuse(damage, code, words):
    from kubernetes.client.exceptions import ApiException

    job = manifest(spec())
    damage(job)
    with kube_api(Cluster()) as (api, _, _url), pytest.raises(ApiException) as err:
        api.create_namespaced_custom_object("trainer.kubeflow.org", "v1alpha1", NS, "trainjobs", job)
    assert err.value.status == code and words in err.value.body


def test_the_runtime_name_is_passed_through_and_a_missing_runtime_fails_the_step():
    with kube_api(Cluster(runtimes=("torch-distributed-h100",))) as (api, core, _):
        launcher(api, core, []).run(manifest(spec(runtime="torch-distributed-h100")))
        with pytest.raises(TrainJobFailed, match="403.*must be created before"):
            launcher(api, core, []).run(manifest(spec(name=job_name("r2", "train"))))


def test_the_log_endpoint_refuses_an_unknown_container_and_honours_since_seconds():
    from kubernetes.client.exceptions import ApiException

    cluster = Cluster()
    with kube_api(cluster) as (_, core, _url):
        cluster.add_pod(NS, "p", {"jobset.sigs.k8s.io/jobset-name": "j"})
        old = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        new = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        cluster.pod_logs[(NS, "p")] = [f"{old} early", f"{new} late"]
        with pytest.raises(ApiException) as err:
            core.read_namespaced_pod_log("p", NS, container="trainer")
        assert err.value.status == 400 and "not valid for pod" in err.value.body
        assert core.read_namespaced_pod_log("p", NS, container="node", since_seconds=60) == "late\n"
        assert core.read_namespaced_pod_log("p", NS, container="node", tail_lines=5) == "early\nlate\n"


def test_the_train_steps_record_and_metadata_name_the_trainjob(tmp_path, monkeypatch):
    from helpers.kfp_artifacts import at
    from helpers.storage_servers import s3_server
    from kfp.dsl import Artifact, Dataset, Metrics

    from components.train import train
    from distar.train import launch

    seen = {}

    def run_trainjob(config, overrides, *, spec, suspend_timeout_s=None):
        spec.namespace = NS  # what the real launcher reads from the pod's service account
        seen.update(spec=spec, suspend=suspend_timeout_s)
        return {"checkpoint": "s3://runs-b/r/train/checkpoints/step_00000002", "step": 2, "config_digest": "d"}

    monkeypatch.setattr(launch, "run_trainjob", run_trainjob)
    (tmp_path / "cache.json").write_text(json.dumps({"root": "s3://runs-b/cache"}))
    run = at(Artifact, "s3://runs-b/kfp/run", str(tmp_path / "run.json"))
    with s3_server("runs-b"):
        train(
            prompts=at(Dataset, "s3://runs-b/kfp/prompts", str(tmp_path / "prompts")),
            model_cache=at(Artifact, "s3://runs-b/kfp/cache", str(tmp_path / "cache.json")),
            run=run,
            metrics=at(Metrics, "s3://runs-b/kfp/metrics", str(tmp_path / "metrics")),
            report=at(Artifact, "s3://runs-b/kfp/report", str(tmp_path / "report.html")),
            runs_root="s3://runs-b",
            run_id="r",
            task_name="train",
            max_restarts=2,
            runtime="torch-distributed-h100",
            cpu_per_node="90",
            memory_per_node="900Gi",
            active_deadline_s=86400,
        )
    name = f"{NS}/{job_name('r', 'train')}"
    assert json.loads((tmp_path / "run.json").read_text())["trainjob"] == name
    assert run.metadata["trainjob"] == name
    spec_ = seen["spec"]
    assert (spec_.max_restarts, spec_.runtime, spec_.cpu_per_node, spec_.memory_per_node) == (
        2, "torch-distributed-h100", "90", "900Gi",
    )  # fmt: skip
    assert spec_.active_deadline_s == 86400 and seen["suspend"] is None  # the queue timeout is off by default
