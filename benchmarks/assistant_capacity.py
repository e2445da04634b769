"""A full against a LoRA assistant on the tiny preset, side by side in one run: the same seed, prompts and steps;
per step the assistant's denoising loss (how well it follows the generator's samples) and the divergence the
generator sees. A LoRA assistant has a fraction of the trainable parameters, so it is expected to track the
generator's score less closely: this measures by how much, on the tiny networks.

    python benchmarks/assistant_capacity.py [--steps 12] [--rank 8] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path


def run_one(out: Path, steps: int, extra: list[str]) -> list[dict]:
    from distar.train import run

    overrides = [
        f"out={out}",
        f"steps={steps}",
        "log.every=1",
        f"log.sample_every={steps}",
        "log.progress=false",
        "log.tensorboard=false",
        "parallel.strategy=none",
        f"checkpoint.every={steps}",
        *extra,
    ]
    run("tiny", overrides)
    lines = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "loss/assistant" in x and "divergence" in x]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    import torch

    from distar.backbones.shared import adapter_parameters  # noqa: F401 - the LoRA path must import

    with tempfile.TemporaryDirectory() as tmp:
        full = run_one(Path(tmp) / "full", args.steps, [])
        lora = run_one(
            Path(tmp) / "lora",
            args.steps,
            [
                "model.assistant=lora",
                f"model.assistant_lora_rank={args.rank}",
                f"model.assistant_lora_alpha={args.rank}",
            ],
        )
    half = args.steps // 2
    result = {
        "steps": args.steps,
        "rank": args.rank,
        "torch": torch.__version__,
        "per_step": {
            "full": [{k: x[k] for k in ("step", "loss/assistant", "divergence")} for x in full],
            "lora": [{k: x[k] for k in ("step", "loss/assistant", "divergence")} for x in lora],
        },
    }
    for name, lines in (("full", full), ("lora", lora)):
        late = lines[half:]
        result[name] = {
            "assistant_loss_mean_second_half": statistics.mean(x["loss/assistant"] for x in late),
            "divergence_mean_second_half": statistics.mean(x["divergence"] for x in late),
        }
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
