"""The `distar` command line: one sub-command per step. No logic lives here, only argument plumbing."""

from __future__ import annotations

import argparse
import json
import sys

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
    from distar.train import run

    summary = run(args.config, args.overrides)
    if summary.get("rank", 0) == 0:
        print(json.dumps(summary))


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

    from distar.train import __doc__ as train_doc
    from distar.train import build_parser as train_parser

    train = sub.add_parser("train", help="DI* training (one process, or one per device under torchrun)",
                           description=train_doc, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    train_parser(train).set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as err:
        print(f"distar {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
