"""The TrainJob path: the manifest against the Trainer API models (no unknown keys), and the launcher driven
through created → running → succeeded / failed / deleted with the kubernetes client replaced at its API boundary."""

from __future__ import annotations

import copy

import pytest
from kubernetes.client.exceptions import ApiException

from distar.errors import UserError
from distar.train.trainjob import GROUP, PLURAL, TrainJobFailed, TrainJobLauncher, TrainJobSpec, manifest


def spec(**kwargs) -> TrainJobSpec:
    base = dict(
        name="di-star-1",
        namespace="distar",
        image="reg/distar:0.1.0",
        overrides=["out=gs://b/run"],
        num_nodes=4,
        nproc_per_node=8,
        gpus_per_node=8,
        cpu_per_node="90",
        memory_per_node="900Gi",
        env={"HF_HUB_OFFLINE": "1"},
        secret_env={"HF_TOKEN": "distar-hub/token"},
        node_selector={"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        service_account="distar-pipeline",
    )
    return TrainJobSpec(**{**base, **kwargs})


def _strip_none(value):
    if isinstance(value, dict):
        return {k: _strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_none(v) for v in value]
    return value


def test_manifest_is_a_valid_trainjob_with_no_unknown_keys():
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    job = manifest(spec())
    parsed = TrainerV1alpha1TrainJob.from_dict(copy.deepcopy(job))
    assert _strip_none(parsed.to_dict()) == job  # the models accept unknown keys: a dropped key shows up here
    trainer = job["spec"]["trainer"]
    assert (
        trainer["command"][:5] == ["torchrun", "--shutdown-timeout", "600", "-m", "distar.train"]
        and trainer["numNodes"] == 4
    )
    assert trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": "8"}
    pod = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod = pod["template"]["spec"]["template"]["spec"]
    assert pod["volumes"][0]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    # SIGTERM leaves time for torchrun's shutdown timeout (the checkpoint), and the pod a minute more
    assert pod["terminationGracePeriodSeconds"] == 660 > int(trainer["command"][2])
    assert trainer["env"][-1] == {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "distar-hub", "key": "token"}},
    }
    assert "env" not in pod["containers"][0]  # Trainer's webhook refuses env on the node container of a patch


def test_pod_patch_is_a_valid_pod_spec():
    import kubernetes_validate

    job = manifest(spec())
    pod = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod_spec = copy.deepcopy(pod["template"]["spec"]["template"]["spec"])
    pod_spec["containers"][0]["image"] = job["spec"]["trainer"]["image"]  # a patch omits what the runtime sets
    template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": {"spec": pod_spec}}
    kubernetes_validate.validate(template, "1.30", strict=True)


class FakeCustomObjects:
    """CustomObjectsApi's three calls, with a scripted sequence of TrainJob states."""

    def __init__(self, states: list[str], deleted_after: int | None = None):
        self.states, self.deleted_after = states, deleted_after
        self.calls, self.job, self.gets = [], None, 0

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.calls.append(("create", group, plural, namespace, body["metadata"]["name"]))
        self.job = body

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.calls.append(("get", name))
        if self.deleted_after is not None and self.gets >= self.deleted_after:
            raise ApiException(status=404, reason="Not Found")
        state = self.states[min(self.gets, len(self.states) - 1)]
        self.gets += 1
        conditions = (
            []
            if state == "Pending"
            else [{"type": state, "status": "True", "reason": f"{state}Reason", "message": f"job {state.lower()}"}]
        )
        return {**self.job, "status": {"conditions": conditions}}

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.calls.append(("delete", name))


def launcher(api, **kwargs):
    return TrainJobLauncher(api, poll_s=0, sleep=lambda s: None, log=lambda m: None, **kwargs)


def test_created_running_succeeded_then_deleted():
    api = FakeCustomObjects(["Pending", "Created", "Created", "Complete"])
    obj = launcher(api).run(manifest(spec()))
    assert obj["status"]["conditions"][0]["type"] == "Complete"
    assert api.calls[0] == ("create", GROUP, PLURAL, "distar", "di-star-1")
    assert [c[0] for c in api.calls].count("get") == 4 and api.calls[-1] == ("delete", "di-star-1")


def test_failed_job_raises_its_reason_and_is_kept_for_inspection():
    api = FakeCustomObjects(["Created", "Failed"])
    with pytest.raises(TrainJobFailed, match="failed: FailedReason: job failed"):
        launcher(api).run(manifest(spec()))
    assert ("delete", "di-star-1") not in api.calls  # cleanup="success" keeps failed jobs
    api = FakeCustomObjects(["Failed"])
    with pytest.raises(TrainJobFailed):
        launcher(api, cleanup="always").run(manifest(spec()))
    assert api.calls[-1] == ("delete", "di-star-1")


def test_deleted_job_and_timeout_fail_clearly():
    api = FakeCustomObjects(["Created"], deleted_after=2)
    with pytest.raises(TrainJobFailed, match="was deleted before it finished"):
        launcher(api).run(manifest(spec()))
    with pytest.raises(TrainJobFailed, match="did not finish within 0 s"):
        launcher(FakeCustomObjects(["Created"]), timeout_s=0).run(manifest(spec()))
    with pytest.raises(Exception, match="secret-name/key"):
        manifest(spec(secret_env={"X": "no-key"}))


