"""The image recipes (CUDA and CPU), checked without a Docker engine: COPY sources exist and survive
.dockerignore, the entry point resolves inside the project, the base and torch are pinned, and each pulls the
torch build it is for."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = ["Dockerfile", "Dockerfile.cpu"]


def _instructions(name: str):
    text = (ROOT / "containers" / name).read_text()
    lines = [x.strip() for x in text.splitlines() if x.strip() and not x.strip().startswith("#")]
    return [(x.split()[0].upper(), x.split(None, 1)[1] if " " in x else "") for x in lines]


def _ignored(path: str) -> bool:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and p[0] != "#"]
    return any(fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in patterns)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_copy_source_exists_and_is_sent_to_the_build(name):
    copies = [args for op, args in _instructions(name) if op == "COPY"]
    assert copies
    for args in copies:
        *sources, _dest = args.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert not _ignored(source.rstrip("/")), f"COPY {source}: excluded by .dockerignore"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_is_pinned_user_is_not_root_and_entry_point_resolves(name):
    ops = _instructions(name)
    base = next(args for op, args in ops if op == "FROM")
    assert ":" in base and not base.endswith(":latest")
    users = [args for op, args in ops if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    entry = next(args for op, args in ops if op == "ENTRYPOINT")
    command = re.findall(r'"([^"]+)"', entry)[0]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts[command].split(":")
    import importlib

    assert callable(getattr(importlib.import_module(module), func))
    torch_pin = next(args for op, args in ops if op == "ARG" and args.startswith("TORCH_VERSION="))
    assert re.fullmatch(r"TORCH_VERSION=2\.\d+\.\d+", torch_pin)
    index = next(args for op, args in ops if op == "ARG" and args.startswith("TORCH_INDEX="))
    assert index.endswith("/whl/cpu") == name.endswith(".cpu")
