"""torchx components for ad-hoc jobs, registered as `distar` (entry point group torchx.components).

  torchx run -s local_cwd distar.train --nproc_per_node 2 -- --config tiny out=runs/tiny
  torchx run -s kubernetes distar.train --nnodes 4 --nproc_per_node 8 --gpus_per_node 8 -- --config sdxl …
The job is torchrun -m distar.train (torchx's dist.torchrun), so it behaves exactly as the pipeline's train step.
No `from __future__ import annotations` here: torchx reads the parameter types at run time.
"""

import torchx.specs as specs
from torchx.components import dist

IMAGE = "ghcr.io/distar-project/distar:0.1.0"


def train(
    *script_args: str,
    nnodes: int = 1,
    nproc_per_node: int = 1,
    gpus_per_node: int = 0,
    cpu: int = 8,
    mem_mb: int = 65536,
    image: str = IMAGE,
    max_retries: int = 0,
    env: dict[str, str] | None = None,
) -> specs.AppDef:
    """DI* training with torchrun.

    Args:
        script_args: arguments of distar.train, e.g. --config sdxl data.prompts=gs://… out=gs://…
        nnodes: nodes
        nproc_per_node: processes per node (one per GPU)
        gpus_per_node: GPUs requested per node
        cpu: CPUs requested per node
        mem_mb: memory requested per node, in MiB
        image: the container image (containers/Dockerfile)
        max_retries: job restarts; each resumes from the newest complete checkpoint
        env: extra environment variables
    """
    return dist.torchrun(
        *script_args,
        m="distar.train",
        image=image,
        name="distar-train",
        cpu=cpu,
        gpu=gpus_per_node,
        memMB=mem_mb,
        j=f"{nnodes}x{nproc_per_node}",
        env=env,
        max_retries=max_retries,
    )
