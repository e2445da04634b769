"""The `distar` command line: one sub-command per step. No logic lives here, only argument plumbing."""

from __future__ import annotations

import argparse
import json
import sys

from distar.config import add_config_arguments, config_from_args
from distar.errors import UserError


def _toy(args: argparse.Namespace) -> None:
    from distar.config import apply_overrides
    from distar.toy import ToyConfig, run

    config = apply_overrides(ToyConfig(), args.overrides)
    metrics = run(config, out_dir=args.out, progress=not args.quiet)
    summary = {k: v for k, v in metrics.items() if k not in ("config", "history")}
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}/metrics.json and {args.out}/toy.png")


def _train(args: argparse.Namespace) -> None:
    from distar.train import exec_torchrun, run

    if args.nproc_per_node is not None:
        exec_torchrun(args.config, args.overrides, args.nproc_per_node, args.allow_config_change)

    summary = run(args.config, args.overrides, allow_config_change=args.allow_config_change)
    if summary.get("rank", 0) == 0:
        print(json.dumps(summary))


def _curate(args: argparse.Namespace) -> None:
    from distar.curate import CurateConfig, curate

    config = config_from_args(CurateConfig, args)
    stats = curate(config)
    print(json.dumps({k: stats[k] for k in ("rows_in", "rows_out", "dropped", "truncated", "splits", "seconds")}))
    print(f"wrote {args.out}/manifest.json, stats.json, summary.md")


def _export(args: argparse.Namespace) -> None:
    from distar.export import ExportConfig, export

    result = export(
        ExportConfig(
            args.checkpoint,
            args.out,
            ema=args.ema,
            single_file=args.single_file,
            dtype=args.dtype,
            metrics=args.metrics,
            force=args.force,
        )
    )
    print(json.dumps({k: result[k] for k in ("out", "checkpoint", "step", "t_star")}))


def _evaluate(args: argparse.Namespace) -> None:
    from distar.evaluate import EvaluateConfig, evaluate

    config = config_from_args(EvaluateConfig, args)
    report = evaluate(config)
    print(json.dumps(report["results"], indent=2))
    print(f"report: {args.out}/report.html")


def _cache(args: argparse.Namespace) -> None:
    from distar.cache import cache_models, parse_models, verify_cache

    if args.verify:
        problems = {k: v for k, v in verify_cache(args.out).items() if v}
        if problems:
            lines = [f"{k}: {p}" for k, v in problems.items() for p in v]
            raise UserError(f"the cache {args.out!r} does not verify:\n  - " + "\n  - ".join(lines))
        print(f"{args.out}: every file verifies")
        return
    hub = {"offline": True if args.offline else None}
    status = cache_models(args.out, parse_models(args.models), hub)
    print(json.dumps(status, indent=2))


def _run_local(args: argparse.Namespace) -> None:
    from distar.local_pipeline import describe, run_local

    run = run_local(args.preset, args.root, pipeline=args.pipeline)
    for report in sorted(run.glob("evaluate/report*")):
        print(f"report: {report}")
    print("\n".join(describe(run, args.preset)))


def _calibrate(args: argparse.Namespace) -> None:
    from distar import tiny_preset
    from distar.calibrate import calibrate, format_table
    from distar.train import distributed
    from distar.train.config import load_config

    alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
    config = load_config(args.config, args.overrides)
    tiny_preset.prepare(config.to_dict())
    world = distributed.init(config.parallel.device, config.parallel.backend)
    try:
        rows = calibrate(config, world, alphas, args.steps)
    finally:
        distributed.shutdown()
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))


def _trainjob_render(args: argparse.Namespace) -> None:
    import yaml

    from distar.train.config import load_config
    from distar.train.trainjob import TrainJobSpec, check_shared_locations, manifest, parse_toleration

    check_shared_locations(load_config(args.config, args.overrides))  # the launcher's checks, before any job

    def pairs(items, flag, sep):
        out = {}
        for item in items:
            key, ok, value = item.partition(sep)
            if not ok or not key or not value:
                raise UserError(f"{flag} {item!r}: write KEY{sep}VALUE")
            out[key] = value
        return out

    spec = TrainJobSpec(
        name=args.name, namespace=args.namespace, image=args.image, config=args.config, overrides=list(args.overrides),
        num_nodes=args.num_nodes, nproc_per_node=args.nproc_per_node, gpus_per_node=args.gpus_per_node,
        secret_env=pairs(args.secret_env, "--secret-env", "="), node_selector=pairs(args.node_selector,
        "--node-selector", "="), tolerations=[parse_toleration(t) for t in args.toleration],
        service_account=args.service_account, queue=args.queue,
    )  # fmt: skip
    print(yaml.safe_dump(manifest(spec), sort_keys=False), end="")


