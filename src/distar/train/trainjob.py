"""Multi-node training on Kubernetes: a Kubeflow Trainer v2 TrainJob (trainer.kubeflow.org/v1alpha1) on the
torch-distributed runtime, created from a pipeline step, followed to completion, cleaned up per policy.

The runtime sets PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT, so the
container command is plain `torchrun -m distar.train …`. Pod settings go in spec.runtimePatches (Trainer ≥ 2.2):
/dev/shm as a memory volume (NCCL and data loading need more than the default 64 MB), secrets as environment
variables (object storage, hub token), node selector and tolerations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from distar.errors import UserError

# Seconds torchrun waits after forwarding SIGTERM before it kills the workers: longer than the SDXL checkpoint
# (docs/TRAINING.md, "Guarantees under faults"); the pod gets a minute more before the kubelet kills it.
SHUTDOWN_TIMEOUT_S = 600
TERMINATION_GRACE_S = SHUTDOWN_TIMEOUT_S + 60
# Trainer's webhook wants a domain-prefixed path as the manager of a runtime patch (IsDomainPrefixedPath).
MANAGER = "distar.dev/launcher"
RESERVED_ENV = frozenset({"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"})

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
NODE = "node"  # the torch-distributed runtime's replicated job and container name
CLEANUP = ("always", "success", "never")


class TrainJobFailed(UserError):
    """The TrainJob ended Failed, was deleted, or timed out."""


@dataclass
class TrainJobSpec:
    name: str
    namespace: str
    image: str
    config: str = "sdxl"
    overrides: list[str] = field(default_factory=list)
    num_nodes: int = 1
    nproc_per_node: int = 8
    gpus_per_node: int = 8
    cpu_per_node: str | None = None
    memory_per_node: str | None = None
    runtime: str = "torch-distributed"
    env: dict[str, str] = field(default_factory=dict)
    secret_env: dict[str, str] = field(default_factory=dict)
    """Environment variable → "secret-name/key" (e.g. AWS_SECRET_ACCESS_KEY → "distar-s3/secret-key")."""
    shm_size: str = "64Gi"
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict] = field(default_factory=list)
    service_account: str | None = None
    queue: str | None = None
    """A Kueue LocalQueue: the job is admitted (and may be suspended) by Kueue."""


def parse_toleration(text: str) -> dict:
    """key[=value]:Effect → a toleration (Equal with a value, Exists without)."""
    body, sep, effect = text.rpartition(":")
    if not sep or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute") or not body:
        raise UserError(f"--toleration {text!r}: write key[=value]:Effect (NoSchedule, PreferNoSchedule, NoExecute)")
    key, eq, value = body.partition("=")
    if eq:
        return {"key": key, "operator": "Equal", "value": value, "effect": effect}
    return {"key": key, "operator": "Exists", "effect": effect}


def manifest(spec: TrainJobSpec) -> dict:
    if spec.num_nodes < 1 or spec.nproc_per_node < 1:
        raise UserError(f"TrainJob {spec.name!r}: num_nodes and nproc_per_node must be at least 1")
    limits, requests = {}, {}
    if spec.gpus_per_node:
        limits["nvidia.com/gpu"] = str(spec.gpus_per_node)
    for key, value in (("cpu", spec.cpu_per_node), ("memory", spec.memory_per_node)):
        if value:
            requests[key] = value
    trainer = {
        "image": spec.image,
        "command": [
            "torchrun",
            "--shutdown-timeout",
            str(SHUTDOWN_TIMEOUT_S),
            "-m",
            "distar.train",
            "--config",
            spec.config,
            *spec.overrides,
        ],
        "numNodes": spec.num_nodes,
        "numProcPerNode": spec.nproc_per_node,
        "resourcesPerNode": {k: v for k, v in (("limits", limits), ("requests", requests)) if v},
        # Every variable, secrets included, goes here: Trainer's webhook refuses env on the node container of a
        # runtime patch, and the torch plugin's PET_* names are its own.
        "env": [{"name": k, "value": v} for k, v in spec.env.items()]
        + [_secret_env(k, v) for k, v in spec.secret_env.items()],
    }
    reserved = sorted(name for name in {*spec.env, *spec.secret_env} if name in RESERVED_ENV)
    if reserved:
        raise UserError(f"TrainJob {spec.name!r}: {reserved} are set by the torch-distributed runtime itself")
    container = {
        "name": NODE,
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    pod = {
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}}],
        "containers": [container],
        # SIGTERM → the step in flight, a checkpoint, exit 75 (distar.train): room for torchrun's shutdown timeout
        "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
    }
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod["tolerations"] = list(spec.tolerations)
    if spec.service_account:
        pod["serviceAccountName"] = spec.service_account
    patch = {
        "manager": MANAGER,
        "trainingRuntimeSpec": {
            "template": {
                "spec": {"replicatedJobs": [{"name": NODE, "template": {"spec": {"template": {"spec": pod}}}}]}
            }
        },
    }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {
            "name": spec.name,
            "namespace": spec.namespace,
            "labels": {"app.kubernetes.io/part-of": "distar"}
            | ({"kueue.x-k8s.io/queue-name": spec.queue} if spec.queue else {}),
        },
        "spec": {
            "runtimeRef": {"name": spec.runtime, "kind": "ClusterTrainingRuntime", "apiGroup": GROUP},
            "trainer": trainer,
            "runtimePatches": [patch],
        },
    }


def _secret_env(name: str, ref: str) -> dict:
    secret, sep, key = ref.partition("/")
    if not sep or not secret or not key:
        raise UserError(f"secret_env {name}={ref!r}: write secret-name/key")
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


class TrainJobLauncher:
    """Create a TrainJob and follow .status.conditions until Complete or Failed (kubernetes CustomObjectsApi)."""

    def __init__(
        self,
        api,
        poll_s: float = 15.0,
        timeout_s: float | None = None,
        cleanup: str = "success",
        sleep=time.sleep,
        log=print,
    ):
        if cleanup not in CLEANUP:
            raise UserError(f"cleanup {cleanup!r}: choose one of {', '.join(CLEANUP)}")
        self.api, self.poll_s, self.timeout_s, self.cleanup = api, poll_s, timeout_s, cleanup
        self.sleep, self.log = sleep, log

    def run(self, job: dict) -> dict:
        from kubernetes.client.exceptions import ApiException

        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        try:
            self.api.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, job)
        except ApiException as err:
            raise TrainJobFailed(f"could not create TrainJob {ns}/{name}: {err.status} {err.reason}") from err
        self.log(f"created TrainJob {ns}/{name}")
        started, last = time.monotonic(), None
        while True:
            try:
                obj = self.api.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
            except ApiException as err:
                if err.status == 404:
                    raise TrainJobFailed(f"TrainJob {ns}/{name} was deleted before it finished") from err
                raise
            conditions = {c["type"]: c for c in obj.get("status", {}).get("conditions", [])}
            state = next(
                (
                    t
                    for t in ("Complete", "Failed", "Suspended", "Created")
                    if conditions.get(t, {}).get("status") == "True"
                ),
                "Pending",
            )
            if state != last:
                self.log(f"TrainJob {ns}/{name}: {state}")
                last = state
            if state == "Complete":
                self._cleanup(ns, name, success=True)
                return obj
            if state == "Failed":
                c = conditions["Failed"]
                self._cleanup(ns, name, success=False)
                raise TrainJobFailed(f"TrainJob {ns}/{name} failed: {c.get('reason', '')}: {c.get('message', '')}")
            if self.timeout_s is not None and time.monotonic() - started > self.timeout_s:
                self._cleanup(ns, name, success=False)
                raise TrainJobFailed(f"TrainJob {ns}/{name} did not finish within {self.timeout_s} s")
            self.sleep(self.poll_s)

    def _cleanup(self, ns: str, name: str, success: bool) -> None:
        if self.cleanup == "always" or (self.cleanup == "success" and success):
            self.api.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
            self.log(f"deleted TrainJob {ns}/{name}")
