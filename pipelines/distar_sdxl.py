"""The DI* pipeline: curate ∥ cache → train → export → evaluate, artifacts in object storage.

Compile:  python pipelines/distar_sdxl.py            (writes pipelines/distar_sdxl.yaml: training as a TrainJob)
Run here: distar run-local --preset tiny             (the whole DAG under kfp.local, training on this machine)
Submit:   distar submit --pipeline-root gs://BUCKET/kfp --service-account pipeline-runner \\
              cache_root=gs://BUCKET/cache runs_root=gs://BUCKET/runs            (docs/CLUSTER.md)

Large data moves by reference: the model cache lives at `cache_root`, the training runs, exported pipelines and
evaluations at `runs_root` (persistent, gs:// or s3://); the artifacts between steps are their small manifests and
records, so KFP's launcher, which copies every input artifact before a step starts, copies kilobytes. The compiled
spec uses only what a KFP backend ≥ 2.5 reads (tests/unit/test_pipeline_compat.py); the secrets it names are
required and created by k8s/base. Defaults are the paper's SDXL settings; the tiny values come from
distar.local_pipeline.tiny_arguments.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: `components` is importable

from kfp import compiler, dsl, kubernetes  # noqa: E402

from components import IMAGE  # noqa: E402
from components.cache import cache  # noqa: E402
from components.curate import curate  # noqa: E402
from components.evaluate import evaluate  # noqa: E402
from components.export import export  # noqa: E402
from components.train import train_local, train_trainjob  # noqa: E402
from distar.evaluate import protocol  # noqa: E402
from distar.prompts import PARTI_URL  # noqa: E402
from distar.train.trainjob import HUB_SECRET_KEYS, STORAGE_SECRET_KEYS  # noqa: E402

LAUNCHERS = ("trainjob", "local")


def secrets(task, storage_secret, hub_secret) -> None:
    """Object-storage keys (S3/MinIO; blank on GCS with Workload Identity) and the hub token, from the two secrets
    k8s/base creates. Required, not optional: KFP backends before 2.15 ignore `optional`."""
    kubernetes.use_secret_as_env(
        task, secret_name=storage_secret, secret_key_to_env={k: k for k in STORAGE_SECRET_KEYS}
    )
    kubernetes.use_secret_as_env(task, secret_name=hub_secret, secret_key_to_env={k: k for k in HUB_SECRET_KEYS})


def place(launcher, node_selector, tolerations, storage_secret, hub_secret, gpu: dict, resources: list) -> None:
    """Where the steps run (kfp-kubernetes; kfp.local ignores it). GPUs, their node selector and tolerations only on
    GPU work: the tasks in `gpu` (task → GPU count), less the train task when it launches a TrainJob (the job's pods
    get them from it); CPU and memory requests and the secrets on every task of `resources` (task, cpu, memory)."""
    for task, count in gpu.items():
        if launcher == "trainjob" and task.component_spec.name == "train":
            continue
        task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(count)
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory")
        kubernetes.add_node_selector_json(task, node_selector)
        kubernetes.add_toleration_json(task, tolerations)
    for task, cpu, memory in resources:
        task.set_cpu_request(cpu).set_memory_request(memory)
        secrets(task, storage_secret, hub_secret)


def shared_steps(p: dict):
    """Curate and cache, the steps every pipeline starts with; `p` is the pipeline's parameters."""
    prompts = curate(sources=p["prompt_sources"], tokenizer=p["tokenizer"], eval_fraction=p["eval_fraction"])
    prompts.set_caching_options(True)  # deterministic in its inputs
    prompts.set_retry(2)
    models = cache(models=p["cache_models"], cache_root=p["cache_root"])
    models.set_caching_options(True)
    models.set_retry(3)  # idempotent: a retry skips what verifies
    return prompts, models


def in_run(runs_root) -> dict:
    """Where export and evaluate write: {runs_root}/{run id}/{task name}, the same for every retry of the task."""
    return {
        "runs_root": runs_root,
        "run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        "task_name": dsl.PIPELINE_TASK_NAME_PLACEHOLDER,
    }


def train_step(train, launcher: str, prompts, models, p: dict, variant=None):
    """The train task over `p`, the pipeline's parameters (and an ablation branch's `variant`)."""
    trained = train(
        prompts=prompts.outputs["prompts"],
        model_cache=models.outputs["model_cache"],
        runs_root=p["runs_root"],
        run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        task_name=dsl.PIPELINE_TASK_NAME_PLACEHOLDER,
        **({"variant": variant} if variant is not None else {}),
        preset=p["preset"],
        overrides=p["train_overrides"],
        launcher=launcher,
        num_nodes=p["num_nodes"],
        image=IMAGE,
        nproc_per_node=p["nproc_per_node"],
        gpus_per_node=p["gpus_per_node"],
        max_restarts=p["max_restarts"],
        storage_secret=p["storage_secret"],
        hub_secret=p["hub_secret"],
        node_selector=p["node_selector"],
        tolerations=p["tolerations"],
        service_account=p["trainer_service_account"],
        queue=p["queue"],
        keep_s=p["keep_trainjob_s"],
        suspend_timeout_s=p["suspend_timeout_s"],
        runtime=p["trainer_runtime"],
        cpu_per_node=p["trainer_cpu_per_node"],
        memory_per_node=p["trainer_memory_per_node"],
        active_deadline_s=p["trainer_deadline_s"],
    )
    trained.set_caching_options(False)
    trained.set_retry(2)  # the same run directory and TrainJob: a retry adopts the job or resumes the run
    return trained


