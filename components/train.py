from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Output

from components import CPU_IMAGE, IMAGE


def train(
    prompts: Input[Dataset],
    model_cache: Input[Artifact],
    run: Output[Artifact],
    metrics: Output[Metrics],
    report: Output[HTML],
    runs_root: str,
    run_id: str,
    task_name: str,
    variant: dict = {},  # noqa: B006 - {"name": …, "overrides": [...]}: one branch of an ablation sweep
    preset: str = "sdxl",
    overrides: list = [],  # noqa: B006 - kfp reads defaults from the signature; the list is never mutated
    launcher: str = "trainjob",
    num_nodes: int = 1,
    nproc_per_node: int = 8,
    gpus_per_node: int = 8,
    max_restarts: int = 3,
    image: str = "",
    storage_secret: str = "distar-storage",
    hub_secret: str = "distar-hub",
    node_selector: dict = {},  # noqa: B006
    tolerations: list = [],  # noqa: B006
    service_account: str = "",
    queue: str = "",
    keep_s: int = 86400,
    suspend_timeout_s: int = 0,
    runtime: str = "torch-distributed",
    cpu_per_node: str = "",
    memory_per_node: str = "",
    active_deadline_s: int = 0,
) -> str:
    """DI* training on the curated prompts, models read from the cache's root. The run lives at
    {runs_root}/{run_id}/{task_name}[-{variant name}], the same for every retry (which resumes there); a variant's
    overrides come after `overrides`. Outputs: a small record of the run (URIs, config digest, summary), the final
    metrics, the training report; returns the run's URI.
    launcher "trainjob": a Kubeflow Trainer TrainJob of num_nodes × nproc_per_node processes on the
    ClusterTrainingRuntime `runtime`; "local": torchrun on this step's own machine. 0 and "" leave a setting off
    (suspend_timeout_s: how long the job may wait for its queue's first admission; active_deadline_s: Trainer fails
    a job running longer)."""
    import json

    import distar
    from distar import storage
    from distar.train.launch import run_local, run_trainjob
    from distar.train.trainjob import TrainJobSpec, job_name, secret_env

    with open(model_cache.path) as fh:
        cache_root = json.load(fh)["root"]
    name = variant.get("name", "")
    overrides = [*overrides, *variant.get("overrides", [])]
    out = storage.task_uri(runs_root, run_id, task_name, name)
    remote = launcher == "trainjob"
    # what the training processes and later steps read, checked before a TrainJob (or torchrun) starts
    for what, uri in (("runs_root", runs_root), ("cache_root", cache_root), ("the pipeline root", prompts.uri)):
        storage.check_shared(what, uri, local_ok=not remote)
    args = [
        f"out={out}",
        f"data.prompts={prompts.uri if remote else prompts.path}",
        f"model.cache_dir={cache_root}",
        "model.offline=true",
        *overrides,
    ]
    if remote:
        spec = TrainJobSpec(
            name=job_name(run_id, task_name, name),
            namespace="",
            image=image,
            num_nodes=num_nodes,
            nproc_per_node=nproc_per_node,
            gpus_per_node=gpus_per_node,
            secret_env=secret_env(storage_secret, hub_secret),
            node_selector=dict(node_selector),
            tolerations=list(tolerations),
            service_account=service_account or None,
            queue=queue or None,
            keep_s=keep_s,
            max_restarts=max_restarts,
            runtime=runtime,
            cpu_per_node=cpu_per_node or None,
            memory_per_node=memory_per_node or None,
            active_deadline_s=active_deadline_s or None,
        )
        summary = run_trainjob(preset, args, spec=spec, suspend_timeout_s=suspend_timeout_s or None)
    else:
        summary = run_local(preset, args, nproc_per_node=nproc_per_node, max_restarts=max_restarts)
    record = {
        "run": out,
        "checkpoint": summary["checkpoint"],
        "step": summary["step"],
        "config_digest": summary["config_digest"],
        "preset": preset,
        "overrides": list(overrides),
        "variant": name,
        "launcher": launcher,
        "trainjob": f"{spec.namespace}/{spec.name}" if remote else "",
        "distar_version": distar.__version__,
        "summary": summary,
    }
    with open(run.path, "w") as fh:
        json.dump(record, fh, indent=1)
    run.metadata.update({k: v for k, v in record.items() if k != "summary"})
    for name, value in {**summary.get("final", {}), **summary}.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "samples_seen":
            metrics.log_metric(name.replace("/", "_"), float(value))
    fs, path = storage.filesystem(out)
    page = f"{path.rstrip('/')}/report.html"
    html = fs.cat_file(page).decode() if fs.exists(page) else f"<p>no training report under {out}</p>"
    with open(report.path, "w") as fh:
        fh.write(html)
    return out


# The same step in two images: following a TrainJob needs no GPU (the slim CPU image); training on the step's own
# machine does.
train_trainjob = dsl.component(train, base_image=CPU_IMAGE, install_kfp_package=False)
train_local = dsl.component(train, base_image=IMAGE, install_kfp_package=False)
