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


def _complete(script: str, *words: str) -> list[str]:
    """What bash offers for the last of `words` (the word under the cursor), with the generated script loaded."""
    line = " ".join(f"'{w}'" for w in words)
    program = (
        f"{script}\nCOMP_WORDS=(distar {line}); COMP_CWORD={len(words)}; _distar; printf '%s\\n' \"${{COMPREPLY[@]}}\""
    )
    out = subprocess.run(["bash", "-c", program], capture_output=True, text=True, check=True).stdout
    return [w for w in out.splitlines() if w]


def test_bash_completion_offers_commands_options_and_config_keys(capsys):
    assert main(["completion"]) == 0
    script = capsys.readouterr().out
    assert sorted(_complete(script, "tr")) == ["train", "trainjob"]
    assert sorted(_complete(script, "train", "loss.alpha_")) == ["loss.alpha_cfg=", "loss.alpha_rew="]
    assert _complete(script, "-q", "evaluate", "--mod") == ["--model"]  # a global option before the command
    assert _complete(script, "config", "sh") == ["show"]
    assert _complete(script, "toy", "alpha") == ["alpha_rew="]
    assert _complete(script, "export", "--dt") == ["--dtype"]


def test_quiet_and_verbose_are_global_and_exclusive():
    run = [sys.executable, "-m", "distar.cli"]
    quiet = subprocess.run([*run, "-q", "completion"], capture_output=True, text=True)
    assert quiet.returncode == 0 and "complete -o default -F _distar distar" in quiet.stdout
    both = subprocess.run([*run, "-q", "-v", "completion"], capture_output=True, text=True)
    assert both.returncode == 2 and "not allowed with" in both.stderr


def test_the_local_pipeline_prints_a_line_per_step_and_keeps_the_rest_in_its_log(tmp_path, capfd):
    import os
    import time

    from distar.local_pipeline import StepLines

    log = tmp_path / "run-local.log"
    with StepLines(log):  # what kfp.local writes, colours included, and a step's own noise
        os.write(1, b"\x1b[32mExecuting task 'curate'\x1b[0m\n{\"executor_input\": 1}\n")
        time.sleep(0.5)
        os.write(2, b"Task 'curate' finished with status \x1b[92mSUCCESS\x1b[0m\n")
    terminal = capfd.readouterr().out
    assert "curate: running" in terminal and "curate: success" in terminal and "executor_input" not in terminal
    assert "executor_input" in log.read_text() and str(log) in terminal


@pytest.mark.parametrize(
    "preset, backbone, reference", [("tiny-sd3", "sd3", "tiny:sd3"), ("tiny-flux", "flux", "tiny:flux")]
)
def test_run_local_stands_the_tiny_flow_families_in_for_the_real_ids(preset, backbone, reference):
    """run-local's tiny flow presets: the cache step maps the real hub ids to the family's tiny sources, and the
    train step's overrides name those ids, so the pipeline runs as it would on a cluster."""
    from distar.errors import UserError
    from distar.local_pipeline import run_local, tiny_ablation_arguments, tiny_arguments
    from distar.train.config import load_config

    args = tiny_arguments(preset)
    config = load_config(args["preset"], ["data.prompts=x", *args["train_overrides"]])
    assert config.model.backbone == backbone
    cached = dict(item.split("=", 1) for item in args["cache_models"])
    assert cached[config.model.reference] == reference
    if config.model.generator_init != "reference":
        assert cached[config.model.generator_init] == f"{reference}-schnell"
    with pytest.raises(UserError, match="--preset 'tiny-sdxl': choose one of tiny, tiny-sd3, tiny-flux, sdxl"):
        run_local("tiny-sdxl", "unused")
    # the ablation grid on the family: its baselines are the family's start and reference, from the cache
    ablation = tiny_ablation_arguments(preset)
    assert ablation["preset"] == preset and ablation["reference"] == config.model.reference
    start = config.model.reference if config.model.generator_init == "reference" else config.model.generator_init
    assert ablation["initial"] == start and start in cached
