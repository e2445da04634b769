"""DI* training: one process per device under torchrun, or a single process.

  single process:   distar train --config tiny   (or: python -m distar.train --config tiny)
  one node:         torchrun --standalone --nproc_per_node 8 -m distar.train --config sdxl data.prompts=gs://…
  many nodes:       torchrun --nnodes 4 --nproc_per_node 8 --node_rank $R --rdzv_backend c10d \\
                      --rdzv_endpoint $HOST:29500 -m distar.train --config sdxl out=gs://bucket/run …
  Kubeflow Trainer: the TrainJob's torch-distributed runtime sets PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK,
                    PET_MASTER_ADDR, PET_MASTER_PORT; the command is plain `torchrun -m distar.train …`.
Rerunning the same command resumes from the newest complete checkpoint under `out` (a changed config is refused
unless --allow-config-change names the intent).

Exit codes: 0 done; 2 a user error (one message, no traceback); 75 (EX_TEMPFAIL) preempted: SIGTERM or SIGINT
arrived, the step in flight finished, a complete checkpoint was written and the logs flushed, and rerunning the
same command resumes there. Under torchrun pass --shutdown-timeout (seconds; torchrun's default is 30) longer
than a checkpoint takes, and give the pod a terminationGracePeriodSeconds longer still.
"""

from __future__ import annotations

import argparse
import json

from distar.stop import PREEMPTED, Preempted, exit_code

__all__ = ["PREEMPTED", "Preempted", "build_parser", "main", "run"]


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="distar train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="a preset (tiny, sdxl) or a TOML/JSON config file")
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume although the config differs from the checkpoint's (beyond steps, logging, checkpointing)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="train into an out= that is a non-empty directory holding no distar run (its files may be overwritten)",
    )
    parser.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        help="check the config here, then run torchrun with this many processes (a config error is then one "
        "message and exit 2, not a ChildFailedError from every worker)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. steps=100 loss.alpha_rew=10")
    return parser


def exec_torchrun(
    config_source: str, overrides: list[str], nproc_per_node: int, allow_config_change: bool, force: bool = False
) -> None:
    """Validate the config in this process, then become torchrun over `python -m distar.train` (PET_* variables of
    a Kubeflow Trainer runtime, or torchrun's own defaults, set the nodes)."""
    import os

    from distar import storage
    from distar.train.command import torchrun_command
    from distar.train.config import load_config

    storage.check_run_out(load_config(config_source, overrides).out, force)
    cmd = torchrun_command(config_source, overrides, nproc_per_node, standalone="PET_MASTER_ADDR" not in os.environ)
    cmd += ["--allow-config-change"] * allow_config_change + ["--force"] * force
    os.execv(cmd[0], cmd)


def run(config_source: str, overrides: list[str], allow_config_change: bool = False, force: bool = False) -> dict:
    """Load the config, check its output, join the process group, train, leave the group; returns rank 0's
    summary."""
    from distar import storage, tiny_preset
    from distar.train import distributed
    from distar.train.config import load_config
    from distar.train.trainer import Trainer

    config = load_config(config_source, overrides)
    tiny_preset.prepare(config.to_dict())
    world = distributed.init(config.parallel.device, config.parallel.backend)
    _quiet_libraries(world.is_main)
    try:
        world.check_on_main(lambda: storage.check_run_out(config.out, force))
        return Trainer(config, world).fit(allow_config_change=allow_config_change)
    finally:
        distributed.shutdown()


def _quiet_libraries(is_main: bool) -> None:
    """Library progress bars off everywhere (tqdm on rank 0 is the run's progress); warnings from rank 0 only."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    if not is_main:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    import os

    args = build_parser().parse_args(argv)
    quiet = os.environ.get("RANK", "0") != "0"  # under torchrun every rank fails alike: rank 0 says it once
    try:
        if args.nproc_per_node is not None:
            exec_torchrun(args.config, args.overrides, args.nproc_per_node, args.allow_config_change, args.force)
        summary = run(args.config, args.overrides, allow_config_change=args.allow_config_change, force=args.force)
    except Exception as err:
        return exit_code(err, "distar train", quiet)
    if summary.get("rank", 0) == 0:
        print(json.dumps(summary))
    return 0
