"""The `distar` command line: one sub-command per step. No logic lives here, only argument plumbing."""

from __future__ import annotations

import argparse
import json
import sys

from distar import storage
from distar.config import add_config_arguments, config_from_args
from distar.errors import UserError


def _toy(args: argparse.Namespace) -> None:
    from distar.config import apply_overrides
    from distar.toy import ToyConfig, run

    config = apply_overrides(ToyConfig(), args.overrides)
    metrics = run(config, out_dir=args.out, progress=not args.quiet and args.verbosity > 0)
    summary = {k: v for k, v in metrics.items() if k not in ("config", "history")}
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}/metrics.json and {args.out}/toy.png")


def _train(args: argparse.Namespace) -> None:
    from distar.train import exec_torchrun, run

    if args.nproc_per_node is not None:
        exec_torchrun(args.config, args.overrides, args.nproc_per_node, args.allow_config_change, args.force)

    summary = run(args.config, args.overrides, allow_config_change=args.allow_config_change, force=args.force)
    if summary.get("rank", 0) == 0:
        print(json.dumps(summary))


def _lab(args: argparse.Namespace) -> None:
    from distar.lab import LabConfig, run_lab

    variants = [v for v in (args.variants or "").split(",") if v]
    lab = run_lab(
        LabConfig.make(args.out, quick=args.quick, variants=variants, family=args.family),
        log=lambda line: print(line, flush=True),
    )
    print(f"lab: {len(lab['variants'])} variants in {lab['seconds']:.0f} s; wrote {args.out}/lab.json, "
          f"{args.out}/pareto.png and {args.out}/comparison/report.html")  # fmt: skip


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
    print(f"report: {storage.link(args.out.rstrip('/') + '/report.html')}")


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
    import time
    from pathlib import Path

    from distar.local_pipeline import describe, run_local

    log = None if args.verbosity >= 2 else Path(args.root) / f"run-local-{time.strftime('%Y%m%d-%H%M%S')}.log"
    run = run_local(args.preset, args.root, pipeline=args.pipeline, log=log)
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


class Stages:
    """A progress bar over a command's named stages, on stderr (the results go to stdout): the stage under way,
    how many are done, the time so far and, after the first, an estimate of what is left."""

    def __init__(self, what: str, names: list[str]):
        from tqdm import tqdm

        self.names = names
        self.bar = tqdm(
            total=len(names), desc=what, unit="stage", file=sys.stderr, dynamic_ncols=True,
            bar_format="{desc}: {n}/{total} stages [{elapsed}<{remaining}] {postfix}",
        )  # fmt: skip
        self.bar.set_postfix_str(names[0])

    def next(self) -> None:
        self.bar.update(1)
        if self.bar.n < len(self.names):
            self.bar.set_postfix_str(self.names[self.bar.n])

    def close(self) -> None:
        self.bar.set_postfix_str("done")
        self.bar.close()


