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
    nproc_per_node: int = 1,
    max_restarts: int = 3,
) -> str:
    """DI* training (torchrun on this step's machine) on the curated prompts, reading models from the cache;
    returns the final checkpoint's URI."""
    import distar
    from distar.train.launch import run_local

    args = [f"out={checkpoints.path}", f"data.prompts={prompts.path}", f"model.cache_dir={model_cache.path}",
            "model.offline=true", *overrides]  # fmt: skip
    summary = run_local(preset, args, nproc_per_node=nproc_per_node, max_restarts=max_restarts)
    checkpoints.metadata.update({
        "step": summary["step"], "config_digest": summary["config_digest"], "preset": preset,
        "overrides": list(overrides), "distar_version": distar.__version__,
        **{k: v for k, v in summary.items() if k.startswith("eval/")},
    })  # fmt: skip
    return summary["checkpoint"]