def _plan(args: argparse.Namespace) -> None:
    import diffusers

    from distar.plan import format_plan, plan
    from distar.train.config import load_config

    diffusers.utils.logging.set_verbosity_error()  # dtype casts of random meta networks: nothing to warn about

    # The plan reads shapes, not data: a placeholder satisfies the preset's required prompt set.
    config = load_config(args.config, ["data.prompts=unused-by-plan", *args.overrides])
    arch = args.arch
    if arch == "auto":
        arch = "tiny" if config.model.reference.startswith("tiny:") else "sdxl"
    result = plan(config, args.gpus, arch, text_encoders=args.text_encoders)
    from distar.models.architectures import ARCHITECTURES
    from distar.plan import estimate_time, format_time, forward_flops, iteration_flops, largest_batch, read_benchmark

    measured, rate = None, args.flops_per_gpu and args.flops_per_gpu * 1e12
    if args.benchmark:
        measured, matmul_rate = read_benchmark(args.benchmark, config)
        rate = rate or matmul_rate
    flops = iteration_flops(config, *forward_flops(config, ARCHITECTURES[arch]()))
    timing = estimate_time(
        config,
        result,
        flops,
        args.gpu_type,
        achievable_flops=rate,
        nodes=args.nodes,
        nvlink_bytes_s=args.nvlink and args.nvlink * 1e9,
        infiniband_bytes_s=args.infiniband * 1e9,
        measured_iteration_s=measured,
    )
    result["time"] = timing
    if args.gpu_memory:
        batch, _ = largest_batch(config, args.gpus, arch, args.gpu_memory)
        result["largest_batch_per_gpu"] = batch
    if args.json:
        print(json.dumps(result, indent=2, default=float))
    else:
        print(format_plan(result, args.gpu_memory))
        if "largest_batch_per_gpu" in result:
            print(f"  largest batch per GPU that fits: {result['largest_batch_per_gpu']}")
        print(format_time(timing))
    if args.gpu_memory and result["peak_bytes"] / 2**30 > args.gpu_memory:
        raise UserError(
            f"the plan needs {result['peak_bytes'] / 2**30:.1f} GiB per GPU, over --gpu-memory "
            f"{args.gpu_memory:g}; turn on checkpointing, shard over more GPUs or lower data.batch_size"
        )


def _compare(args: argparse.Namespace) -> None:
    from distar.compare import compare, markdown_table

    result = compare(
        args.evaluations,
        args.out,
        initial=args.initial,
        reference=args.reference,
        allow_protocol_mismatch=args.allow_protocol_mismatch,
        images=args.images,
    )
    print(markdown_table(result), end="")
    print(f"report: {args.out.rstrip('/')}/report.html")