def _plan(args: argparse.Namespace) -> None:
    import diffusers

    from distar.plan import format_plan, plan
    from distar.train.config import load_config

    diffusers.utils.logging.set_verbosity_error()  # dtype casts of random meta networks: nothing to warn about

    # The plan reads shapes, not data: a placeholder satisfies the preset's required prompt set.
    config = load_config(args.config, ["data.prompts=unused-by-plan", *args.overrides])
    from distar.models.architectures import default_architecture

    arch = args.arch
    if arch == "auto":
        arch = default_architecture(config.model.backbone, config.model.reference)
    stages = ["memory: activations traced on the meta device", "FLOPs of one iteration"]
    stages += ["the largest batch that fits (more memory plans)"] if args.gpu_memory else []
    progress = Stages("distar plan", stages)
    result = plan(config, args.gpus, arch, text_encoders=args.text_encoders)
    progress.next()
    from distar.models.architectures import ARCHITECTURES
    from distar.plan import (
        estimate_time,
        format_time,
        forward_flops,
        iteration_flops,
        largest_batch,
        read_benchmark,
        recorded_rate,
    )

    measured, rate = None, args.flops_per_gpu and args.flops_per_gpu * 1e12
    source = f"--flops-per-gpu {args.flops_per_gpu:g} TFLOP/s" if rate else None
    if args.benchmark:
        measured, matmul_rate = read_benchmark(args.benchmark, config)
        source = f"the iteration measured in {args.benchmark}"
        rate = rate or matmul_rate
    elif not rate:
        rate, source = recorded_rate(args.gpu_type)
    flops = iteration_flops(config, *forward_flops(config, ARCHITECTURES[arch]()))
    progress.next()
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
        source=source,
    )
    result["time"] = timing
    if args.gpu_memory:
        batch, _ = largest_batch(config, args.gpus, arch, args.gpu_memory)
        result["largest_batch_per_gpu"] = batch
        progress.next()
    progress.close()
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
    print(f"report: {storage.link(args.out.rstrip('/') + '/report.html')}")


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


def _config_show(args: argparse.Namespace) -> None:
    from distar.train.config import resolved

    rows = resolved(args.config, args.overrides)
    if args.json:
        print(json.dumps([{"key": k, "value": v, "from": o} for k, v, o in rows], indent=1, default=str))
        return
    width = max(len(k) for k, _, _ in rows)
    for key, value, origin in rows:
        print(f"{key:<{width}} = {json.dumps(value, default=str):<40} # {origin}")


def _completion(args: argparse.Namespace) -> None:
    import dataclasses

    from distar.completion import bash_script
    from distar.config import flat_keys
    from distar.toy import ToyConfig
    from distar.train.config import TrainConfig

    train = [k for k, _ in flat_keys(TrainConfig(), dataclasses.asdict(TrainConfig()))]
    toy = [f.name for f in dataclasses.fields(ToyConfig)]
    keys = {name: train for name in ("train", "calibrate", "plan", "config")} | {"toy": toy}
    print(bash_script(build_parser(), keys), end="")


def _add_completion(p: argparse.ArgumentParser) -> None:
    from distar.completion import __doc__ as doc

    p.description = doc
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.set_defaults(func=_completion)


def _add_config(p: argparse.ArgumentParser) -> None:
    show = p.add_subparsers(dest="config_command", required=True, metavar="show").add_parser(
        "show",
        help="the training config a --config and overrides resolve to, each key with where its value comes from",
        description="Print every key of the training config that `distar train --config X key=value…` would run "
        "with, and where each value comes from: an override, the preset or file, or the default.",
        formatter_class=_WithDefaults,
    )
    show.add_argument("--config", default="sdxl", help="a preset (tiny, sdxl) or a TOML/JSON config file")
    show.add_argument("--json", action="store_true", help="the rows as JSON")
    show.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for distar train")
    show.set_defaults(func=_config_show)


