"""README.md's commands, run as written: a line that stops working fails here.

Every command of every ```bash block runs, in its block's order, in a scratch directory that holds the checkout's
files (so `tests/data/…`, `pipelines/…`, `.venv` and the Makefile are where the README says), with `.venv/bin` on
PATH and the hub out of reach (HF_HUB_OFFLINE=1). A command that cannot run on a CPU machine says why in a comment
on its own lines: [needs a GPU], [needs a cluster], [needs a bucket], [needs the hub], [what CI runs] (`make
test`, which is this suite) or [a long run] (longer than CI's budget allows: `make lab`, whose short version runs);
each section where one does keeps a variant that runs. `$KFP_HOST` is a test KFP
server (helpers.fake_kfp) that answers as the real one's v2beta1 API does, so the submit commands run as written.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from helpers.fake_kfp import FakeKFP

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
NOT_HERE = re.compile(r"\[(needs a GPU|needs a cluster|needs a bucket|needs the hub|what CI runs|a long run)\]")
# what the README's commands read from the checkout
CHECKOUT = [
    "Makefile", "pyproject.toml", "locks", ".venv", "src", "tests", "docs", "pipelines", "components",
    "benchmarks", "containers", "k8s", ".torchxconfig",
]  # fmt: skip


def bash_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(the heading above, the commands) of each ```bash block; a command is its lines joined at a trailing
    backslash, with the comment lines just above it (where a reason not to run it may stand)."""
    blocks, heading = [], "top"
    for match in re.finditer(r"^(#+ [^\n]*)$|^```bash\n(.*?)^```", text, re.S | re.M):
        if match.group(1):
            heading = match.group(1).lstrip("# ")
            continue
        commands, pending, comments = [], "", []
        for line in match.group(2).splitlines():
            if not pending and line.lstrip().startswith("#"):
                comments.append(line)
                continue
            pending += line + "\n"
            if not line.rstrip().endswith("\\"):
                if pending.strip():
                    commands.append("".join(c + "\n" for c in comments) + pending)
                pending, comments = "", []
        blocks.append((heading, commands))
    return blocks


def runnable(command: str) -> bool:
    """Not when a comment on the command's own lines, or the comment line right above it, gives a reason (a
    reason further up belongs to an earlier command)."""
    lines = command.splitlines()
    comments = [line for line in lines if line.lstrip().startswith("#")]
    reason_above = bool(comments) and bool(NOT_HERE.search(comments[-1]))
    reason_inline = any(NOT_HERE.search(line.split(" #", 1)[1]) for line in lines if " #" in line)
    return not (reason_above or reason_inline)


BLOCKS = bash_blocks(README.read_text())


def test_the_readme_has_commands_and_every_block_runs_something():
    assert len(BLOCKS) >= 8
    by_heading: dict[str, list[str]] = {}
    for heading, commands in BLOCKS:
        assert commands, heading
        by_heading.setdefault(heading, []).extend(commands)
    for heading, commands in by_heading.items():  # a section's real commands come with a variant that runs here
        assert any(runnable(c) for c in commands), f"every command under {heading!r} is marked not to run here"
    skipped = [c for _, commands in BLOCKS for c in commands if not runnable(c)]
    assert any("gpu_sdxl_step.py" in c for c in skipped) and any("make test" in c for c in skipped)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    work = tmp_path_factory.mktemp("readme")
    for name in CHECKOUT:
        if (ROOT / name).exists():
            (work / name).symlink_to(ROOT / name)
    return work


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"{i}-{h[:40]}" for i, (h, _) in enumerate(BLOCKS)])
def test_the_readme_block_runs_as_written(index, workdir):
    heading, commands = BLOCKS[index]
    script = "set -euo pipefail\n" + "".join(c for c in commands if runnable(c))
    env = {
        **os.environ,
        "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
    }
    with FakeKFP() as fake:
        env["KFP_HOST"] = fake.url
        began = time.perf_counter()
        proc = subprocess.run(["bash", "-c", script], cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - began
    output = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"{heading}: exit {proc.returncode}\n{script}\n{output}"
    print(f"README block {heading!r}: {seconds:.0f} s")
    if "make demo" in script:  # the demo ends by naming its run and the reports, as pages that open
        run = next(line.split(": ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("pipeline run: "))
        assert Path(run).is_dir(), proc.stdout[-3000:]
        reports = [w for w in proc.stdout.split() if w.startswith("file://") and w.endswith("/report.html")]
        assert len(reports) == 2, proc.stdout[-3000:]
        assert "  train: success" in proc.stdout and "executor_input" not in proc.stdout
