"""Launching the trainer from a pipeline step: torchrun as a subprocess on the step's own machine.

On a cluster the multi-node path is a Kubeflow Trainer TrainJob whose pods run the same torchrun command.
"""

from __future__ import annotations

import os
import subprocess
import sys

from distar.errors import UserError
from distar.train import PREEMPTED, Preempted


def torchrun_command(
    config: str, overrides: list[str], nproc_per_node: int = 1, max_restarts: int = 0, standalone: bool = True
) -> list[str]:
    from distar.train.trainjob import SHUTDOWN_TIMEOUT_S

    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *(["--standalone"] if standalone else []),
        "--shutdown-timeout",
        str(SHUTDOWN_TIMEOUT_S),
        "--nproc_per_node",
        str(nproc_per_node),
        "--max-restarts",
        str(max_restarts),
        "-m",
        "distar.train",
        "--config",
        config,
        *overrides,
    ]


def run_local(config: str, overrides: list[str], nproc_per_node: int = 1, max_restarts: int = 0) -> dict:
    """Run torchrun and return the run's summary.json; the training log streams to this process's output."""
    import json

    from distar import storage
    from distar.train.config import load_config

    resolved = load_config(config, overrides)  # a bad key fails here, before any process starts
    cmd = torchrun_command(config, overrides, nproc_per_node, max_restarts)
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


def run_trainjob(
    config: str,
    overrides: list[str],
    *,
    name: str,
    image: str,
    num_nodes: int,
    nproc_per_node: int,
    gpus_per_node: int,
    namespace: str | None = None,
    secret_env: dict | None = None,
    node_selector: dict | None = None,
    tolerations: list | None = None,
    cleanup: str = "success",
    api=None,
) -> dict:
    """Run the training as a TrainJob (many nodes) and return the run's summary.json. `out` and the data and
    cache URIs in `overrides` must be object-storage URIs: every node reads and writes them."""
    import json

    from distar import storage
    from distar.train.config import load_config
    from distar.train.trainjob import TrainJobLauncher, TrainJobSpec, manifest

    resolved = load_config(config, overrides)
    if not storage.is_uri(resolved.out) or resolved.out.startswith("file://"):
        raise UserError(f"out={resolved.out!r}: a multi-node TrainJob writes to object storage (gs://, s3://)")
    if api is None:
        from kubernetes import client
        from kubernetes import config as kube_config

        kube_config.load_incluster_config()
        api = client.CustomObjectsApi()
    spec = TrainJobSpec(
        name=name,
        namespace=namespace or _pod_namespace(),
        image=image,
        config=config,
        overrides=list(overrides),
        num_nodes=num_nodes,
        nproc_per_node=nproc_per_node,
        gpus_per_node=gpus_per_node,
        secret_env=dict(secret_env or {}),
        node_selector=dict(node_selector or {}),
        tolerations=list(tolerations or []),
    )
    TrainJobLauncher(api, cleanup=cleanup).run(manifest(spec))
    fs, path = storage.filesystem(resolved.out)
    return json.loads(fs.cat_file(f"{path.rstrip('/')}/summary.json"))
