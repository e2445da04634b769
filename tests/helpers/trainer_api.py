"""What Kubeflow Trainer enforces on a TrainJob at admission, from its own files (tests/data/kubeflow-trainer-*: the
supported releases, v2.3.0 and the main branch, and v2.2.1 below the floor):

1. the TrainJob CRD's openAPIV3Schema, structural: unknown fields are rejected (strict field validation), types,
   enums, patterns and required fields checked (jsonschema);
2. the CRD's x-kubernetes-validations, CEL rules on create (transition rules with oldSelf need an old object and
   are skipped), evaluated with cel-python;
3. the admission webhook's rules (README there, from jobset.go and torch.go): domain-prefixed runtime patch
   managers, patches naming only the runtime's replicated jobs and containers, no env on the node container in a
   patch, no torchrun-reserved PET_* names in spec.trainer.env.

`problems(job, release)` lists every violation; an empty list means a cluster of that release admits the job.
"""

from __future__ import annotations

import copy
import re
from functools import cache
from pathlib import Path

import yaml

DATA = Path(__file__).resolve().parents[1] / "data"
SUPPORTED = ("v2.3.0", "master")
BELOW_FLOOR = "v2.2.1"
RESERVED_ENV = {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}
WEBHOOK_NO_ENV_CONTAINERS = {"node", "dataset-initializer", "model-initializer"}
# k8s.io/apimachinery IsDomainPrefixedPath: a DNS-1123 subdomain, "/", then a non-empty path
_DOMAIN_PREFIXED = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/\S+$")


@cache
def _crd_schema(release: str = "v2.3.0") -> dict:
    crd = yaml.safe_load((DATA / f"kubeflow-trainer-{release}" / "trainer.kubeflow.org_trainjobs.yaml").read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@cache
def runtime(release: str = "v2.3.0") -> dict:
    """The torch-distributed ClusterTrainingRuntime as that release installs it."""
    return yaml.safe_load((DATA / f"kubeflow-trainer-{release}" / "torch_distributed.yaml").read_text())


@cache
def runtime_names(release: str = "v2.3.0") -> tuple[set[str], set[str]]:
    """(replicated job names, container names) of the torch-distributed runtime."""
    runtime_ = runtime(release)
    jobs = runtime_["spec"]["template"]["spec"]["replicatedJobs"]
    containers = {c["name"] for j in jobs for c in j["template"]["spec"]["template"]["spec"].get("containers", [])}
    return {j["name"] for j in jobs}, containers


def _json_schema(node: dict) -> dict:
    """The OpenAPI v3 structural schema as JSON Schema, closed where the API server prunes or rejects unknowns."""
    node = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-validations")}
    if node.get("x-kubernetes-int-or-string"):
        node = {k: v for k, v in node.items() if k != "type"}
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in node:
        node["properties"] = {k: _json_schema(v) for k, v in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in node:
            node["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = _json_schema(node["additionalProperties"])
    if isinstance(node.get("items"), dict):
        node["items"] = _json_schema(node["items"])
    return node


def _schema_problems(job: dict, release: str) -> list[str]:
    import jsonschema

    schema = _json_schema(copy.deepcopy(_crd_schema(release)))
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta is the API server's own, not the CRD's
    validator = jsonschema.Draft7Validator(schema)
    return [f"schema: {'/'.join(map(str, e.absolute_path)) or '.'}: {e.message}" for e in validator.iter_errors(job)]


def _cel_problems(schema: dict, value, where: str) -> list[str]:
    import celpy

    out = []
    for rule in schema.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"]:
            continue  # a transition rule: applies to updates only
        env = celpy.Environment()
        try:
            ok = env.program(env.compile(rule["rule"])).evaluate({"self": celpy.json_to_cel(value)})
        except Exception as err:  # a rule that cannot evaluate on this value fails admission too
            ok = err
        if ok is not True and not (isinstance(ok, celpy.celtypes.BoolType) and bool(ok)):
            out.append(f"CEL at {where or '.'}: {rule.get('message', rule['rule'])}")
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                out += _cel_problems(sub, value[key], f"{where}/{key}")
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key, item in value.items():
                out += _cel_problems(extra, item, f"{where}/{key}")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            out += _cel_problems(schema["items"], item, f"{where}/{i}")
    return out


def _webhook_problems(job: dict, release: str) -> list[str]:
    out = []
    spec = job.get("spec", {})
    jobs, containers = runtime_names(release)
    for patch in spec.get("runtimePatches", []):
        manager = patch.get("manager", "")
        if not _DOMAIN_PREFIXED.match(manager):
            out.append(f"webhook: runtimePatches[].manager {manager!r} is not a domain-prefixed path")
        template = patch.get("trainingRuntimeSpec", {}).get("template", {}).get("spec", {})
        for replicated in template.get("replicatedJobs", []):
            if replicated.get("name") not in jobs:
                out.append(f"webhook: runtime patch names replicated job {replicated.get('name')!r}, not in {jobs}")
            pod = replicated.get("template", {}).get("spec", {}).get("template", {}).get("spec", {})
            for container in pod.get("containers", []) + pod.get("initContainers", []):
                if container.get("name") not in containers | {"dataset-initializer", "model-initializer"}:
                    out.append(f"webhook: runtime patch names container {container.get('name')!r}, not in the runtime")
                if container.get("name") in WEBHOOK_NO_ENV_CONTAINERS and container.get("env"):
                    out.append(f"webhook: env on the {container['name']!r} container in a runtime patch "
                               f"(it belongs in spec.trainer.env)")  # fmt: skip
    for env in spec.get("trainer", {}).get("env", []):
        if env.get("name") in RESERVED_ENV:
            out.append(f"webhook: spec.trainer.env sets {env['name']}, which the torch plugin reserves")
    return out


def problems(job: dict, release: str = "v2.3.0") -> list[str]:
    """Every reason a Trainer cluster of `release` would refuse to create `job`."""
    return (
        _schema_problems(job, release) + _cel_problems(_crd_schema(release), job, "") + _webhook_problems(job, release)
    )
