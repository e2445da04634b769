from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    pipeline: Input[Model],
    model_cache: Input[Artifact],
    metrics: Output[Metrics],
    report: Output[HTML],
    evaluation: Output[Artifact],
    runs_root: str,
    run_id: str,
    task_name: str,
    prompts: str = "prompts/parti/PartiPrompts.tsv",
    hps_prompts: str = "prompts/hpsv2",
    rewards: list = ["imagereward", "aesthetic", "pickscore", "clip", "hpsv2.1"],  # noqa: B006 - read, not mutated
    reward_sources: dict = {},  # noqa: B006
    reward_heads: dict = {},  # noqa: B006
    baseline: str = "",
    reference: str = "stabilityai/stable-diffusion-xl-base-1.0",
    max_prompts: int = 0,
    batch_size: int = 4,
    variant: dict = {},  # noqa: B006 - an ablation branch: its name labels the results
    run: str = "",
):
    """The paper's protocol on the exported pipeline (distar evaluate). The inputs are records: the export's (the
    pipeline is read by its URI) and the model cache's manifest (reward models and prompt sets are read from its
    root; prompt paths are relative to it). Images, score shards, metrics.json and report.html are written at
    {runs_root}/{run_id}/{task_name}[-{variant name}], one shard per finished batch, so a retry of the step
    generates only what the killed attempt had not finished. `evaluation` is the small record later steps read
    (metrics.json and where the images are), `run` the training run's URI."""
    import json

    from distar import storage
    from distar.evaluate import EvaluateConfig, evaluate
    from distar.sources import in_cache

    with open(model_cache.path) as fh:
        cache_root = json.load(fh)["root"].rstrip("/")
    with open(pipeline.path) as fh:
        model = json.load(fh)["pipeline"]
    local_ok = not storage.is_uri(evaluation.uri)  # everything on this machine (kfp.local)
    for what, uri in (("cache_root", cache_root), ("runs_root", runs_root)):
        storage.check_shared(what, uri, local_ok=local_ok)
    name = variant.get("name", "")
    results = storage.task_uri(runs_root, run_id, task_name, name)

    out = evaluate(
        EvaluateConfig(
            model=model,
            out=results,
            baseline=baseline or None,
            reference=reference,
            prompts=in_cache(cache_root, prompts),
            hps_prompts=in_cache(cache_root, hps_prompts) or None,
            rewards=list(rewards),
            sources=dict(reward_sources),
            heads=dict(reward_heads),
            cache_dir=cache_root,
            max_prompts=max_prompts,
            batch_size=batch_size,
            label=name,
            run=run or None,
        )
    )

    # the model's metrics, and its EMA's and the baseline's beside them (prefixed) where there are, in the UI and log
    def numbers(role: str) -> dict:
        values = out["results"].get(role, {}).items()
        return {k: float(v) for k, v in values if isinstance(v, (int, float)) and not isinstance(v, bool)}

    model = numbers("model")
    others = {role: values for role in ("ema", "baseline") if (values := numbers(role))}
    for prefix, values in (("", model), *((f"{role}_", v) for role, v in others.items())):
        for name, value in values.items():
            metrics.log_metric(prefix + name.replace("/", "_"), value)
    print(f"{'metric':<24}{'model':>12}" + "".join(f"{role:>12}" for role in others))
    for name, value in model.items():
        print(f"{name:<24}{value:>12.4f}" + "".join(f"{v.get(name, float('nan')):>12.4f}" for v in others.values()))
    fs, path = storage.filesystem(results)
    with open(report.path, "wb") as fh:
        fh.write(fs.cat_file(f"{path.rstrip('/')}/report.html"))
    with open(evaluation.path, "w") as fh:
        json.dump({**out, "out": results}, fh, indent=1)
    evaluation.metadata.update(
        {
            "label": out["label"],
            "protocol": out["protocol_digest"],
            "results": results,
            "baseline": baseline,
            "prompts": out["prompts"],
            "generated": out["runs"]["model"]["generated"],
            "resumed_from": out["runs"]["model"]["skipped"],
        }
    )
