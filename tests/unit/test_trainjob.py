"""The TrainJob manifest: against the Trainer API models (no unknown keys) and against what every supported Trainer
release admits (v2.3.0 and the main branch: schema, CEL, webhook), and why v2.2.1 is below the floor;
`distar trainjob render`. The launcher: tests/integration/test_trainjob_launcher.py."""

from __future__ import annotations

import copy

import pytest

from distar.errors import UserError
from distar.train.trainjob import TrainJobSpec, job_name, manifest


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
        max_restarts=3,
        active_deadline_s=7 * 86400,
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
        trainer["command"][:7] == ["torchrun", "--shutdown-timeout", "600", "--max-restarts", "3", "-m", "distar.train"]
        and trainer["numNodes"] == 4
    )
    assert trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": "8"}
    assert job["spec"]["activeDeadlineSeconds"] == 7 * 86400
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


# -- admission: what a Trainer v2.3.0 cluster enforces (tests/helpers/trainer_api.py) -------------------------

OPTIONS = {
    "bare": {"env": {}, "secret_env": {}, "node_selector": {}, "tolerations": [], "service_account": None,
             "cpu_per_node": None, "memory_per_node": None},
    "cpu-only": {"gpus_per_node": 0, "num_nodes": 1, "nproc_per_node": 2, "max_restarts": None,
                 "active_deadline_s": None, "runtime": "torch-distributed"},
    "everything": {},
    "s3-secrets": {"secret_env": {"AWS_ACCESS_KEY_ID": "distar-storage/access-key",
                                  "AWS_SECRET_ACCESS_KEY": "distar-storage/secret-key"}},
    "many-tolerations": {"tolerations": [{"key": "a", "operator": "Equal", "value": "b", "effect": "NoExecute"},
                                         {"key": "c", "operator": "Exists"}]},
}  # fmt: skip


@pytest.mark.parametrize("release", ["v2.3.0", "master"])
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_every_trainjob_the_launcher_makes_is_admitted(name, release):
    from helpers.trainer_api import SUPPORTED, problems

    assert release in SUPPORTED
    job = manifest(spec(**OPTIONS[name]))
    assert problems(job, release) == []
    labels = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert labels["template"]["spec"]["template"]["metadata"]["labels"]["sidecar.istio.io/inject"] == "false"


def test_trainer_2_2_lacks_only_the_grace_period_which_is_why_the_floor_is_2_3():
    from helpers.trainer_api import BELOW_FLOOR, problems

    found = problems(manifest(spec()), BELOW_FLOOR)
    assert found and all("terminationGracePeriodSeconds" in p for p in found), found


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
    """The command as users run it, in a process of its own: stdout is the manifest and nothing else."""
    import subprocess
    import sys

    import yaml
    from helpers.trainer_api import problems

    from distar import cli

    args = ["trainjob", "render", "--image", "reg/distar@sha256:abc", "--name", "r1", "--namespace", "team",
            "--num-nodes", "2", "--secret-env", "HF_TOKEN=distar-hub/token", "--node-selector", "pool=h100",
            "--toleration", "nvidia.com/gpu:NoSchedule", "--toleration", "spot=true:NoExecute",
            "--service-account", "distar-trainer", "--queue", "gpus", "data.prompts=gs://b/p",
            "out=gs://b/r1"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "distar.cli", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("apiVersion: trainer.kubeflow.org/v1alpha1\n"), proc.stdout[:500]
    rendered = yaml.safe_load(proc.stdout)
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


def test_job_names_are_deterministic_valid_and_distinct():
    from helpers.trainer_api import problems

    name = job_name("0b9c-run", "train")
    assert name == job_name("0b9c-run", "train") and len(name) <= 63
    assert len({name, job_name("0b9c-run", "train", "kl"), job_name("other-run", "train")}) == 3
    assert problems(manifest(spec(name=name))) == []


def test_the_spec_digest_changes_with_what_runs_and_only_with_it():
    from distar.train.trainjob import SPEC_DIGEST

    digest = lambda job: job["metadata"]["annotations"][SPEC_DIGEST]  # noqa: E731
    same = manifest(spec())
    assert digest(same) == digest(manifest(spec(namespace="elsewhere")))
    assert digest(same) != digest(manifest(spec(image="reg/distar:0.2.0")))
    assert digest(same) != digest(manifest(spec(overrides=["out=gs://b/other"])))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"name": "Distar-Run"}, "TrainJob name"),
        ({"name": "d" * 64}, "at most 63"),
        ({"name": "run\nkind: Pod"}, "TrainJob name"),
        ({"name": "run;rm"}, "TrainJob name"),
        ({"namespace": "Team A"}, "TrainJob namespace"),
        ({"num_nodes": "4"}, "num_nodes must be a whole number"),
        ({"nproc_per_node": True}, "nproc_per_node must be a whole number"),
        ({"env": {"BAD-NAME": "1"}}, "environment variable names"),
        ({"overrides": ["steps=1\nimage: evil"]}, "newlines"),
    ],
)
def test_names_and_numbers_kubernetes_would_refuse_are_refused_before_rendering(change, message):
    from dataclasses import replace

    spec = replace(TrainJobSpec(name="distar-run", namespace="team-a", image="img"), **change)
    with pytest.raises(UserError, match=message):
        manifest(spec)
