"""components/catalog/: every component compiled as Kubeflow users load it, kept fresh, with a metadata.yaml in the
kubeflow/pipelines-components schema whose version floors are the ones docs/CLUSTER.md states and the tests check."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

from components.compile import CATALOG, COMPONENTS, compile_component

ROOT = Path(__file__).resolve().parents[2]


def test_every_component_is_in_the_catalog_and_nothing_else_is():
    assert sorted(p.name for p in CATALOG.iterdir() if p.is_dir()) == sorted(COMPONENTS)


@pytest.mark.parametrize("name", sorted(COMPONENTS))
def test_the_compiled_component_is_fresh_and_loads(name, tmp_path):
    from kfp import components

    committed = CATALOG / name / "component.yaml"
    fresh = compile_component(name, tmp_path / "component.yaml")
    assert committed.read_text() == fresh.read_text(), f"stale: run python components/compile.py ({name})"
    loaded = components.load_component_from_file(str(committed))
    assert set(loaded.component_spec.inputs or {}) == set(COMPONENTS[name].component_spec.inputs or {})


@pytest.mark.parametrize("name", sorted(COMPONENTS))
def test_metadata_follows_the_schema_and_states_the_tested_floors(name):
    meta = yaml.safe_load((CATALOG / name / "metadata.yaml").read_text())
    assert meta["name"] == name and meta["tier"] in ("core", "third_party")
    assert meta["stability"] in ("alpha", "beta", "stable")
    verified = dt.datetime.fromisoformat(meta["lastVerified"].replace("Z", "+00:00"))  # RFC 3339
    assert verified <= dt.datetime.now(dt.UTC)
    kubeflow = {d["name"]: SpecifierSet(d["version"]) for d in meta["dependencies"]["kubeflow"]}
    # the floors of docs/CLUSTER.md: KFP 2.5, 2.14 where a list of a ParallelFor's outputs comes in; Trainer 2.3.0
    needs_collected = any(
        spec.get("isArtifactList") or spec.get("isList")
        for kind in ("artifacts", "parameters")
        for spec in (yaml.safe_load((CATALOG / name / "component.yaml").read_text())["root"]["inputDefinitions"])
        .get(kind, {})
        .values()
    )
    floor = "2.14" if needs_collected else "2.5"
    assert kubeflow["Pipelines"] == SpecifierSet(f">={floor}")
    assert ("Trainer" in kubeflow) == (name == "train-trainjob")
    if "Trainer" in kubeflow:
        assert "2.3.0" in kubeflow["Trainer"] and "2.2.1" not in kubeflow["Trainer"]
    assert all(isinstance(t, str) and t for t in meta.get("tags", []))
    assert (ROOT / meta["links"]["source"]).is_file() and (ROOT / meta["links"]["documentation"]).is_file()