def _add_lab(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", choices=["digits"], help="the real data: scikit-learn's handwritten digits")
    p.add_argument("--out", default="runs/lab", help="output directory (lab.json, pareto.png, comparison/, stages/)")
    p.add_argument("--quick", action="store_true", help="short stages and three variants (what CI runs)")
    p.add_argument(
        "--family", default="sdxl", choices=["sdxl", "sd3"],
        help="the models' family: sdxl (ε on the VP schedule, the paper's) or sd3 (rectified flow, velocity)",
    )  # fmt: skip
    p.add_argument(
        "--variants", default=None,
        help="comma-separated rows of distar.compare.TABLE3 (NAME@conditional: the other α_cfg reading); "
        "default: every row, and both (0, 0) rows under the conditional reading",
    )  # fmt: skip
    p.set_defaults(func=_lab)


def _add_toy(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Train a one-step generator on a 2-D Gaussian mixture with DI*. Overrides are key=value pairs of "
        "distar.toy.ToyConfig, e.g. alpha_rew=0 divergence=kl distance=l2 steps=3000."
    )
    p.add_argument("--out", default="runs/toy", help="output directory (metrics.json, toy.png)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="ToyConfig fields, e.g. steps=3000")
    p.set_defaults(func=_toy)


def _add_curate(p: argparse.ArgumentParser) -> None:
    from distar.curate import CurateConfig
    from distar.curate import __doc__ as doc

    p.description = doc
    add_config_arguments(p, CurateConfig, flags={"sources": "source"})
    p.set_defaults(func=_curate)


def _add_cache(p: argparse.ArgumentParser) -> None:
    from distar.cache import PRESETS
    from distar.cache import __doc__ as doc

    p.description, p.formatter_class = doc, _RawWithDefaults
    models_help = f"presets ({', '.join(PRESETS)}) or KEY[=SOURCE][@REVISION] items, comma-separated"
    p.add_argument("--models", action="append", default=[], help=models_help)
    p.add_argument("--out", required=True, help="the cache URI (local, gs://, s3://)")
    p.add_argument("--verify", action="store_true", help="only verify every cached file against the manifest")
    p.add_argument("--offline", action="store_true", help="never contact the hub (sources must be local/URIs)")
    p.set_defaults(func=_cache)


def _add_export(p: argparse.ArgumentParser) -> None:
    from distar.export import DTYPES
    from distar.export import __doc__ as doc

    p.description = doc
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run (its newest checkpoint)")
    p.add_argument("--out", required=True, help="output URI of the pipeline directory")
    p.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write the EMA weights (unet_ema/): by default whenever the checkpoint holds them; --ema requires them",
    )
    p.add_argument("--single-file", action="store_true", help="also write the UNet as one safetensors file")
    p.add_argument("--dtype", default="fp16", choices=DTYPES, help="precision of the generator's network")
    p.add_argument("--metrics", default=None, help="metrics.json to quote in the model card")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out (same-named files replaced)")
    p.set_defaults(func=_export)


def _add_evaluate(p: argparse.ArgumentParser) -> None:
    from distar.evaluate import EvaluateConfig
    from distar.evaluate import __doc__ as doc

    p.description, p.formatter_class = doc, _RawWithDefaults
    add_config_arguments(p, EvaluateConfig, flags={"sources": "source", "heads": "head"})
    p.set_defaults(func=_evaluate)


def _add_compare(p: argparse.ArgumentParser) -> None:
    from distar.compare import __doc__ as doc

    p.description, p.formatter_class = doc, _RawWithDefaults
    p.add_argument("evaluations", nargs="+", help="evaluation directories or metrics.json files, one per variant")
    p.add_argument("--out", required=True, help="output URI (comparison.json, comparison.md, report.html)")
    p.add_argument("--initial", default=None, help="the initial generator's evaluation")
    p.add_argument("--reference", default=None, help="the reference's evaluation")
    p.add_argument("--images", type=int, default=4, help="prompts shown side by side")
    p.add_argument("--allow-protocol-mismatch", action="store_true", help="compare even when protocols differ")
    p.set_defaults(func=_compare)


def _add_run_local(p: argparse.ArgumentParser) -> None:
    from distar.local_pipeline import __doc__ as doc

    p.description = doc
    p.add_argument("--preset", default="tiny", help="tiny, tiny-sd3, tiny-flux (CPU, minutes) or sdxl")
    p.add_argument("--root", default="runs/pipeline", help="kfp.local pipeline root (local directory)")
    p.add_argument("--pipeline", default="sdxl", help="sdxl (the DI* pipeline) or ablation (a two-variant sweep)")
    p.set_defaults(func=_run_local)


def _add_submit(p: argparse.ArgumentParser) -> None:
    from distar.submit import __doc__ as doc

    p.description = doc
    p.add_argument("--host", required=True, help="the KFP API endpoint ($KFP_HOST)")
    p.add_argument("--pipeline", default=None, help="sdxl or ablation: pipelines/distar_NAME.yaml")
    p.add_argument("--package", default=None, help="a compiled pipeline (default: pipelines/distar_sdxl.yaml)")
    p.add_argument("--experiment", default="distar", help="the KFP experiment the run is filed under")
    p.add_argument(
        "--run-name", default=None, help="the run's name in the UI (default: the pipeline's name and the time)"
    )
    p.add_argument(
        "--pipeline-root",
        default=None,
        help="where the run's artifacts go (gs://… or s3://…; default: the namespace's kfp-launcher ConfigMap)",
    )
    p.add_argument(
        "--service-account",
        default=None,
        help="the identity the steps run as (default: the server's, pipeline-runner or default-editor)",
    )
    p.add_argument("--namespace", default=None, help="the Kubeflow profile namespace (multi-user clusters)")
    p.add_argument(
        "--token",
        default=None,
        help="a bearer token for a multi-user deployment's auth proxy (default: $KF_PIPELINES_TOKEN)",
    )
    p.add_argument("--cookies", default=None, help='session cookies for the auth proxy, e.g. "authservice_session=…"')
    p.add_argument("--no-cache", action="store_true", help="run every step, cached results or not")
    p.add_argument("arguments", nargs="*", metavar="key=value", help="pipeline arguments (JSON values parsed)")
    p.set_defaults(func=_submit)


def _add_trainjob(p: argparse.ArgumentParser) -> None:
    tj = p.add_subparsers(dest="trainjob", required=True)
    rd = tj.add_parser(
        "render",
        help="print the TrainJob the launcher would create, as YAML (for review, or to apply it yourself)",
        formatter_class=_WithDefaults,
    )
    rd.add_argument("--config", default="sdxl", help="a preset (tiny, sdxl) or a TOML/JSON config file")
    rd.add_argument("--image", required=True, help="the training image (REGISTRY/distar@sha256:… pins it)")
    rd.add_argument("--name", required=True, help="the TrainJob's name")
    rd.add_argument("--namespace", default="default", help="the namespace the TrainJob is created in")
    rd.add_argument("--num-nodes", type=int, default=1, help="training nodes (pods)")
    rd.add_argument("--nproc-per-node", type=int, default=8, help="training processes per node")
    rd.add_argument("--gpus-per-node", type=int, default=8, help="GPUs each node's pod requests")
    rd.add_argument(
        "--secret-env", action="append", default=[], metavar="ENV=secret/key", help="an env variable from a Secret"
    )
    rd.add_argument(
        "--node-selector", action="append", default=[], metavar="key=value", help="a node label the pods require"
    )
    rd.add_argument(
        "--toleration", action="append", default=[], metavar="key[=value]:Effect", help="a taint the pods tolerate"
    )
    rd.add_argument("--service-account", default=None, help="the trainer pods' service account (Workload Identity)")
    rd.add_argument("--queue", default=None, help="a Kueue LocalQueue (label kueue.x-k8s.io/queue-name)")
    rd.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for distar train")
    rd.set_defaults(func=_trainjob_render)


def _add_calibrate(p: argparse.ArgumentParser) -> None:
    from distar.calibrate import __doc__ as doc

    p.description, p.formatter_class = doc, _RawWithDefaults
    p.add_argument("--config", required=True, help="a preset (tiny, sdxl) or a TOML/JSON config file")
    p.add_argument("--alphas", default="1,10,100", help="comma-separated α_rew values (the paper's: 1,10,100)")
    p.add_argument("--steps", type=int, default=3, help="DI* iterations per α_rew")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for distar train")
    p.set_defaults(func=_calibrate)


def _add_plan(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Per-GPU memory of a training config (weights, gradients, optimizer states, EMA, FSDP buffers "
        "and activations measured on the meta device), the communication per iteration, the iteration time, the "
        "largest batch that fits, and the wall time and GPU-hours of its steps (distar/plan.py)."
    )
    p.add_argument("--config", default="sdxl", help="a preset (tiny, sdxl, sd35m, flux, …) or a TOML/JSON config file")
    p.add_argument("--gpus", type=int, default=8, help="processes (GPUs); FSDP shards over all of them")
    p.add_argument("--gpu-memory", type=float, default=None, help="GiB per GPU: say whether it fits (exit 2 if not)")
    p.add_argument(
        "--arch",
        default="auto",
        choices=["auto", "tiny", "medium", "sdxl", "tiny-sd3", "sd35m", "sd35l", "tiny-flux", "flux"],
        help="network shapes (auto: the tiny ones for tiny: sources, else the family's published configs)",
    )
    p.add_argument(
        "--text-encoders", action="store_true", help="prompts are encoded in the loop (no cached embeddings)"
    )
    p.add_argument("--gpu-type", default="h100", help="a100, h100, h200 or b200: FLOP/s and NVLink defaults")
    p.add_argument("--nodes", type=int, default=1, help="nodes the GPUs span (past one, InfiniBand carries FSDP)")
    p.add_argument("--flops-per-gpu", type=float, default=None, help="achievable TFLOP/s (default: the datasheet's)")
    p.add_argument("--nvlink", type=float, default=None, help="GB/s per GPU per direction within a node")
    p.add_argument("--infiniband", type=float, default=50.0, help="GB/s per GPU across nodes (NDR 400 Gb/s: 50)")
    p.add_argument(
        "--benchmark",
        default=None,
        help="a benchmarks/gpu_sdxl_step.py JSON: its measured iteration and matmul rate replace the estimates",
    )
    p.add_argument("--json", action="store_true", help="every item as JSON")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.batch_size=4")
    p.set_defaults(func=_plan)


def _add_train(p: argparse.ArgumentParser) -> None:
    from distar.train import __doc__ as doc
    from distar.train import build_parser as train_parser

    p.description, p.formatter_class = doc, _RawWithDefaults
    train_parser(p).set_defaults(func=_train)


class _WithDefaults(argparse.HelpFormatter):
    """Each option's default in its help, where it says something (not None, False or empty) and the help does not
    name it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if default in (None, False, [], argparse.SUPPRESS) or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class _RawWithDefaults(argparse.RawDescriptionHelpFormatter, _WithDefaults):
    """A description as written, and defaults as `_WithDefaults` shows them."""


# name → (the one line `distar --help` shows, what fills in the sub-command's parser). A parser is filled in only
# for the command being run: the others' modules (torch, diffusers) stay unimported.
COMMANDS = {
    "toy": ("the 2-D lab: a complete DI* run on a Gaussian mixture", _add_toy),
    "lab": ("the real-data lab: DI* end to end on trained models and real digits", _add_lab),
    "curate": ("prompt sources → normalised, filtered, deduplicated Parquet shards", _add_curate),
    "cache": ("fetch, convert and checksum every model a run needs into a cache URI", _add_cache),
    "train": ("DI* training (one process, or one per device under torchrun)", _add_train),
    "config": ("show the resolved training config, each key with its source", _add_config),
    "completion": ("print the bash completion script: source <(distar completion)", _add_completion),
    "calibrate": ("the reward/divergence balance for several α_rew, from a few steps on your models", _add_calibrate),
    "plan": (
        "predict the per-GPU memory, iteration time and GPU-hours of a training config (no GPU needed)",
        _add_plan,
    ),
    "export": ("training checkpoint → diffusers pipeline for one-step generation", _add_export),
    "evaluate": ("the paper's evaluation protocol, with an HTML report", _add_evaluate),
    "compare": ("ablation variants under one protocol, beside the paper and the baselines", _add_compare),
    "run-local": ("the whole pipeline (curate, cache, train, export, evaluate) on this machine", _add_run_local),
    "submit": ("submit the compiled pipeline to a Kubeflow Pipelines server", _add_submit),
    "trainjob": ("Kubeflow Trainer TrainJobs: render the one the launcher would create", _add_trainjob),
}


def build_parser(commands: list[str] | None = None) -> argparse.ArgumentParser:
    """The command line; only `commands` are filled in (None: all of them)."""
    from distar import __version__

    parser = argparse.ArgumentParser(prog="distar", description=__doc__)
    parser.add_argument("--version", action="version", version=f"distar {__version__}")
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument(
        "-q", "--quiet", dest="verbosity", action="store_const", const=0, default=1,
        help="results and errors only: no progress bars, no library messages or warnings",
    )  # fmt: skip
    loud.add_argument(
        "-v", "--verbose", dest="verbosity", action="store_const", const=2,
        help="everything: the libraries' info messages and warnings, the local pipeline's step logs",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (line, fill) in COMMANDS.items():
        p = sub.add_parser(name, help=line, description=line, formatter_class=_WithDefaults)
        if commands is None or name in commands:
            fill(p)
    return parser


def _command(argv: list[str]) -> str | None:
    """The sub-command `argv` names (its first word that is not an option); a mistyped one is a UserError with the
    nearest names."""
    import difflib

    word = next((a for a in argv if not a.startswith("-")), None)
    if word is None or word in COMMANDS:
        return word
    near = difflib.get_close_matches(word, COMMANDS, n=2, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
    raise UserError(f"no command {word!r}{hint} (distar --help lists them: {', '.join(COMMANDS)})")


def _override_hint(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """`--steps 5`, the habit of other trainers' command lines, names a config key here: say to write steps=5."""
    known, parsers = set(), [parser]
    while parsers:  # the options of every (sub-)command
        current = parsers.pop()
        for action in current._actions:
            known.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
    for i, arg in enumerate(argv):
        if arg.startswith("--") and arg.split("=", 1)[0] not in known:
            key = arg[2:].split("=", 1)[0].replace("-", "_")
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "VALUE")
            raise UserError(f"unknown option {arg.split('=', 1)[0]}; config keys are written key=value: {key}={value}")


# Known-harmless warnings, silenced by default (-v shows them): numpy 2's copy keyword inside diffusers' schedulers.
HARMLESS = ["ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"]


def set_verbosity(level: int) -> None:
    """0 quiet, 1 default, 2 verbose; through the environment, so torchrun's workers and kfp.local's steps (child
    processes) speak at the same level as the command that started them."""
    import os
    import warnings

    os.environ["DISTAR_VERBOSITY"] = str(level)
    libraries = {0: "error", 1: "error", 2: "info"}[level]
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", libraries)
    os.environ.setdefault("DIFFUSERS_VERBOSITY", libraries)
    if level == 0:
        os.environ["TQDM_DISABLE"] = "1"  # tqdm reads TQDM_* as defaults of every bar, in every process
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["PYTHONWARNINGS"] = "ignore"
        warnings.simplefilter("ignore")
    elif level == 1:
        os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), *HARMLESS]))
        for rule in HARMLESS:
            action, message, category = rule.split(":")
            warnings.filterwarnings(action, message=message, category=DeprecationWarning)


def main(argv: list[str] | None = None) -> int:
    from distar.stop import exit_code

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        command = _command(argv)
        parser = build_parser([command] if command else [])
        if command in ("train", "config", "toy", "calibrate", "plan", "submit", "trainjob"):  # key=value overrides
            _override_hint(parser, argv)
    except UserError as err:
        print(f"distar: {err}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    set_verbosity(args.verbosity)
    try:
        args.func(args)
    except Exception as err:  # a user's mistake or a preempted run: one line and its exit code; a bug: raised
        return exit_code(err, f"distar {args.command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
