"""A stand-in Kubernetes API server on 127.0.0.1 for the TrainJob launcher: the REST paths the kubernetes client
calls for TrainJobs and pods, with what a real cluster enforces there.

- Admission: every created TrainJob goes through tests/helpers/trainer_api.problems (the v2.3.0 CRD schema, its
  CEL rules, Trainer's webhook rules); a refusal answers as the API server does (422 Invalid for schema and CEL,
  403 for a webhook denial), a name taken answers 409 AlreadyExists, a missing object 404.
- A controller: each job moves through a scripted list of states, one per GET of the job; from "Created" on its
  rank-0 pod exists (JobSet's and the Indexed Job's labels) and logs one scripted line per GET.
- Faults: scripted answers for the next matching requests (429, 503, a connection reset before or after the
  request took effect).
- Every request is recorded as (resource, verb), the way RBAC names it.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import socket
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from helpers.http import reply
from helpers.trainer_api import problems

JOBS = re.compile(r"^/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/([^/]+)/trainjobs(?:/([^/]+))?$")
PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods(?:/([^/]+))?(/log)?$")


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _status(code: int, reason: str, message: str) -> dict:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "code": code,
        "reason": reason,
        "message": message,
    }


class Cluster:
    def __init__(self, states: list[str] | None = None, logs: list[str] | None = None, trainer_status=None):
        self.states = states or ["Created", "Complete"]
        self.logs = logs or []
        self.trainer_status = trainer_status or {}
        """state index → status.trainerStatus to show from that GET on"""
        self.jobs: dict[tuple[str, str], dict] = {}
        self.gets: dict[tuple[str, str], int] = {}
        self.pods: dict[tuple[str, str], dict] = {}
        self.pod_logs: dict[tuple[str, str], list[str]] = {}
        self.faults: list[tuple[str, str, str]] = []
        """(method, path regex, action) answered in order: "403", "429", "503", "reset", "reset-after" """
        self.verbs: set[tuple[str, str]] = set()
        self.created: list[dict] = []
        self.deleted: list[str] = []
        self.lock = threading.Lock()

    def add_pod(self, ns: str, name: str, labels: dict | None = None) -> dict:
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}", "labels": labels or {}},
            "spec": {"containers": [{"name": "main", "image": "i"}]},
            "status": {"phase": "Running"},
        }
        self.pods[(ns, name)] = pod
        return pod

    def fault(self, method: str, path: str, action: str, times: int = 1) -> None:
        self.faults += [(method, path, action)] * times

    def advance(self, key: tuple[str, str]) -> None:
        """The controller's view after one more GET of the job."""
        n = self.gets.get(key, 0)
        self.gets[key] = n + 1
        job = self.jobs[key]
        state = self.states[min(n, len(self.states) - 1)]
        conditions = (
            []
            if state == "Pending"
            else [
                {
                    "type": state,
                    "status": "True",
                    "reason": f"{state}Reason",
                    "message": f"job {state.lower()}",
                    "lastTransitionTime": _now(),
                }
            ]
        )
        job["status"] = {"conditions": conditions}
        for index in sorted(i for i in self.trainer_status if i <= n):
            job["status"]["trainerStatus"] = self.trainer_status[index]
        if state != "Pending":
            ns, name = key
            pod = f"{name}-node-0-0-abcde"
            if (ns, pod) not in self.pods:
                self.add_pod(
                    ns,
                    pod,
                    {
                        "jobset.sigs.k8s.io/jobset-name": name,
                        "jobset.sigs.k8s.io/replicatedjob-name": "node",
                        "batch.kubernetes.io/job-completion-index": "0",
                    },
                )
                self.add_pod(
                    ns,
                    f"{name}-node-0-1-fghij",
                    {
                        "jobset.sigs.k8s.io/jobset-name": name,
                        "jobset.sigs.k8s.io/replicatedjob-name": "node",
                        "batch.kubernetes.io/job-completion-index": "1",
                    },
                )
            logged = self.pod_logs.setdefault((ns, pod), [])
            if len(logged) < len(self.logs):
                logged.append(f"{_now()} {self.logs[len(logged)]}")


