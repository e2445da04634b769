import os
import tempfile

import pytest

# Tests never reach a model hub: the tiny preset is built from configs and read back from disk.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
# the leases this host has watched (distar.train.lease): per test session, not in the user's ~/.cache
os.environ.setdefault("DISTAR_STATE_DIR", tempfile.mkdtemp(prefix="distar-state-"))


@pytest.fixture(scope="session", autouse=True)
def tiny_root(tmp_path_factory):
    """The tiny preset's models and prompts (`tiny:` sources), built once per test session; torchrun children
    inherit the variable."""
    root = tmp_path_factory.mktemp("tiny-preset") / "root"
    previous = os.environ.get("DISTAR_TINY_DIR")
    os.environ["DISTAR_TINY_DIR"] = str(root)
    yield root
    if previous is None:
        os.environ.pop("DISTAR_TINY_DIR", None)
    else:
        os.environ["DISTAR_TINY_DIR"] = previous


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """A tiny SDXL pipeline directory in the hub's layout (random weights, seed 0)."""
    from distar.backbones.sdxl import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny") / "sdxl", seed=0)