def test_train_step_runs_a_trainjob_and_reads_the_summary_from_object_storage():
    import json

    import fsspec
    from helpers.storage_servers import s3_server

    from distar.errors import UserError
    from distar.train.launch import run_trainjob

    common = dict(name="j", image="img", num_nodes=2, nproc_per_node=8, gpus_per_node=8, namespace="distar")
    with pytest.raises(UserError, match="writes to object storage"):
        run_trainjob("tiny", ["out=/local/run"], api=FakeCustomObjects(["Complete"]), **common)
    with s3_server("runs"):
        fs, _ = fsspec.core.url_to_fs("s3://runs")
        fs.pipe_file("runs/r1/summary.json", json.dumps({"step": 7, "checkpoint": "s3://runs/r1/c"}).encode())
        api = FakeCustomObjects(["Created", "Complete"])
        summary = run_trainjob("tiny", ["out=s3://runs/r1", "steps=7"], api=api, **common)
        assert summary["step"] == 7
        command = api.job["spec"]["trainer"]["command"]
        assert command[-2:] == ["out=s3://runs/r1", "steps=7"] and api.job["spec"]["trainer"]["numNodes"] == 2


# -- admission: what a Trainer v2.3.0 cluster enforces (tests/helpers/trainer_api.py) -------------------------

OPTIONS = {
    "bare": {"env": {}, "secret_env": {}, "node_selector": {}, "tolerations": [], "service_account": None,
             "cpu_per_node": None, "memory_per_node": None},
    "cpu-only": {"gpus_per_node": 0, "num_nodes": 1, "nproc_per_node": 2},
    "everything": {},
    "s3-secrets": {"secret_env": {"AWS_ACCESS_KEY_ID": "distar-storage/access-key",
                                  "AWS_SECRET_ACCESS_KEY": "distar-storage/secret-key"}},
    "many-tolerations": {"tolerations": [{"key": "a", "operator": "Equal", "value": "b", "effect": "NoExecute"},
                                         {"key": "c", "operator": "Exists"}]},
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_every_trainjob_the_launcher_makes_is_admitted(name):
    from helpers.trainer_api import problems

    assert problems(manifest(spec(**OPTIONS[name]))) == []


def test_the_previous_manifest_is_refused_for_the_webhooks_reasons():
    """The manifest as it was (manager "distar", secrets as env on the node container of the patch) fails
    admission: the validator is not a rubber stamp."""
    from helpers.trainer_api import problems

    job = manifest(spec())
    patch = job["spec"]["runtimePatches"][0]
    patch["manager"] = "distar"
    pod = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    pod["containers"][0]["env"] = [e for e in job["spec"]["trainer"]["env"] if "valueFrom" in e]
    found = problems(job)
    assert any("manager 'distar' is not a domain-prefixed path" in p for p in found)
    assert any("env on the 'node' container" in p for p in found)


@pytest.mark.parametrize(
    "damage,expected",
    [(lambda j: j["spec"]["trainer"].update(numNodes="four"), "schema: spec/trainer/numNodes"),
     (lambda j: j["spec"]["trainer"].update(unknownField=1), "schema: spec/trainer"),
     (lambda j: j["metadata"].update(name="Distar_Job"), "CEL at ."),
     (lambda j: j["spec"].update(managedBy="someone-else"), "CEL at /spec/managedBy"),
     (lambda j: j["spec"]["trainer"]["env"].append({"name": "PET_NNODES", "value": "2"}), "reserves"),
     (lambda j: j["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
      .update(name="launcher"), "replicated job 'launcher'")],
)  # fmt: skip
def test_the_validator_enforces_schema_cel_and_webhook_rules(damage, expected):
    from helpers.trainer_api import problems

    job = manifest(spec())
    damage(job)
    assert any(expected in p for p in problems(job)), problems(job)


def test_reserved_torchrun_variables_are_refused_when_building_the_manifest():
    with pytest.raises(UserError, match="set by the torch-distributed runtime"):
        manifest(spec(env={"PET_NNODES": "2"}))


def test_trainjob_render_prints_exactly_what_the_launcher_creates(capsys):
    import yaml
    from helpers.trainer_api import problems

    from distar import cli

    code = cli.main(["trainjob", "render", "--image", "reg/distar@sha256:abc", "--name", "r1", "--namespace", "team",
                     "--num-nodes", "2", "--secret-env", "HF_TOKEN=distar-hub/token", "--node-selector", "pool=h100",
                     "--toleration", "nvidia.com/gpu:NoSchedule", "--toleration", "spot=true:NoExecute",
                     "--service-account", "distar-trainer", "--queue", "gpus", "data.prompts=gs://b/p",
                     "out=gs://b/r1"])  # fmt: skip
    assert code == 0
    rendered = yaml.safe_load(capsys.readouterr().out)
    expected = manifest(TrainJobSpec(
        name="r1", namespace="team", image="reg/distar@sha256:abc", overrides=["data.prompts=gs://b/p", "out=gs://b/r1"],
        num_nodes=2, secret_env={"HF_TOKEN": "distar-hub/token"}, node_selector={"pool": "h100"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                     {"key": "spot", "operator": "Equal", "value": "true", "effect": "NoExecute"}],
        service_account="distar-trainer", queue="gpus"))  # fmt: skip
    assert rendered == expected and problems(rendered) == []
    assert rendered["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpus"
    bad = ["trainjob", "render", "--image", "i", "--name", "r", "loss.alpha_rew=-1"]
    assert cli.main(bad) == 2 and "loss.alpha_rew" in capsys.readouterr().err
    assert cli.main(["trainjob", "render", "--image", "i", "--name", "r", "--toleration", "nokey"]) == 2