def build(launcher: str = "trainjob"):
    """The pipeline with training as a TrainJob (the cluster's GPUs; this step follows it from a CPU pod) or on the
    train step's own machine (one node: the step gets the GPUs)."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher {launcher!r}: choose one of {', '.join(LAUNCHERS)}")
    train = train_trainjob if launcher == "trainjob" else train_local

    @dsl.pipeline(name="distar-sdxl", description="Diff-Instruct* post-training of a one-step SDXL generator")
    def distar_sdxl(
        cache_root: str,
        runs_root: str,
        prompt_sources: list = [PARTI_URL],  # noqa: B006 - kfp reads defaults from the signature
        tokenizer: str = "openai/clip-vit-large-patch14",
        eval_fraction: float = 0.02,
        cache_models: list = ["sdxl", "rewards", "eval"],  # noqa: B006
        preset: str = "sdxl",
        train_overrides: list = [],  # noqa: B006
        num_nodes: int = 1,
        nproc_per_node: int = 8,
        gpus_per_node: int = 8,
        trainer_service_account: str = "distar-trainer",
        queue: str = "",
        keep_trainjob_s: int = 86400,
        suspend_timeout_s: int = 0,
        trainer_runtime: str = "torch-distributed",
        trainer_cpu_per_node: str = "",
        trainer_memory_per_node: str = "",
        trainer_deadline_s: int = 0,
        node_selector: dict = {},  # noqa: B006
        tolerations: list = [],  # noqa: B006
        max_restarts: int = 3,
        ema: bool = True,
        export_dtype: str = "fp16",
        export_single_file: bool = False,
        eval_prompts: str = protocol.PARTI_IN_CACHE,
        eval_hps_prompts: str = protocol.HPS_IN_CACHE,
        eval_rewards: list = protocol.METRICS,
        eval_baseline: str = "",
        eval_max_prompts: int = 0,
        eval_batch_size: int = 4,
        eval_gpus: int = 1,
        storage_secret: str = "distar-storage",
        hub_secret: str = "distar-hub",
        curate_cpu: str = "4",
        curate_memory: str = "16Gi",
        cache_cpu: str = "4",
        cache_memory: str = "16Gi",
        train_cpu: str = "1",
        train_memory: str = "2Gi",
        export_cpu: str = "8",
        export_memory: str = "64Gi",
        eval_cpu: str = "8",
        eval_memory: str = "64Gi",
    ):
        params = dict(locals())  # the pipeline's parameters, for the shared step builders
        prompts, models = shared_steps(params)
        trained = train_step(train, launcher, prompts, models, params)
        exported = export(
            run=trained.outputs["run"],
            **in_run(runs_root),
            ema=ema,
            single_file=export_single_file,
            dtype=export_dtype,
        )
        exported.set_caching_options(True)
        exported.set_retry(2)  # the same place: model_index.json last, so a retry completes what was cut short
        evaluated = evaluate(
            pipeline=exported.outputs["pipeline"],
            model_cache=models.outputs["model_cache"],
            **in_run(runs_root),
            prompts=eval_prompts,
            hps_prompts=eval_hps_prompts,
            rewards=eval_rewards,
            baseline=eval_baseline,
            max_prompts=eval_max_prompts,
            batch_size=eval_batch_size,
        )
        evaluated.set_caching_options(True)
        evaluated.set_retry(2)  # resumable: the prompts of finished score shards are not generated again

        place(
            launcher,
            node_selector,
            tolerations,
            storage_secret,
            hub_secret,
            gpu={evaluated: eval_gpus, trained: gpus_per_node},
            resources=[
                (prompts, curate_cpu, curate_memory),
                (models, cache_cpu, cache_memory),
                (trained, train_cpu, train_memory),
                (exported, export_cpu, export_memory),
                (evaluated, eval_cpu, eval_memory),
            ],
        )

    return distar_sdxl


distar_sdxl = build("trainjob")


def compile_pipeline(path=None, launcher: str = "trainjob") -> Path:
    path = path or Path(__file__).with_suffix(".yaml")
    compiler.Compiler().compile(build(launcher), str(path))
    return Path(path)


if __name__ == "__main__":
    print(compile_pipeline())
