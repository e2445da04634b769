"""Every torchrun command distar builds, parsed by the installed torch's own torchrun parser (the torch that locks/
pin for the images): a flag that torch lacks fails here, not in a training pod that exits at once."""

from __future__ import annotations

import itertools

import pytest
from torch.distributed.run import get_args_parser

from distar.train.command import SHUTDOWN_TIMEOUT_S, torchrun_command
from distar.train.trainjob import TrainJobSpec, manifest

OVERRIDES = ["out=s3://bucket/run", "steps=10", "--allow-config-change"]


def _parse(cmd: list[str], program_words: int):
    return get_args_parser().parse_args(cmd[program_words:])


@pytest.mark.parametrize(
    "nproc, restarts, standalone", list(itertools.product([None, 1, 8], [None, 0, 3], [False, True]))
)
def test_every_launcher_option_parses(nproc, restarts, standalone):
    cmd = torchrun_command("sdxl", OVERRIDES, nproc, restarts, standalone=standalone)
    assert cmd[1:3] == ["-m", "distar.train.torchrun"]  # torchrun with exit 75 for a preempted run
    args = _parse(cmd, 3)
    assert args.shutdown_timeout == SHUTDOWN_TIMEOUT_S
    assert args.standalone is standalone
    assert args.module and args.training_script == "distar.train"
    assert args.training_script_args == ["--config", "sdxl", *OVERRIDES]
    if nproc is not None:
        assert args.nproc_per_node == str(nproc)
    if restarts is not None:
        assert args.max_restarts == restarts


def test_the_trainjob_command_parses_with_the_runtimes_variables(monkeypatch):
    # the torch-distributed runtime sets the nodes through PET_*; torchrun reads them as its defaults
    env = {"PET_NNODES": "4", "PET_NPROC_PER_NODE": "8", "PET_NODE_RANK": "2"}
    env |= {"PET_MASTER_ADDR": "job-node-0-0.job", "PET_MASTER_PORT": "29400"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    spec = TrainJobSpec(name="distar-x", namespace="ns", image="img", overrides=OVERRIDES, max_restarts=3)
    cmd = manifest(spec)["spec"]["trainer"]["command"]
    assert cmd[0] == "torchrun"
    args = _parse(cmd, 1)
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("4", "8", 2)
    assert (args.master_addr, args.master_port) == ("job-node-0-0.job", 29400)
    assert args.shutdown_timeout == SHUTDOWN_TIMEOUT_S and args.max_restarts == 3
    assert args.training_script_args == ["--config", "sdxl", *OVERRIDES]


def test_a_flag_the_parser_lacks_is_refused():
    # the check above is only worth something if the parser refuses what it does not know (torch < 2.13 and
    # --shutdown-timeout: exit 2)
    with pytest.raises(SystemExit) as err:
        get_args_parser().parse_args(["--no-such-flag", "1", "-m", "distar.train"])
    assert err.value.code == 2
