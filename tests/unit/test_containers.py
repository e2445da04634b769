"""The image recipe, checked without a Docker engine: COPY sources exist and survive .dockerignore, the entry
point resolves inside the project, and the base is pinned."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "containers" / "Dockerfile"


def _instructions():
    lines = [x.strip() for x in DOCKERFILE.read_text().splitlines() if x.strip() and not x.strip().startswith("#")]
    return [(x.split()[0].upper(), x.split(None, 1)[1] if " " in x else "") for x in lines]


def _ignored(path: str) -> bool:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and p[0] != "#"]
    return any(fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in patterns)


def test_every_copy_source_exists_and_is_sent_to_the_build():
    copies = [args for op, args in _instructions() if op == "COPY"]
    assert copies
    for args in copies:
        *sources, _dest = args.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert not _ignored(source.rstrip("/")), f"COPY {source}: excluded by .dockerignore"


def test_base_is_pinned_user_is_not_root_and_entry_point_resolves():
    ops = _instructions()
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
