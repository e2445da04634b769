"""Kubeflow components: one per step, each only argument plumbing and one call into distar.

Two images, set when compiling (a digest pins them: DISTAR_IMAGE=registry/distar@sha256:…):
- IMAGE (containers/Dockerfile, CUDA torch): evaluation, training on the step's own machine, and the TrainJob's pods;
- CPU_IMAGE (containers/Dockerfile.cpu, CPU torch, a fraction of the size): curation, the model cache, export and
  the step that launches and follows a TrainJob.
"""

import os

IMAGE = os.environ.get("DISTAR_IMAGE") or "ghcr.io/distar-project/distar:0.1.0"
CPU_IMAGE = os.environ.get("DISTAR_CPU_IMAGE") or "ghcr.io/distar-project/distar-cpu:0.1.0"
