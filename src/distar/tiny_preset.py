"""The tiny preset's models and prompts, built once from configs and read back through the real loaders.

`tiny:NAME` in a config is the path NAME under the tiny root ($DISTAR_TINY_DIR, default ~/.cache/distar/tiny-v1):
  tiny:sdxl                        an SDXL-shaped pipeline directory (models.tiny.build_tiny_sdxl)
  tiny:dmd2_unet.safetensors       a raw UNet state dict in DMD2's file layout (another seed: the "1-step" start)
  tiny:rewards/<name>              every reward's tiny stand-in (rewards.tiny.build_tiny_rewards)
  tiny:prompts                     a Parquet prompt set (256 prompts) in the layout `distar curate` writes
The root is built in a temporary directory and renamed into place, so concurrent processes never see half of it.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from pathlib import Path

PREFIX = "tiny:"
VERSION = "tiny-v1"

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
OBJECTS = ["cat", "dog", "car", "house", "tree", "boat", "bird", "chair"]
PLACES = ["on a beach", "in a forest", "in a city at night", "on the moon"]


def tiny_prompts() -> list[str]:
    return [f"a {c} {o} {p}" for c, o, p in itertools.product(COLOURS, OBJECTS, PLACES)]


def tiny_root() -> Path:
    return Path(os.environ.get("DISTAR_TINY_DIR", Path.home() / ".cache" / "distar" / VERSION))


def _build(root: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.torch import save_file

    from distar.models.tiny import build_tiny_sdxl, build_tiny_unet
    from distar.rewards.tiny import build_tiny_rewards

    build_tiny_sdxl(root / "sdxl", seed=0)
    save_file(build_tiny_unet(seed=1).state_dict(), str(root / "dmd2_unet.safetensors"))
    build_tiny_rewards(root / "rewards")
    (root / "prompts").mkdir()
    prompts = tiny_prompts()
    table = pa.table({"prompt": prompts, "id": [f"tiny-{i:04d}" for i in range(len(prompts))]})
    pq.write_table(table, root / "prompts" / "part-00000.parquet")


def materialize(root: str | os.PathLike | None = None) -> Path:
    """The tiny root, built if absent (safe to call from many processes at once)."""
    root = Path(root) if root is not None else tiny_root()
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        _build(staging)
        os.rename(staging, root)
    except OSError:
        if not root.is_dir():  # the rename lost to another process only if the root now exists
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def resolve(source: str | None) -> str | None:
    """`tiny:NAME` → the local path of NAME (building the tiny root first); any other source unchanged."""
    if source is None or not str(source).startswith(PREFIX):
        return source
    return str(materialize() / str(source)[len(PREFIX) :])
