"""The compiled pipelines against the KFP backends they say they support (docs/CLUSTER.md: >= 2.5 for distar_sdxl,
>= 2.14 for the ablation's fan-in): every field each uses is read by its floor's driver, no secret resolves to an
empty name, and the check catches what the previous pipelines used."""

import sys
from pathlib import Path

import pytest
import yaml
from helpers.kfp_backend import too_new

ROOT = Path(__file__).resolve().parents[2]
MINIMUM = (2, 5)
FLOORS = {"distar_sdxl": (2, 5), "distar_ablation": (2, 14)}


def _docs(path: Path) -> list[dict]:
    return list(yaml.safe_load_all(path.read_text()))


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_the_committed_pipelines_use_only_what_their_floor_reads(name):
    assert too_new(_docs(ROOT / "pipelines" / f"{name}.yaml"), FLOORS[name]) == []


def test_the_ablations_fan_in_needs_2_14_and_the_check_says_so():
    found = too_new(_docs(ROOT / "pipelines" / "distar_ablation.yaml"), MINIMUM)
    assert found and all("isArtifactList" in p and ">= 2.14" in p for p in found), found


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_no_secret_resolves_to_an_empty_name(name):
    from helpers.kfp_backend import empty_secret_names

    docs = _docs(ROOT / "pipelines" / f"{name}.yaml")
    assert empty_secret_names(docs) == []
    found = empty_secret_names(docs, {"storage_secret": ""})
    assert found and all("''" in p for p in found)


def test_the_ablation_puts_gpus_on_evaluations_only():
    docs = _docs(ROOT / "pipelines" / "distar_ablation.yaml")
    executors = docs[0]["deploymentSpec"]["executors"]
    with_gpu = {n for n, e in executors.items() if "accelerator" in e["container"].get("resources", {})}
    assert with_gpu == {"exec-evaluate", "exec-baseline", "exec-baseline-2"}
    assert all("resourceCpuRequest" in e["container"]["resources"] for e in executors.values())


def test_the_local_launcher_variant_too(tmp_path):
    sys.path.insert(0, str(ROOT / "pipelines"))
    import distar_sdxl

    path = distar_sdxl.compile_pipeline(tmp_path / "local.yaml", launcher="local")
    docs = _docs(path)
    assert too_new(docs, MINIMUM) == []
    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    # GPU scheduling on GPU work only: training (here on the step's machine) and evaluation
    assert {n for n, c in executors.items() if "nodeSelector" in c} == {"exec-train", "exec-evaluate"}


def test_gpu_settings_stay_off_the_cpu_steps_of_the_trainjob_pipeline():
    docs = _docs(ROOT / "pipelines" / "distar_sdxl.yaml")
    executors = docs[0]["deploymentSpec"]["executors"]
    with_gpu = {n for n, e in executors.items() if "accelerator" in e["container"].get("resources", {})}
    assert with_gpu == {"exec-evaluate"}
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert {n for n, c in platform.items() if "tolerations" in c or "nodeSelector" in c} == {"exec-evaluate"}
    for name, executor in executors.items():
        resources = executor["container"]["resources"]
        assert {"resourceCpuRequest", "resourceMemoryRequest"} <= set(resources), name
        gpu = name == "exec-evaluate"
        assert executor["container"]["image"].endswith("distar:0.1.0" if gpu else "distar-cpu:0.1.0"), name


def test_an_optional_secret_or_an_unknown_field_is_caught(tmp_path):
    from kfp import compiler, dsl, kubernetes

    @dsl.component(base_image="python:3.11")
    def step():
        pass

    @dsl.pipeline(name="old")
    def old(secret: str = "distar-storage"):
        task = step()
        kubernetes.use_secret_as_env(task, secret_name=secret, optional=True, secret_key_to_env={"K": "K"})
        kubernetes.set_image_pull_policy(task, "Always")

    path = tmp_path / "old.yaml"
    compiler.Compiler().compile(old, str(path))
    found = too_new(_docs(path), MINIMUM)
    assert any("secretAsEnv/optional=True needs a KFP backend >= 2.15" in p for p in found), found
    assert any("imagePullPolicy is not in the backend table" in p for p in found), found
    assert too_new(_docs(path), (2, 15)) == [p for p in found if "not in the backend table" in p]


@pytest.mark.parametrize("minimum", [(2, 4)])
def test_a_2_4_backend_is_not_supported_and_the_check_says_why(minimum):
    found = too_new(_docs(ROOT / "pipelines" / "distar_sdxl.yaml"), minimum)
    assert any("secretNameParameter" in p and ">= 2.5" in p for p in found)
    assert any("nodeSelectorJson" in p for p in found)


def test_components_default_to_the_evaluation_protocol():
    """A component ships its own source, so its defaults are literals: they must say what the protocol says."""
    import inspect

    sys.path.insert(0, str(ROOT))
    from components.baseline import baseline
    from components.evaluate import evaluate
    from distar.evaluate import protocol

    for component in (evaluate, baseline):
        defaults = {k: p.default for k, p in inspect.signature(component.python_func).parameters.items()}
        assert defaults["rewards"] == protocol.METRICS
        assert defaults["prompts"] == protocol.PARTI_IN_CACHE
        assert defaults["hps_prompts"] == protocol.HPS_IN_CACHE
