"""The tiny preset's models and prompts, built once from configs and read back through the real loaders.

`tiny:NAME` in a config is the path NAME under the tiny root ($DISTAR_TINY_DIR, default ~/.cache/distar/tiny-v3;
the mapping is `distar.sources.tiny_path`). Each entry point that runs on them calls `prepare` (or `materialize`)
once, before anything resolves a `tiny:` source:
  tiny:sdxl                        an SDXL-shaped pipeline directory (each backbone's `build_tiny`)
  tiny:sd3                         an SD3-shaped pipeline directory (flow path: two CLIP towers, T5, a transformer)
  tiny:flux, tiny:flux-schnell     FLUX.1-shaped pipeline directories, with and without the guidance embedding
  tiny:dmd2_unet.safetensors       a raw UNet state dict in DMD2's file layout (another seed: the "1-step" start)
  tiny:rewards/<name>              every reward's tiny stand-in (rewards.tiny.build_tiny_rewards)
  tiny:prompts                     a Parquet prompt set (256 prompts) in the layout `distar curate` writes
  tiny:hps                         prompts in the HPSv2 benchmark's layout (anime, concept-art, paintings, photo .json)
The root is built in a temporary directory and renamed into place, so concurrent processes never see half of it.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from distar.prompts import HPS_STYLES
from distar.sources import TINY_PREFIX as PREFIX
from distar.sources import TINY_VERSION as VERSION
from distar.sources import tiny_root, uses_tiny

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
OBJECTS = ["cat", "dog", "car", "house", "tree", "boat", "bird", "chair"]
PLACES = ["on a beach", "in a forest", "in a city at night", "on the moon"]


def tiny_prompts() -> list[str]:
    return [f"a {c} {o} {p}" for c, o, p in itertools.product(COLOURS, OBJECTS, PLACES)]


def _build(root: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distar import backbones
    from distar.rewards.tiny import build_tiny_rewards

    for name in backbones.NAMES:
        backbones.get(name).build_tiny(root, seed=0)
    build_tiny_rewards(root / "rewards")
    (root / "prompts").mkdir()
    prompts = tiny_prompts()
    table = pa.table({"prompt": prompts, "id": [f"tiny-{i:04d}" for i in range(len(prompts))]})
    pq.write_table(table, root / "prompts" / "part-00000.parquet")
    (root / "hps").mkdir()  # the HPSv2 benchmark's layout: one JSON list of prompts per style
    for style, (colours, objects) in zip(
        HPS_STYLES,
        [
            (COLOURS[:2], OBJECTS[:2]),
            (COLOURS[2:4], OBJECTS[2:4]),
            (COLOURS[4:6], OBJECTS[4:6]),
            (COLOURS[6:], OBJECTS[6:]),
        ],
        strict=True,
    ):
        styled = [f"a {style} picture of a {c} {o}" for c, o in itertools.product(colours, objects)]
        (root / "hps" / f"{style}.json").write_text(json.dumps(styled))


MARKER = ".complete"


def materialize(root: str | os.PathLike | None = None, wait_s: float = 600.0) -> Path:
    """The tiny root, built if absent (safe to call from many processes at once: each builds into its own staging
    directory, the first rename wins, and a root counts only once its marker file is there)."""
    root = Path(root) if root is not None else tiny_root()
    if (root / MARKER).is_file():
        return root
    # One builder per node (local rank 0) and before any process group exists: transformers' save_pretrained
    # writes nothing on a rank other than 0 of an initialised process group.
    builder = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if builder and not root.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
        try:
            _build(staging)
            (staging / MARKER).write_text(VERSION)
            os.rename(staging, root)
        except OSError:
            if not root.exists():  # the rename lost to another process only if the root now exists
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if builder and not (root / MARKER).is_file():  # renames are atomic: a root without its marker is stale
        raise RuntimeError(f"{root} exists but is incomplete (no {MARKER}); delete it and run again")
    deadline = time.monotonic() + wait_s
    while not (root / MARKER).is_file():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{root} exists but is incomplete (no {MARKER}); delete it and run again")
        time.sleep(0.2)
    return root


def prepare(*values) -> None:
    """Build the tiny root when any of `values` (strings, or nested mappings and lists) names a `tiny:` source."""
    if uses_tiny(list(values)):
        materialize()


__all__ = ["PREFIX", "VERSION", "materialize", "prepare", "tiny_prompts", "tiny_root"]
