"""The DI* pipeline: curate ∥ cache → train → export → evaluate, artifacts in object storage.

Compile:  python pipelines/distar_sdxl.py            (writes pipelines/distar_sdxl.yaml)
Run here: distar run-local --preset tiny             (the whole DAG under kfp.local, on 2 CPU cores)
Submit:   kfp --endpoint $KFP_HOST run submit -e distar -f pipelines/distar_sdxl.yaml key=value ...
Defaults are the paper's SDXL settings; the tiny values come from distar.local_pipeline.tiny_arguments.
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
from components.train import train  # noqa: E402
from distar.prompt_sets import PARTI_URL  # noqa: E402


@dsl.pipeline(name="distar-sdxl", description="Diff-Instruct* post-training of a one-step SDXL generator")
def distar_sdxl(
    prompt_sources: list = [PARTI_URL],  # noqa: B006 - kfp reads defaults from the signature
    tokenizer: str = "openai/clip-vit-large-patch14",
    eval_fraction: float = 0.02,
    cache_models: list = ["sdxl", "rewards", "eval"],  # noqa: B006
    preset: str = "sdxl",
    train_overrides: list = [],  # noqa: B006
    train_launcher: str = "trainjob",
    num_nodes: int = 1,
    nproc_per_node: int = 8,
    gpus_per_node: int = 8,
    secret_env: dict = {},  # noqa: B006
    node_selector: dict = {},  # noqa: B006
    tolerations: list = [],  # noqa: B006
    max_restarts: int = 3,
    ema: bool = False,
    eval_prompts: str = "prompts/parti/PartiPrompts.tsv",
    eval_hps_prompts: str = "prompts/hpsv2",
    eval_rewards: list = ["imagereward", "aesthetic", "pickscore", "clip", "hpsv2.1"],  # noqa: B006
    eval_baseline: str = "",
    eval_max_prompts: int = 0,
    eval_batch_size: int = 4,
    eval_gpus: int = 1,
    storage_secret: str = "distar-storage",
    hub_secret: str = "distar-hub",
):
    prompts = curate(sources=prompt_sources, tokenizer=tokenizer, eval_fraction=eval_fraction)
    prompts.set_caching_options(True)  # deterministic in its inputs
    prompts.set_retry(2)
    models = cache(models=cache_models)
    models.set_caching_options(True)
    models.set_retry(3)  # idempotent: a retry skips what verifies
    trained = train(
        prompts=prompts.outputs["prompts"],
        model_cache=models.outputs["model_cache"],
        preset=preset,
        overrides=train_overrides,
        launcher=train_launcher,
        num_nodes=num_nodes,
        image=IMAGE,
        nproc_per_node=nproc_per_node,
        gpus_per_node=gpus_per_node,
        max_restarts=max_restarts,
        secret_env=secret_env,
        node_selector=node_selector,
        tolerations=tolerations,
    )
    trained.set_caching_options(False)
    trained.set_retry(2)  # resumes from the newest complete checkpoint
    exported = export(checkpoints=trained.outputs["checkpoints"], ema=ema)
    exported.set_caching_options(True)
    evaluated = evaluate(
        pipeline=exported.outputs["pipeline"],
        model_cache=models.outputs["model_cache"],
        prompts=eval_prompts,
        hps_prompts=eval_hps_prompts,
        rewards=eval_rewards,
        baseline=eval_baseline,
        max_prompts=eval_max_prompts,
        batch_size=eval_batch_size,
    )
    evaluated.set_caching_options(True)
    evaluated.set_retry(2)  # resumable: finished prompts are not generated again

    # Where the steps run: GPU, /dev/shm, scheduling and credentials (kfp-kubernetes; kfp.local ignores them).
    evaluated.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(eval_gpus)
    for task in (prompts, models, trained, exported, evaluated):
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory")
        kubernetes.add_node_selector_json(task, node_selector)
        kubernetes.add_toleration_json(task, tolerations)
        # object storage keys (S3/MinIO; GCS uses Workload Identity) and the hub token, when the secrets exist
        kubernetes.use_secret_as_env(
            task,
            secret_name=storage_secret,
            optional=True,
            secret_key_to_env={
                "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
                "AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL",
            },
        )
        kubernetes.use_secret_as_env(
            task, secret_name=hub_secret, optional=True, secret_key_to_env={"HF_TOKEN": "HF_TOKEN"}
        )


def compile_pipeline(path=None) -> Path:
    path = path or Path(__file__).with_suffix(".yaml")
    compiler.Compiler().compile(distar_sdxl, str(path))
    return Path(path)


if __name__ == "__main__":
    print(compile_pipeline())
