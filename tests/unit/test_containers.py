"""The image recipes (CUDA and CPU), checked without a Docker engine: COPY sources exist and survive
.dockerignore, the entry point resolves inside the project, the base is pinned, and each installs its own lock;
the locks, the Makefile and this environment agree on every version (one torch everywhere)."""

from __future__ import annotations

import fnmatch
import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = ["Dockerfile", "Dockerfile.cpu"]
LOCK_OF = {"Dockerfile": "locks/cuda.txt", "Dockerfile.cpu": "locks/cpu.txt"}


def _instructions(name: str):
    text = (ROOT / "containers" / name).read_text().replace("\\\n", " ")
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


def _lock(path: str) -> dict[str, Version]:
    pins = {}
    for line in (ROOT / path).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{path}: {line!r} is not pinned"
            pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


def _makefile_torch() -> Version:
    return Version(re.search(r"^TORCH_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1))


@pytest.mark.parametrize("name", DOCKERFILES)
def test_each_image_installs_its_lock_and_nothing_unpinned(name):
    ops = _instructions(name)
    runs = [args for op, args in ops if op == "RUN" and "pip install" in args]
    lock = LOCK_OF[name]
    assert any(f"-r {lock}" in args for args in runs), f"{name} does not install {lock}"
    assert any(args.split()[-1] == "locks/" and lock in args for op, args in ops if op == "COPY")
    # after the lock, the project itself goes in without resolving anything again; `pip check` proves it complete
    for args in runs:
        if f"-r {lock}" not in args:
            assert "--no-deps" in args and "pip check" in args, f"{name}: {args!r} may install unlocked versions"
    assert not any(op == "ARG" and args.startswith("TORCH_VERSION") for op, args in ops)


def test_one_torch_in_the_makefile_the_locks_and_this_environment():
    torch = _makefile_torch()
    assert _lock("locks/cuda.txt")["torch"] == torch  # PyPI's CUDA build
    assert _lock("locks/cpu.txt")["torch"] == Version(f"{torch}+cpu")
    assert "torch" not in _lock("locks/ci.txt")  # installed first by the Makefile, at TORCH_CPU
    assert Version(importlib.metadata.version("torch")).release == torch.release  # CI tests the pinned torch
    assert any(n.startswith("nvidia-nccl") for n in _lock("locks/cuda.txt"))
    assert not any(n.startswith("nvidia-") or n == "triton" for n in _lock("locks/cpu.txt"))


def test_the_locks_satisfy_pyproject_and_agree_with_each_other():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = {
        "locks/ci.txt": project["dependencies"] + extras["test"] + extras["storage"],
        "locks/cpu.txt": project["dependencies"] + extras["storage"],
        "locks/cuda.txt": project["dependencies"] + extras["storage"],
    }
    locks = {path: _lock(path) for path in wanted}
    for path, requirements in wanted.items():
        for req in map(Requirement, requirements):
            name = canonicalize_name(req.name)
            if name == "torch" and path == "locks/ci.txt":
                continue
            assert name in locks[path], f"{path} lacks {req.name}: run `make lock`"
            assert req.specifier.contains(locks[path][name], prereleases=True), (
                f"{path}: {req.name}=={locks[path][name]} does not satisfy {req}: run `make lock`"
            )
    ci = locks["locks/ci.txt"]
    for path in ("locks/cpu.txt", "locks/cuda.txt"):
        differ = {n: (v, ci[n]) for n, v in locks[path].items() if n in ci and v != ci[n]}
        assert not differ, f"{path} and locks/ci.txt pin different versions: {differ}"


def test_this_environment_is_the_ci_lock():
    differ = {}
    for name, version in _lock("locks/ci.txt").items():
        try:
            installed = Version(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            differ[name] = (str(version), installed and str(installed))
    assert not differ, f"installed versions differ from locks/ci.txt (rerun `make venv`): {differ}"