def _submit(args: argparse.Namespace) -> None:
    from distar.submit import parse_arguments, submit

    if args.pipeline and args.package:
        raise UserError("pass --pipeline or --package, not both")
    if args.pipeline and args.pipeline not in ("sdxl", "ablation"):
        raise UserError(f"--pipeline {args.pipeline!r}: choose sdxl or ablation")
    package = args.package or f"pipelines/distar_{args.pipeline or 'sdxl'}.yaml"
    result = submit(
        args.host,
        package,
        parse_arguments(args.arguments),
        experiment=args.experiment,
        run_name=args.run_name,
        pipeline_root=args.pipeline_root,
        enable_caching=False if args.no_cache else None,
        namespace=args.namespace,
        service_account=args.service_account,
        token=args.token,
        cookies=args.cookies,
    )
    print(json.dumps(result))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distar", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    toy = sub.add_parser(
        "toy",
        help="the 2-D lab: a complete DI* run on a Gaussian mixture",
        description="Train a one-step generator on a 2-D Gaussian mixture with DI*. Overrides are key=value "
        "pairs of distar.toy.ToyConfig, e.g. alpha_rew=0 divergence=kl distance=l2 steps=3000.",
    )
    toy.add_argument("--out", default="runs/toy", help="output directory (metrics.json, toy.png)")
    toy.add_argument("--quiet", action="store_true", help="no progress lines")
    toy.add_argument("overrides", nargs="*", metavar="key=value")
    toy.set_defaults(func=_toy)

    from distar.curate import CurateConfig
    from distar.curate import __doc__ as curate_doc

    curate = sub.add_parser(
        "curate", help="prompt sources → normalised, filtered, deduplicated Parquet shards", description=curate_doc
    )
    add_config_arguments(curate, CurateConfig, flags={"sources": "source"})
    curate.set_defaults(func=_curate)

    from distar.cache import PRESETS
    from distar.cache import __doc__ as cache_doc

    cache = sub.add_parser(
        "cache",
        help="fetch, convert and checksum every model a run needs into a cache URI",
        description=cache_doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    models_help = f"presets ({', '.join(PRESETS)}) or KEY[=SOURCE][@REVISION] items, comma-separated"
    cache.add_argument("--models", action="append", default=[], help=models_help)
    cache.add_argument("--out", required=True, help="the cache URI (local, gs://, s3://)")
    cache.add_argument("--verify", action="store_true", help="only verify every cached file against the manifest")
    cache.add_argument("--offline", action="store_true", help="never contact the hub (sources must be local/URIs)")
    cache.set_defaults(func=_cache)

    from distar.export import __doc__ as export_doc

    exp = sub.add_parser(
        "export", help="training checkpoint → diffusers SDXL pipeline (one step)", description=export_doc
    )
    exp.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run (its newest checkpoint)")
    exp.add_argument("--out", required=True, help="output URI of the pipeline directory")
    exp.add_argument("--ema", action="store_true", help="also write the EMA weights (unet_ema/)")
    exp.add_argument("--single-file", action="store_true", help="also write the UNet as one safetensors file")
    exp.add_argument(
        "--dtype", default="fp16", help="precision of the generator's network: fp16 (default), bf16 or fp32"
    )
    exp.add_argument("--metrics", default=None, help="metrics.json to quote in the model card")
    exp.add_argument("--force", action="store_true", help="write into a non-empty --out (same-named files replaced)")
    exp.set_defaults(func=_export)

    from distar.evaluate import EvaluateConfig
    from distar.evaluate import __doc__ as evaluate_doc

    ev = sub.add_parser(
        "evaluate",
        help="the paper's evaluation protocol, with an HTML report",
        description=evaluate_doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(ev, EvaluateConfig, flags={"sources": "source", "heads": "head"})
    ev.set_defaults(func=_evaluate)

    from distar.compare import __doc__ as compare_doc

    cp = sub.add_parser(
        "compare",
        help="ablation variants under one protocol, beside the paper and the baselines",
        description=compare_doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cp.add_argument("evaluations", nargs="+", help="evaluation directories or metrics.json files, one per variant")
    cp.add_argument("--out", required=True, help="output URI (comparison.json, comparison.md, report.html)")
    cp.add_argument("--initial", default=None, help="the initial generator's evaluation")
    cp.add_argument("--reference", default=None, help="the reference's evaluation")
    cp.add_argument("--images", type=int, default=4, help="prompts shown side by side")
    cp.add_argument("--allow-protocol-mismatch", action="store_true", help="compare even when protocols differ")
    cp.set_defaults(func=_compare)

    from distar.local_pipeline import __doc__ as local_doc

    rl = sub.add_parser(
        "run-local",
        help="the whole pipeline (curate, cache, train, export, evaluate) on this machine",
        description=local_doc,
    )
    rl.add_argument("--preset", default="tiny", help="tiny (CPU, minutes) or sdxl")
    rl.add_argument("--root", default="runs/pipeline", help="kfp.local pipeline root (local directory)")
    rl.add_argument("--pipeline", default="sdxl", help="sdxl (the DI* pipeline) or ablation (a two-variant sweep)")
    rl.set_defaults(func=_run_local)

    from distar.submit import __doc__ as submit_doc

    sb = sub.add_parser(
        "submit", help="submit the compiled pipeline to a Kubeflow Pipelines server", description=submit_doc
    )
    sb.add_argument("--host", required=True, help="the KFP API endpoint ($KFP_HOST)")
    sb.add_argument("--pipeline", default=None, help="sdxl or ablation: pipelines/distar_NAME.yaml")
    sb.add_argument("--package", default=None, help="a compiled pipeline (default: pipelines/distar_sdxl.yaml)")
    sb.add_argument("--experiment", default="distar")
    sb.add_argument("--run-name", default=None)
    sb.add_argument(
        "--pipeline-root",
        default=None,
        help="where the run's artifacts go (gs://… or s3://…; default: the namespace's kfp-launcher ConfigMap)",
    )
    sb.add_argument(
        "--service-account",
        default=None,
        help="the identity the steps run as (default: the server's, pipeline-runner or default-editor)",
    )
    sb.add_argument("--namespace", default=None, help="the Kubeflow profile namespace (multi-user clusters)")
    sb.add_argument(
        "--token",
        default=None,
        help="a bearer token for a multi-user deployment's auth proxy (default: $KF_PIPELINES_TOKEN)",
    )
    sb.add_argument("--cookies", default=None, help='session cookies for the auth proxy, e.g. "authservice_session=…"')
    sb.add_argument("--no-cache", action="store_true", help="run every step, cached results or not")
    sb.add_argument("arguments", nargs="*", metavar="key=value", help="pipeline arguments (JSON values parsed)")
    sb.set_defaults(func=_submit)

    tj = sub.add_parser("trainjob", help="Kubeflow Trainer TrainJobs").add_subparsers(dest="trainjob", required=True)
    rd = tj.add_parser(
        "render",
        help="print the TrainJob the launcher would create, as YAML (for review, or to apply it yourself)",
    )
    rd.add_argument("--config", default="sdxl", help="a preset (tiny, sdxl) or a TOML/JSON config file")
    rd.add_argument("--image", required=True, help="the training image (REGISTRY/distar@sha256:… pins it)")
    rd.add_argument("--name", required=True, help="the TrainJob's name")
    rd.add_argument("--namespace", default="default")
    rd.add_argument("--num-nodes", type=int, default=1)
    rd.add_argument("--nproc-per-node", type=int, default=8)
    rd.add_argument("--gpus-per-node", type=int, default=8)
    rd.add_argument("--secret-env", action="append", default=[], metavar="ENV=secret/key")
    rd.add_argument("--node-selector", action="append", default=[], metavar="key=value")
    rd.add_argument("--toleration", action="append", default=[], metavar="key[=value]:Effect")
    rd.add_argument("--service-account", default=None, help="the trainer pods' service account (Workload Identity)")
    rd.add_argument("--queue", default=None, help="a Kueue LocalQueue (label kueue.x-k8s.io/queue-name)")
    rd.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for distar train")
    rd.set_defaults(func=_trainjob_render)

    from distar.calibrate import __doc__ as calibrate_doc

    cal = sub.add_parser(
        "calibrate",
        help="the reward/divergence balance for several α_rew, from a few steps on your models",
        description=calibrate_doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cal.add_argument("--config", required=True, help="a preset (tiny, sdxl) or a TOML/JSON config file")
    cal.add_argument("--alphas", default="1,10,100", help="comma-separated α_rew values (the paper's: 1,10,100)")
    cal.add_argument("--steps", type=int, default=3, help="DI* iterations per α_rew")
    cal.add_argument("--json", action="store_true", help="print the rows as JSON")
    cal.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for distar train")
    cal.set_defaults(func=_calibrate)

    pl = sub.add_parser(
        "plan",
        help="predict the per-GPU memory, iteration time and GPU-hours of a training config (no GPU needed)",
        description="Per-GPU memory of a training config (weights, gradients, optimizer states, EMA, FSDP buffers "
        "and activations measured on the meta device), the communication per iteration, the iteration time, the "
        "largest batch that fits, and the wall time and GPU-hours of its steps (distar/plan.py).",
    )
    pl.add_argument("--config", default="sdxl", help="a preset (tiny, sdxl) or a TOML/JSON config file")
    pl.add_argument("--gpus", type=int, default=8, help="processes (GPUs); FSDP shards over all of them")
    pl.add_argument("--gpu-memory", type=float, default=None, help="GiB per GPU: say whether it fits (exit 2 if not)")
    pl.add_argument(
        "--arch",
        default="auto",
        choices=["auto", "tiny", "medium", "sdxl"],
        help="network shapes (auto: tiny for tiny: sources, else SDXL's published configs)",
    )
    pl.add_argument(
        "--text-encoders", action="store_true", help="prompts are encoded in the loop (no cached embeddings)"
    )
    pl.add_argument("--gpu-type", default="h100", help="a100, h100, h200 or b200: FLOP/s and NVLink defaults")
    pl.add_argument("--nodes", type=int, default=1, help="nodes the GPUs span (past one, InfiniBand carries FSDP)")
    pl.add_argument("--flops-per-gpu", type=float, default=None, help="achievable TFLOP/s (default: the datasheet's)")
    pl.add_argument("--nvlink", type=float, default=None, help="GB/s per GPU per direction within a node")
    pl.add_argument("--infiniband", type=float, default=50.0, help="GB/s per GPU across nodes (NDR 400 Gb/s: 50)")
    pl.add_argument(
        "--benchmark",
        default=None,
        help="a benchmarks/gpu_sdxl_step.py JSON: its measured iteration and matmul rate replace the estimates",
    )
    pl.add_argument("--json", action="store_true", help="every item as JSON")
    pl.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.batch_size=4")
    pl.set_defaults(func=_plan)

    from distar.train import __doc__ as train_doc
    from distar.train import build_parser as train_parser

    train = sub.add_parser(
        "train",
        help="DI* training (one process, or one per device under torchrun)",
        description=train_doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train_parser(train).set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from distar.train.stop import exit_code

    try:
        args.func(args)
    except Exception as err:  # a user's mistake or a preempted run: one line and its exit code; a bug: raised
        return exit_code(err, f"distar {args.command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