class _Handler(BaseHTTPRequestHandler):
    cluster: Cluster

    def log_message(self, *args):
        pass

    def _send(self, code: int, body) -> None:
        reply(self, code, body)

    def _reset(self) -> None:
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.connection.close()
        self.close_connection = True

    def _handle(self, method: str) -> None:
        c = self.cluster
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        with c.lock:
            action = None
            for i, (m, pattern, act) in enumerate(c.faults):
                if m == method and re.search(pattern, url.path):
                    action = act
                    del c.faults[i]
                    break
            if action in ("403", "429", "503"):
                reason = {"403": "Forbidden", "429": "TooManyRequests", "503": "ServiceUnavailable"}[action]
                return self._send(int(action), _status(int(action), reason, "refused"))
            if action == "reset":
                return self._reset()
            code, answer = self._route(method, url.path, query, body)
            if action == "reset-after":
                return self._reset()
            return self._send(code, answer)

    def _route(self, method, path, query, body):
        c = self.cluster
        if m := JOBS.match(path):
            ns, name = m.groups()
            verb = {"POST": "create", "DELETE": "delete", "GET": "get" if name else "list"}[method]
            c.verbs.add(("trainjobs", verb))
            if method == "POST":
                found = problems(body)
                if found:
                    webhook = [p for p in found if p.startswith("webhook")]
                    if webhook:
                        return 403, _status(
                            403,
                            "Forbidden",
                            'admission webhook "validate.trainjob.trainer.'
                            'kubeflow.org" denied the request: ' + "; ".join(webhook),
                        )
                    return 422, _status(422, "Invalid", "TrainJob.trainer.kubeflow.org is invalid: " + "; ".join(found))
                key = (ns, body["metadata"]["name"])
                if key in c.jobs:
                    return 409, _status(409, "AlreadyExists", f"trainjobs {key[1]!r} already exists")
                job = json.loads(json.dumps(body))
                job["metadata"].update(uid=f"uid-{key[1]}-{len(c.created)}", creationTimestamp=_now())
                c.jobs[key] = job
                c.created.append(job)
                return 201, job
            if name is None:
                items = [j for (n, _), j in c.jobs.items() if n == ns and _selected(j, query.get("labelSelector"))]
                return 200, {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJobList", "items": items}
            key = (ns, name)
            if key not in c.jobs:
                return 404, _status(404, "NotFound", f"trainjobs {name!r} not found")
            if method == "DELETE":
                c.deleted.append(name)
                del c.jobs[key]
                return 200, _status(200, "Success", "deleted") | {"status": "Success"}
            if not _finished(c.jobs[key]):
                c.advance(key)
            return 200, c.jobs[key]
        if m := PODS.match(path):
            ns, name, log = m.groups()
            c.verbs.add(("pods/log" if log else "pods", "get" if name else "list"))
            if method != "GET":
                return 405, _status(405, "MethodNotAllowed", method)
            if name is None:
                items = [p for (n, _), p in c.pods.items() if n == ns and _selected(p, query.get("labelSelector"))]
                return 200, {"apiVersion": "v1", "kind": "PodList", "items": items}
            if (ns, name) not in c.pods:
                return 404, _status(404, "NotFound", f"pods {name!r} not found")
            if log:
                lines = c.pod_logs.get((ns, name), [])
                if "tailLines" in query:
                    lines = lines[-int(query["tailLines"]) :]
                text = "".join(line + "\n" for line in lines)
                if query.get("timestamps", "").lower() != "true":
                    text = "".join(line.partition(" ")[2] + "\n" for line in lines)
                return 200, text
            return 200, c.pods[(ns, name)]
        return 404, _status(404, "NotFound", path)

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_DELETE(self):
        self._handle("DELETE")


def _finished(job: dict) -> bool:
    return any(c.get("type") in ("Complete", "Failed") for c in job.get("status", {}).get("conditions", []))


def _selected(obj: dict, selector: str | None) -> bool:
    labels = obj.get("metadata", {}).get("labels", {})
    for term in filter(None, (selector or "").split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


@contextmanager
def kube_api(cluster: Cluster):
    """Serve `cluster`; yields (CustomObjectsApi, CoreV1Api, url) of a kubernetes client pointed at it."""
    from kubernetes import client

    handler = type("Handler", (_Handler,), {"cluster": cluster})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    config = client.Configuration()
    config.host = url
    config.retries = False  # the launcher's own retries are under test, not urllib3's
    api_client = client.ApiClient(config)
    try:
        yield client.CustomObjectsApi(api_client), client.CoreV1Api(api_client), url
    finally:
        server.shutdown()
        server.server_close()
