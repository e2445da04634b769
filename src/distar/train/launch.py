"""Launching the trainer from a pipeline step: torchrun as a subprocess on the step's own machine.

On a cluster the multi-node path is a Kubeflow Trainer TrainJob whose pods run the same torchrun command.
"""

from __future__ import annotations

import os
import subprocess

from distar import storage
from distar.errors import UserError
from distar.stop import PREEMPTED, Preempted
from distar.train.command import torchrun_command
from distar.train.trainjob import REQUEST_TIMEOUT_S, TrainJobSpec


def run_local(config: str, overrides: list[str], nproc_per_node: int = 1, max_restarts: int = 0) -> dict:
    """Run torchrun and return the run's summary.json; the training log streams to this process's output."""
    import json

    from distar.train.config import load_config

    resolved = load_config(config, overrides)  # a bad key fails here, before any process starts
    cmd = torchrun_command(config, overrides, nproc_per_node, max_restarts, standalone=True)
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=os.environ.copy())
    if proc.returncode == PREEMPTED:
        raise Preempted(
            f"training was preempted (exit code {PREEMPTED}) after a complete checkpoint under {resolved.out}; "
            "rerunning this step resumes there"
        )
    if proc.returncode != 0:
        raise UserError(f"training failed (torchrun exit code {proc.returncode}); its log is above")
    fs, path = storage.filesystem(resolved.out)
    return json.loads(fs.cat_file(f"{path.rstrip('/')}/summary.json"))


def _pod_namespace() -> str:
    path = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return os.environ.get("POD_NAMESPACE", "default")


def _owner(core, namespace: str) -> list[dict]:
    """An ownerReference to the Argo Workflow that runs this step (the pipeline run), read from this pod's own
    owners: deleting the run deletes its TrainJob, while draining or evicting this small pod does not (an owner
    that is the pod would take the whole GPU job with it). None when no Workflow owns the pod."""
    pod_name = os.environ.get("HOSTNAME")
    if core is None or not pod_name:
        return []
    try:
        pod = core.read_namespaced_pod(pod_name, namespace, _request_timeout=REQUEST_TIMEOUT_S)
    except Exception as err:  # no pod of that name (not in a pod), or no RBAC to read it: the job runs unowned
        print(f"distar: the TrainJob gets no owner (pod {pod_name!r} not readable: {type(err).__name__})", flush=True)
        return []
    for ref in pod.metadata.owner_references or []:
        if ref.kind == "Workflow" and ref.api_version.startswith("argoproj.io/"):
            return [
                {
                    "apiVersion": ref.api_version,
                    "kind": "Workflow",
                    "name": ref.name,
                    "uid": ref.uid,
                    "controller": False,
                    "blockOwnerDeletion": False,
                }
            ]
    print(f"distar: the TrainJob gets no owner (pod {pod_name!r} belongs to no Argo Workflow)", flush=True)
    return []


def run_trainjob(
    config: str,
    overrides: list[str],
    *,
    spec: TrainJobSpec,
    api=None,
    core=None,
    poll_s: float = 15.0,
    suspend_timeout_s: float | None = None,
) -> dict:
    """Run the training as a TrainJob (many nodes) and return the run's summary.json. `out`, the prompts and the
    model cache must be object-storage URIs: every node reads and writes them. They are checked here, before any
    GPU pod starts. `spec` carries the pod settings; its config and overrides are set from the arguments."""
    import json

    from distar.train.config import load_config
    from distar.train.trainjob import TrainJobLauncher, check_shared_locations, manifest

    resolved = load_config(config, overrides)
    check_shared_locations(resolved)
    if api is None:
        from kubernetes import client
        from kubernetes import config as kube_config

        kube_config.load_incluster_config()
        api, core = client.CustomObjectsApi(), client.CoreV1Api()
    spec.config, spec.overrides = config, list(overrides)
    spec.namespace = spec.namespace or _pod_namespace()
    job = manifest(spec)
    if owners := _owner(core, spec.namespace):
        job["metadata"]["ownerReferences"] = owners
    TrainJobLauncher(api, core, poll_s=poll_s, suspend_timeout_s=suspend_timeout_s).run(job)
    fs, path = storage.filesystem(resolved.out)
    return json.loads(fs.cat_file(f"{path.rstrip('/')}/summary.json"))
