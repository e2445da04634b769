from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Metrics, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def baseline(
    model_cache: Input[Artifact],
    model: str,
    runs_root: str,
    metrics: Output[Metrics],
    report: Output[HTML],
    evaluation: Output[Artifact],
    label: str = "",
    reference: str = "stabilityai/stable-diffusion-xl-base-1.0",
    prompts: str = "prompts/parti/PartiPrompts.tsv",
    hps_prompts: str = "prompts/hpsv2",
    rewards: list = ["imagereward", "aesthetic", "pickscore", "clip", "hpsv2.1"],  # noqa: B006 - read, not mutated
    max_prompts: int = 0,
    batch_size: int = 4,
):
    """A baseline (`unet:SOURCE`: the initial generator; `reference:N`: the reference sampled with N steps and CFG)
    under the paper's protocol, evaluated once per (model, protocol) under {runs_root}/baselines and reused after
    (distar.evaluate.evaluate_baseline)."""
    import json

    from distar.evaluate import EvaluateConfig, evaluate_baseline
    from distar.sources import in_cache

    with open(model_cache.path) as fh:
        cache_root = json.load(fh)["root"].rstrip("/")

    config = EvaluateConfig(
        model=model,
        out="",
        reference=reference,
        prompts=in_cache(cache_root, prompts),
        hps_prompts=in_cache(cache_root, hps_prompts) or None,
        rewards=list(rewards),
        cache_dir=cache_root,
        max_prompts=max_prompts,
        batch_size=batch_size,
        label=label,
    )
    out = evaluate_baseline(config, f"{runs_root.rstrip('/')}/baselines")
    for name, value in out["results"]["model"].items():
        if isinstance(value, (int, float)):
            metrics.log_metric(name.replace("/", "_"), float(value))
    from distar import storage

    fs, path = storage.filesystem(out["out"])
    with open(report.path, "w") as fh:
        fh.write(fs.cat_file(f"{path.rstrip('/')}/report.html").decode())
    with open(evaluation.path, "w") as fh:
        json.dump(out, fh, indent=1)
    evaluation.metadata.update(
        {
            "label": label,
            "protocol": out["protocol_digest"],
            "results": out["out"],
            "reused": out["reused"],
            "generated": out["generated"],
            "baseline_key": out["baseline_key"],
        }
    )
