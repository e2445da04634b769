"""The command line's conventions: a fast start (no torch for `--help`), a version, suggestions for typos, the
`key=value` hint, help and defaults on every option, and the resolved config with each value's source."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from distar.cli import COMMANDS, build_parser, main

HEAVY = ("torch", "diffusers", "transformers", "kfp", "pyarrow")


def _modules_after(call: str) -> list[str]:
    """The heavy modules a fresh interpreter holds after `call` (a SystemExit from argparse is the normal end)."""
    code = (
        f"import sys\nfrom distar.cli import main\ntry:\n    {call}\nexcept SystemExit:\n    pass\n"
        f"print('MODULES', [m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.split("MODULES", 1)[1].strip().replace("'", '"'))


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["trian"], ["train", "--help"]])
def test_help_version_and_typos_import_no_torch(argv):
    assert _modules_after(f"main({argv!r})") == []


def test_version_and_the_list_of_commands(capsys):
    from distar import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"distar {__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    listing = capsys.readouterr().out
    assert all(name in listing for name in COMMANDS)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["trian"], "no command 'trian'; did you mean 'train' or 'trainjob'?"),
        (["evalute", "--out", "x"], "did you mean 'evaluate'?"),
        (["train", "--config", "tiny", "--steps", "5"], "unknown option --steps; config keys are written key=value: "
                                                        "steps=5"),
        (["toy", "--alpha-rew=0"], "config keys are written key=value: alpha_rew=0"),
    ],
)  # fmt: skip
def test_typos_get_one_line_with_the_fix_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_every_option_of_every_command_has_help_and_shows_a_default_that_says_something():
    stack, seen = [("distar", build_parser())], 0
    while stack:
        name, parser = stack.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack.extend((f"{name} {sub}", p) for sub, p in action.choices.items())
            elif action.dest != "help":
                assert action.help, f"{name} {action.option_strings or action.dest}"
                seen += 1
    assert seen > 100
    plan = build_parser(["plan"])._subparsers._group_actions[0].choices["plan"].format_help()
    assert "(default: 8)" in plan and "(default: None)" not in plan and "(default: False)" not in plan


def test_config_show_gives_each_key_its_value_and_source(capsys):
    from distar.train.config import load_config

    assert main(["config", "show", "--config", "tiny", "--json", "steps=7", "loss.alpha_rew=10"]) == 0
    rows = {r["key"]: r for r in json.loads(capsys.readouterr().out)}
    config = load_config("tiny", ["steps=7", "loss.alpha_rew=10"])
    assert rows["steps"] == {"key": "steps", "value": 7, "from": "override"}
    assert (
        rows["loss.alpha_rew"]["value"] == config.loss.alpha_rew == 10 and rows["loss.alpha_rew"]["from"] == "override"
    )
    assert rows["model.reference"] == {"key": "model.reference", "value": "tiny:sdxl", "from": "preset tiny"}
    assert rows["model.t_star"]["from"] == "default" and rows["model.t_star"]["value"] == config.model.t_star
    assert main(["config", "show", "--config", "tiny", "stepz=3"]) == 2
    assert "did you mean 'steps'" in capsys.readouterr().err
