"""k8s/: each overlay renders with kustomize, every object validates strictly against the Kubernetes schema, the
RoleBinding binds the identity runs execute as, and the secrets are the ones the pipeline names, as templates.
(That the Role grants exactly the launcher's calls: tests/integration/test_trainjob_launcher.py.)"""

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
