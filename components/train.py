from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(
    prompts: Input[Dataset],
    model_cache: Input[Model],
    checkpoints: Output[Model],
    preset: str = "sdxl",
    overrides: list = [],  # noqa: B006 - kfp reads defaults from the signature; the list is never mutated
    launcher: str = "trainjob",
    num_nodes: int = 1,
    nproc_per_node: int = 8,
    gpus_per_node: int = 8,
    max_restarts: int = 3,
    image: str = "",
    secret_env: dict = {},  # noqa: B006
    node_selector: dict = {},  # noqa: B006
    tolerations: list = [],  # noqa: B006
) -> str:
    """DI* training on the curated prompts, models read from the cache; returns the final checkpoint's URI.
    launcher "trainjob": a Kubeflow Trainer TrainJob of num_nodes × nproc_per_node processes writing to the
    artifact's object-storage URI; "local": torchrun on this step's own machine."""
    import json
    import os

    import distar
    from distar.train.launch import run_local, run_trainjob

    remote = launcher == "trainjob"
    where = {a: (a.uri if remote else a.path) for a in (prompts, model_cache, checkpoints)}
    args = [
        f"out={where[checkpoints]}",
        f"data.prompts={where[prompts]}",
        f"model.cache_dir={where[model_cache]}",
        "model.offline=true",
        *overrides,
    ]
    if remote:
        if not image:
            raise ValueError("train_launcher=trainjob needs the image the TrainJob runs (the pipeline passes it)")
        name = "distar-" + os.environ.get("HOSTNAME", "train")[-40:].lower().strip("-")
        summary = run_trainjob(
            preset,
            args,
            name=name,
            image=image,
            num_nodes=num_nodes,
            nproc_per_node=nproc_per_node,
            gpus_per_node=gpus_per_node,
            secret_env=secret_env,
            node_selector=node_selector,
            tolerations=tolerations,
        )
        os.makedirs(checkpoints.path, exist_ok=True)
        with open(os.path.join(checkpoints.path, "trainjob-summary.json"), "w") as fh:
            json.dump(summary, fh)
    else:
        summary = run_local(preset, args, nproc_per_node=nproc_per_node, max_restarts=max_restarts)
    checkpoints.metadata.update(
        {
            "step": summary["step"],
            "config_digest": summary["config_digest"],
            "preset": preset,
            "overrides": list(overrides),
            "launcher": launcher,
            "distar_version": distar.__version__,
            **{k: v for k, v in summary.items() if k.startswith("eval/")},
        }
    )
    return summary["checkpoint"]
