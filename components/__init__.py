"""Kubeflow components: one per step, each only argument plumbing and one call into distar.

The image is the project's container (containers/Dockerfile); set DISTAR_IMAGE when compiling to use another.
"""

import os

IMAGE = os.environ.get("DISTAR_IMAGE") or "ghcr.io/distar-project/distar:0.1.0"
