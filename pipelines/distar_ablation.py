"""The paper's ablation in one run: shared curate and cache, the two baselines (evaluated once per protocol and
reused), one train → export → evaluate branch per variant (dsl.ParallelFor), and a comparison of them all.

Compile:  python pipelines/distar_ablation.py [--parallelism N]   (writes pipelines/distar_ablation.yaml)
Run here: distar run-local --pipeline ablation                     (two variants of the tiny preset)
Submit:   distar submit --pipeline ablation --pipeline-root gs://BUCKET/kfp \\
              cache_root=gs://BUCKET/model-cache runs_root=gs://BUCKET/runs   (the grid of distar.compare.TABLE3)

`variants` is a list of {"name", "overrides", "paper"}; the default is Table 3's grid. How many branches train at
once is set when compiling (KFP reads a ParallelFor's parallelism from the compiled spec only).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: `components` is importable

from kfp import compiler, dsl  # noqa: E402

from components.baseline import baseline  # noqa: E402
from components.compare import compare  # noqa: E402
from components.evaluate import evaluate  # noqa: E402
from components.export import export  # noqa: E402
from components.train import train_local, train_trainjob  # noqa: E402
from distar.compare import TABLE3  # noqa: E402
from distar.evaluate import protocol  # noqa: E402
from distar.prompts import PARTI_URL  # noqa: E402
from pipelines.distar_sdxl import LAUNCHERS, in_run, place, shared_steps, train_step  # noqa: E402

PARALLELISM = 3
# CPU and memory requests of a branch's steps (compile-time: see the loop); the baselines and the shared steps take
# the same parameters as pipelines/distar_sdxl.py.
BRANCH_RESOURCES = {"train": ("1", "2Gi"), "export": ("8", "64Gi"), "evaluate": ("8", "64Gi")}
BRANCH_GPUS = {"evaluate": 1, "train": 8}  # train: only when it trains on its own machine (launcher "local")
VARIANTS = [{"name": v["name"], "overrides": v["overrides"], "paper": v["paper"]} for v in TABLE3]
DMD2 = "unet:tianweiy/DMD2:dmd2_sdxl_1step_unet_fp16.bin"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"


def build(launcher: str = "trainjob", parallelism: int = PARALLELISM):
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher {launcher!r}: choose one of {', '.join(LAUNCHERS)}")
    train = train_trainjob if launcher == "trainjob" else train_local

    @dsl.pipeline(name="distar-ablation", description="Diff-Instruct*: the paper's ablation under one protocol")
    def distar_ablation(
        cache_root: str,
        runs_root: str,
        variants: list = VARIANTS,  # noqa: B006 - kfp reads defaults from the signature
        prompt_sources: list = [PARTI_URL],  # noqa: B006
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
        initial: str = DMD2,
        reference: str = SDXL,
        reference_steps: str = "reference:50",
        eval_prompts: str = protocol.PARTI_IN_CACHE,
        eval_hps_prompts: str = protocol.HPS_IN_CACHE,
        eval_rewards: list = protocol.METRICS,
        eval_max_prompts: int = 0,
        eval_batch_size: int = 4,
        eval_gpus: int = 1,
        compare_images: int = 4,
        storage_secret: str = "distar-storage",
        hub_secret: str = "distar-hub",
        curate_cpu: str = "4",
        curate_memory: str = "16Gi",
        cache_cpu: str = "4",
        cache_memory: str = "16Gi",
        eval_cpu: str = "8",
        eval_memory: str = "64Gi",
    ):
        params = dict(locals())  # the pipeline's parameters, for the shared step builders
        prompts, models = shared_steps(params)
        protocol = dict(
            model_cache=models.outputs["model_cache"],
            reference=reference,
            prompts=eval_prompts,
            hps_prompts=eval_hps_prompts,
            rewards=eval_rewards,
            max_prompts=eval_max_prompts,
            batch_size=eval_batch_size,
        )
        start = baseline(model=initial, label="initial", runs_root=runs_root, **protocol)
        ref = baseline(model=reference_steps, label="reference", runs_root=runs_root, **protocol)
        placed = [(models, cache_cpu, cache_memory), (prompts, curate_cpu, curate_memory)]
        gpu = {start: eval_gpus, ref: eval_gpus}
        for task in (start, ref):
            task.set_caching_options(True)  # and the baseline store: a second sweep generates nothing
            task.set_retry(2)
            placed.append((task, eval_cpu, eval_memory))
        with dsl.ParallelFor(variants, parallelism=parallelism) as variant:
            trained = train_step(train, launcher, prompts, models, params, variant=variant)
            exported = export(run=trained.outputs["run"], **in_run(runs_root))
            exported.set_caching_options(True)
            exported.set_retry(2)
            evaluated = evaluate(
                pipeline=exported.outputs["pipeline"],
                **in_run(runs_root),
                variant=variant,
                run=trained.outputs["Output"],
                **protocol,
            )
            evaluated.set_caching_options(True)
            evaluated.set_retry(2)
            # Inside the loop, and constants: kfp's compiler does not pass resource parameters into a ParallelFor's
            # inputs (the branch would fail resolving them), and a setting made outside the loop never reaches it.
            place(
                launcher,
                node_selector,
                tolerations,
                storage_secret,
                hub_secret,
                gpu={evaluated: BRANCH_GPUS["evaluate"], trained: BRANCH_GPUS["train"]},
                resources=[
                    (task, *BRANCH_RESOURCES[task.component_spec.name]) for task in (trained, exported, evaluated)
                ],
            )
        compared = compare(
            evaluations=dsl.Collected(evaluated.outputs["evaluation"]),
            initial=start.outputs["evaluation"],
            reference=ref.outputs["evaluation"],
            images=compare_images,
        )
        placed.append((compared, *BRANCH_RESOURCES["export"]))
        place(launcher, node_selector, tolerations, storage_secret, hub_secret, gpu=gpu, resources=placed)

    return distar_ablation


distar_ablation = build("trainjob")


def compile_pipeline(path=None, launcher: str = "trainjob", parallelism: int = PARALLELISM) -> Path:
    path = Path(path or Path(__file__).with_suffix(".yaml"))
    compiler.Compiler().compile(build(launcher, parallelism), str(path))
    # kfp's header comment prints the variants' keys in protobuf map order, which changes from process to process;
    # the spec itself does not. One order, so that a fresh compile is byte-for-byte the committed one.
    prefix = "#    variants: list [Default: "
    ordered = [{k: v[k] for k in sorted(v)} for v in VARIANTS]
    lines = [prefix + f"{ordered}]" if line.startswith(prefix) else line for line in path.read_text().splitlines()]
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parallelism", type=int, default=PARALLELISM, help="branches that train at once")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    print(compile_pipeline(args.out, parallelism=args.parallelism))
