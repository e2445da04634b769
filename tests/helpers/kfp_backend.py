"""Which KFP backend reads each field of a compiled pipeline: the driver of a backend older than a field's first
version ignores it (the platform spec is parsed with unknown fields allowed: backend/src/common/util/json.go) and
builds a different pod than the spec says. Read in kubeflow/pipelines at each tag:
backend/src/v2/driver/driver.go (initPodSpecPatch, extendPodSpecPatch) and
kubernetes_platform/proto/kubernetes_executor_config.proto.

`too_new(spec_docs, minimum)` lists every field the compiled YAML uses that a backend at `minimum` does not read,
and every field this table does not know (add it, with the first backend that reads it, after reading the source).
`empty_secret_names(spec_docs, arguments)` lists the secrets whose name a run would resolve to "": the driver then
fails every step that mounts them (driver.go: a secretKeyRef needs a name).
"""

from __future__ import annotations

# kubernetes platform spec (the second YAML document), per executor: field path → first backend that reads it
PLATFORM = {
    "secretAsEnv/keyToEnv": (2, 0),
    "secretAsEnv/secretNameParameter": (2, 5),  # proto field 4 from 2.5.0; 2.4 builds a secretKeyRef with no name
    "secretAsEnv/secretName": (2, 0),
    "secretAsEnv/optional": (2, 15),  # proto field 3 from 2.15.0 (k8s.go: secretKeySelector.Optional)
    "nodeSelector/nodeSelectorJson": (2, 5),
    "nodeSelector/labels": (2, 0),
    "tolerations/tolerationJson": (2, 5),
    "tolerations/key": (2, 0),
    "tolerations/operator": (2, 0),
    "tolerations/value": (2, 0),
    "tolerations/effect": (2, 0),
    "emptyDirMounts/volumeName": (2, 4),
    "emptyDirMounts/mountPath": (2, 4),
    "emptyDirMounts/medium": (2, 4),
    "emptyDirMounts/sizeLimit": (2, 4),
}
# pipeline spec (the first document), deploymentSpec.executors.*.container.resources
RESOURCES = {
    "resourceCpuRequest": (2, 4),  # driver.go getPodResource(GetResourceCpuRequest(), …) in 2.4.0
    "cpuRequest": (2, 4),  # the constant form: getPodResource's fallback (GetCpuRequest()), read in 2.4.0 and 2.5.0
    "memoryRequest": (2, 4),
    "resourceCpuLimit": (2, 4),
    "resourceMemoryRequest": (2, 4),
    "resourceMemoryLimit": (2, 4),
    "accelerator/resourceType": (2, 4),
    "accelerator/resourceCount": (2, 4),
    "accelerator/type": (2, 0),
    "accelerator/count": (2, 0),
}
# pipeline spec (the first document), any component's inputDefinitions: a list input fed by a ParallelFor's outputs
# (dsl.Collected) is resolved by the driver from kubeflow/pipelines#11725 on, first released in 2.14.0; older drivers
# fail the consuming task
INPUTS = {"isArtifactList": (2, 14), "isList": (2, 14)}
# a field whose default value every backend gets anyway: older drivers drop it, and drop nothing that matters
DEFAULT_VALUES = {"secretAsEnv/optional": False}


def _paths(value, prefix: str = ""):
    """(top/child, value) pairs of a platform executor config: lists of objects are looked into."""
    if isinstance(value, list):
        for item in value:
            yield from _paths(item, prefix)
    elif isinstance(value, dict) and prefix.count("/") < 1:
        for key, sub in value.items():
            path = f"{prefix}/{key}" if prefix else key
            if isinstance(sub, (dict, list)) and prefix == "":
                yield from _paths(sub, path)
            else:
                yield path, sub
    else:
        yield prefix, value


def used_fields(docs: list[dict]) -> list[tuple[str, str, object, dict]]:
    """(executor, field path, value, table) for every field the compiled pipeline sets that the driver reads."""
    out = []
    pipeline = docs[0]
    for name, executor in pipeline["deploymentSpec"]["executors"].items():
        for key, value in executor.get("container", {}).get("resources", {}).items():
            if isinstance(value, dict):
                out += [(name, f"{key}/{k}", v, RESOURCES) for k, v in value.items()]
            else:
                out.append((name, key, value, RESOURCES))
    for doc in docs[1:]:
        executors = doc.get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {}).get("executors", {})
        for name, config in executors.items():
            out += [(name, path, value, PLATFORM) for path, value in _paths(config)]
    return out


def _list_inputs(pipeline: dict) -> list[tuple[str, str, object, dict]]:
    out = []
    for name, component in pipeline.get("components", {}).items():
        definitions = component.get("inputDefinitions", {})
        for kind in ("artifacts", "parameters"):
            for _, spec in definitions.get(kind, {}).items():
                out += [(name, key, True, INPUTS) for key in INPUTS if spec.get(key)]
    return out


def empty_secret_names(docs: list[dict], arguments: dict | None = None) -> list[str]:
    """Secrets whose name, as a run resolves it (the argument, else the pipeline parameter's default), is empty."""
    parameters = docs[0].get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    out = []
    for doc in docs[1:]:
        executors = doc.get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {}).get("executors", {})
        for name, config in executors.items():
            for secret in config.get("secretAsEnv", []):
                if "secretName" in secret:
                    value = secret["secretName"]
                else:
                    param = secret.get("secretNameParameter", {}).get("componentInputParameter", "")
                    param = param.removeprefix("pipelinechannel--")  # inside a ParallelFor: the root's parameter
                    value = (arguments or {}).get(param, parameters.get(param, {}).get("defaultValue", ""))
                if not value:
                    out.append(f"{name}: a secret named {value!r}")
    return out


def too_new(docs: list[dict], minimum: tuple[int, int]) -> list[str]:
    problems = []
    for executor, path, value, table in used_fields(docs) + _list_inputs(docs[0]):
        if path not in table:
            problems.append(f"{executor}: {path} is not in the backend table (tests/helpers/kfp_backend.py)")
            continue
        if path in DEFAULT_VALUES and value == DEFAULT_VALUES[path]:
            continue
        if table[path] > minimum:
            need = ".".join(map(str, table[path]))
            problems.append(f"{executor}: {path}={value!r} needs a KFP backend >= {need}")
    return problems
