"""Submitting the compiled pipeline to a Kubeflow Pipelines server (kfp.Client), with pipeline root, service
account, experiment and caching. `kfp --endpoint $KFP_HOST run create -e EXPERIMENT -f pipelines/distar_sdxl.yaml
k=v …` submits the same package, but kfp's CLI sets neither the pipeline root nor the service account (its `-r` is the
run's name).

Multi-user Kubeflow behind its auth proxy wants credentials from outside the cluster: a bearer token (--token, or
the KF_PIPELINES_TOKEN environment variable; e.g. `kubectl create token default-editor -n PROFILE` where the proxy
accepts service-account tokens) or the session cookie of a logged-in browser (--cookies "authservice_session=…").

Checked here, before the server sees it: the pipeline root and the persistent roots (cache_root, runs_root) are
gs:// or s3:// URIs (a run without a root gets minio://…, which no step can open), the secret names are not empty
(KFP's driver fails every step that mounts a secret without a name), and every required argument is given."""

from __future__ import annotations

import json
from pathlib import Path

from distar import storage
from distar.errors import UserError


def parse_arguments(pairs: list[str]) -> dict:
    """key=value pairs; a value that parses as JSON (numbers, lists, booleans) is passed as that value."""
    arguments = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"pipeline argument {pair!r} is not key=value")
        try:
            arguments[key] = json.loads(value)
        except json.JSONDecodeError:
            arguments[key] = value
    return arguments


_TYPES = {
    "NUMBER_INTEGER": (lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number"),
    "NUMBER_DOUBLE": (lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number"),
    "BOOLEAN": (lambda v: isinstance(v, bool), "true or false"),
    "STRING": (lambda v: isinstance(v, str), "a string"),
    "LIST": (lambda v: isinstance(v, list), "a JSON list"),
    "STRUCT": (lambda v: isinstance(v, dict), "a JSON object"),
}
# Arguments that become Kubernetes names (of a secret, a service account, a Kueue queue, a runtime): DNS-1123 labels
# (subdomains for secrets), as the API server takes them; empty where the pipeline allows none.
_K8S_NAMES = ("storage_secret", "hub_secret", "queue", "trainer_runtime", "trainer_service_account")


def check_types(arguments: dict, parameters: dict) -> None:
    """Each argument has its parameter's type, and each Kubernetes name is one: KFP would take a string for an
    integer and fail the step that reads it, the API server a name only when the TrainJob is created."""
    import re

    for key, value in arguments.items():
        kind = parameters[key].get("parameterType", "STRING")
        ok, what = _TYPES.get(kind, (lambda v: True, ""))
        if not ok(value):
            raise UserError(f"pipeline argument {key}={json.dumps(value)[:80]}: it must be {what}")
        if (
            key in _K8S_NAMES
            and value
            and (len(value) > 253 or not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", value))
        ):
            raise UserError(
                f"pipeline argument {key}={value[:80]!r}: a Kubernetes name takes lower-case letters, digits, '-' and "
                "'.', at most 253 characters"
            )


ROOT_ARGUMENTS = ("cache_root", "runs_root")
SECRET_ARGUMENTS = ("storage_secret", "hub_secret")
TOKEN_ENV = "KF_PIPELINES_TOKEN"


def submit(
    host: str,
    package: str | Path,
    arguments: dict,
    experiment: str = "distar",
    run_name: str | None = None,
    pipeline_root: str | None = None,
    enable_caching: bool | None = None,
    namespace: str | None = None,
    service_account: str | None = None,
    token: str | None = None,
    cookies: str | None = None,
) -> dict:
    import os

    import kfp
    import yaml

    package = Path(package)
    if not package.is_file():
        raise UserError(
            f"pipeline package {str(package)!r} does not exist; compile it: python pipelines/distar_sdxl.py"
        )
    spec = next(yaml.safe_load_all(package.read_text()))
    parameters = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    unknown = sorted(set(arguments) - set(parameters))
    if unknown:
        raise UserError(f"unknown pipeline argument(s) {unknown}; the pipeline takes: {', '.join(sorted(parameters))}")
    missing = sorted(k for k, p in parameters.items() if "defaultValue" not in p and not p.get("isOptional"))
    missing = [k for k in missing if k not in arguments]
    if missing:
        raise UserError(f"the pipeline needs {', '.join(f'{k}=…' for k in missing)} (docs/CLUSTER.md, 'Roots')")
    check_types(arguments, parameters)
    if pipeline_root is not None:
        storage.check_shared("--pipeline-root", pipeline_root)
    for key in ROOT_ARGUMENTS:
        if key in arguments:
            storage.check_shared(key, arguments[key])
    for key in SECRET_ARGUMENTS:
        if key in arguments and not str(arguments[key]).strip():
            raise UserError(
                f"{key}='': KFP's driver fails every step that mounts a secret with no name; leave {key} at its "
                f"default (the secret k8s/ creates, blank keys allowed) or name another secret"
            )
    token = token or os.environ.get(TOKEN_ENV) or None
    try:
        client = kfp.Client(host=host, namespace=namespace, existing_token=token, cookies=cookies)
        result = client.create_run_from_pipeline_package(
            str(package),
            arguments=arguments,
            run_name=run_name,
            experiment_name=experiment,
            pipeline_root=pipeline_root,
            enable_caching=enable_caching,
            namespace=namespace,
            service_account=service_account,
        )
    except Exception as err:  # the REST client raises many types; each means the server refused or was unreachable
        raise UserError(f"could not submit to {host!r}: {err}") from err
    return {"run_id": result.run_id, "run_url": f"{host.rstrip('/')}/#/runs/details/{result.run_id}"}
