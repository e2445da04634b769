"""k8s/: each overlay renders with kustomize, every object validates strictly against the Kubernetes schema, the
RoleBinding binds the identity runs execute as, and the secrets are the ones the pipeline names, as templates.
(That the Role grants exactly the launcher's calls: tests/integration/test_trainjob_launcher.py.)"""

import os
from pathlib import Path

import pytest
import yaml
from helpers.k8s import OVERLAYS, rendered

from distar.train.trainjob import HUB_SECRET_KEYS, STORAGE_SECRET_KEYS

ROOT = Path(__file__).resolve().parents[2]
# Who runs a pipeline's steps (KFP's own defaults): standalone KFP in `kubeflow` as pipeline-runner; multi-user
# Kubeflow in the profile's namespace as default-editor.
RUNS_AS = {"standalone": ("kubeflow", "pipeline-runner"), "multi-user": ("kubeflow-user-example-com", "default-editor")}


def _defaults() -> dict:
    spec = next(yaml.safe_load_all((ROOT / "pipelines" / "distar_sdxl.yaml").read_text()))
    return {k: v.get("defaultValue") for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay):
    import kubernetes_validate

    docs = rendered(overlay)
    namespace, runner = RUNS_AS[overlay]
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30", strict=True)
        assert doc["metadata"]["namespace"] == namespace
    binding = next(d for d in docs if d["kind"] == "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": runner, "namespace": namespace}]
    assert binding["roleRef"]["name"] in {d["metadata"]["name"] for d in docs if d["kind"] == "Role"}
    root = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "kfp-launcher")
    assert root["data"]["defaultPipelineRoot"].split("://")[0] in ("gs", "s3")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_secrets_and_identity_are_the_ones_the_pipeline_names(overlay):
    docs = rendered(overlay)
    defaults = _defaults()
    secrets = {d["metadata"]["name"]: d["stringData"] for d in docs if d["kind"] == "Secret"}
    assert set(secrets) == {defaults["storage_secret"], defaults["hub_secret"]}
    assert set(secrets[defaults["storage_secret"]]) == set(STORAGE_SECRET_KEYS)
    assert set(secrets[defaults["hub_secret"]]) == set(HUB_SECRET_KEYS)
    assert all(v == "" for s in secrets.values() for v in s.values())  # templates: no key is ever committed
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    assert defaults["trainer_service_account"] in accounts


def test_role_has_no_wildcards_and_writes_only_trainjobs():
    role = next(d for d in rendered("standalone") if d["kind"] == "Role")
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]
        if rule["resources"] != ["trainjobs"]:
            assert not set(rule["verbs"]) & {"create", "delete", "update", "patch"}


def _with_component(tmp_path, component: str) -> list[dict]:
    """The standalone install with one storage component, rendered as kustomize renders it."""
    import subprocess

    from helpers.k8s import kubectl

    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": "kubeflow",
                # kustomize takes only relative paths to other kustomizations
                "resources": [os.path.relpath(ROOT / "k8s/base", tmp_path)],
                "components": [os.path.relpath(ROOT / "k8s/components" / component, tmp_path)],
            }
        )
    )
    out = subprocess.run(
        [kubectl(), "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(tmp_path)],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.mark.parametrize("component", ["s3", "s3-irsa", "gcs"])
def test_each_storage_component_gives_kfps_launcher_credentials_it_can_use(tmp_path, component):
    import kubernetes_validate

    docs = _with_component(tmp_path, component)
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30", strict=True)
    launcher = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "kfp-launcher")
    assert launcher["data"]["defaultPipelineRoot"].startswith("gs://" if component == "gcs" else "s3://")
    account = next(d for d in docs if d["kind"] == "ServiceAccount")
    if component == "gcs":
        assert "providers" not in launcher["data"]  # Workload Identity: the client library's own chain
        assert "iam.gke.io/gcp-service-account" in account["metadata"]["annotations"]
        return
    credentials = yaml.safe_load(launcher["data"]["providers"])["s3"]["default"]["credentials"]
    if component == "s3-irsa":
        # blank keys with fromEnv false would make KFP's launcher sign every request with empty keys
        assert credentials == {"fromEnv": True}
        assert "eks.amazonaws.com/role-arn" in account["metadata"]["annotations"]
    else:
        assert credentials["fromEnv"] is False
        ref = credentials["secretRef"]
        assert ref["secretName"] == _defaults()["storage_secret"]
        assert {ref["accessKeyKey"], ref["secretKeyKey"]} <= set(STORAGE_SECRET_KEYS)
