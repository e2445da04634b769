"""Process-group set-up for one process per device, under torchrun or alone.

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; on Kubernetes, Kubeflow Trainer's
torch-distributed runtime sets PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT,
which torchrun reads as the defaults of its flags. A process started without torchrun is a world of one
(a process group on an in-memory store), so the same code path — FSDP2, DCP — runs everywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from distar.errors import UserError


@dataclass
class World:
    rank: int
    local_rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def all_finite(self, *values: torch.Tensor) -> torch.Tensor:
        """A 0-dim bool tensor on the device: every element of `values` is finite, on every rank. Nothing is read
        on the host (the all-reduce is queued behind the computation)."""
        ok = torch.stack([torch.isfinite(v.detach().float()).all() for v in values]).all().float()
        if dist.is_initialized() and self.size > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return ok.bool()

    def gather(self, value) -> list:
        """Every rank's `value` (a picklable object), in rank order, on every rank; [value] without a group."""
        if not dist.is_initialized() or self.size == 1:
            return [value]
        out = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def check_on_main(self, check, errors: tuple[type[BaseException], ...] = (UserError,)) -> None:
        """Run `check` on rank 0 only (a look at shared storage); the error of `errors` it raises is raised, with
        its type and message, on every rank, so that all stop alike and rank 0 says why."""
        failure = None
        if self.is_main:
            try:
                check()
            except errors as err:
                failure = (type(err), str(err))
        failure = self.gather(failure)[0]
        if failure is not None:
            raise failure[0](failure[1])

    def any_true(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any rank (False without a process group and flag False)."""
        if not dist.is_initialized() or self.size == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() == 1.0)

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean over ranks of each value (one all-reduce for all of them)."""
        if not values:
            return {}
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: v / self.size for k, v in zip(keys, t.tolist(), strict=True)}


def init(device: str = "auto", backend: str = "auto", timeout_s: int = 1800) -> World:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("parallel.device='cuda' but no CUDA device is visible; set parallel.device=cpu")
    if backend == "auto":
        backend = "nccl" if device == "cuda" else "gloo"
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    size = int(os.environ.get("WORLD_SIZE", 1))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(
                backend,
                store=_store(rank, size, timeout),
                rank=rank,
                world_size=size,
                timeout=timeout,
                device_id=dev if device == "cuda" else None,
            )
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return World(rank=rank, local_rank=local_rank, size=size, device=dev)


def _store(rank: int, size: int, timeout: timedelta) -> dist.Store:
    """The rendezvous store, its keys namespaced by torchrun's restart count.

    After a worker dies and torchrun restarts the group, keys of the previous attempt (the dead worker's gloo
    address among them) can still be in the agent's store; a survivor that reads one fails to connect. A prefix
    per attempt makes every attempt start from an empty namespace.
    """
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        size,
        is_master=not agent_store and rank == 0,
        timeout=timeout,
        multi_tenant=True,
    )
    return dist.PrefixStore(f"distar/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
