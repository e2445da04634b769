"""A stand-in Kubernetes API server on 127.0.0.1 for the TrainJob launcher: the REST paths the kubernetes client
calls for TrainJobs and pods, with what a real cluster enforces there.

- The API server: ObjectMeta rules on create (label values of at most 63 characters and the label syntax, at most
  256 KiB of annotations, the body's namespace equal to the URL's, ownerReferences with apiVersion, kind, name and
  uid) answer 422 Invalid or 400 BadRequest; a name taken answers 409 AlreadyExists, a missing object 404.
  DELETE with propagationPolicy=Foreground keeps the object, with a deletionTimestamp and the foregroundDeletion
  finalizer, until its pods are gone (`deletion_polls` more reads); other policies remove it at once.
- Admission: every created TrainJob goes through tests/helpers/trainer_api.problems (a supported release's CRD
  schema, its CEL rules, Trainer's webhook rules) and Trainer's webhook lookup of the ClusterTrainingRuntime it
  names (`runtimes`); a refusal answers as the API server does (422 Invalid for schema and CEL, 403 for a webhook
  denial).
- The garbage collector: an object whose owners are all gone (a deleted pod or Workflow, or a uid that never
  existed) is deleted, as the real collector does with dependents.
- Trainer v2.3's controller: each job moves through a scripted list of states, one per GET of the job, and writes
  only the conditions Trainer writes (copied from the JobSet): Suspended (True, or False with reason Resumed),
  Complete, Failed; "Pending" and "Running" write none. Pods exist while the job runs (phase Running; JobSet's and
  the Indexed Job's labels, one container `node`), are removed while it is suspended, and end Succeeded or Failed.
  Rank 0 logs one scripted line per GET.
- The kubelet's log endpoint: 400 for a container the pod does not have, `tailLines` and `sinceSeconds` honoured.
- Faults: scripted answers for the next matching requests (403, 429, 503, a connection reset before or after the
  request took effect, a connection that hangs without an answer).
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
STATES = ("Pending", "Running", "Suspended", "Resumed", "Complete", "Failed")
# k8s.io/apimachinery validation: IsValidLabelValue, and the total size of annotations (TotalAnnotationSizeLimitB)
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
LABEL_VALUE_MAX = 63
ANNOTATIONS_MAX_BYTES = 256 * 1024


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


def metadata_problems(meta: dict, url_namespace: str) -> tuple[int, str] | None:
    """What the API server refuses in an object's metadata before anything else sees it."""
    if meta.get("namespace") and meta["namespace"] != url_namespace:
        return 400, "the namespace of the provided object does not match the namespace sent on the request"
    for value in (meta.get("labels") or {}).values():
        if not isinstance(value, str) or len(value) > LABEL_VALUE_MAX or not LABEL_VALUE.match(value):
            return 422, f"metadata.labels: Invalid value: {value!r}: a valid label must be 63 characters or less"
    size = sum(len(k) + len(v) for k, v in (meta.get("annotations") or {}).items())
    if size > ANNOTATIONS_MAX_BYTES:
        return 422, f"metadata.annotations: Too long: must have at most {ANNOTATIONS_MAX_BYTES} bytes"
    for ref in meta.get("ownerReferences") or []:
        for field in ("apiVersion", "kind", "name", "uid"):
            if not ref.get(field):
                return 422, f"metadata.ownerReferences.{field}: Invalid value: {ref.get(field)!r}: must not be empty"
    return None


class Cluster:
    def __init__(
        self,
        states: list[str] | None = None,
        logs: list[str] | None = None,
        trainer_status=None,
        runtimes=("torch-distributed",),
        release: str = "v2.3.0",
        deletion_polls: int = 2,
    ):
        self.states = states or ["Running", "Complete"]
        unknown = set(self.states) - set(STATES)
        assert not unknown, f"Trainer v2.3 writes no state {unknown}: use {STATES}"
        self.logs = logs or []
        self.trainer_status = trainer_status or {}
        """state index → status.trainerStatus to show from that GET on"""
        self.runtimes = set(runtimes)
        self.release = release
        self.deletion_polls = deletion_polls
        self.jobs: dict[tuple[str, str], dict] = {}
        self.gets: dict[tuple[str, str], int] = {}
        self.pods: dict[tuple[str, str], dict] = {}
        self.pod_logs: dict[tuple[str, str], list[str]] = {}
        self.workflows: dict[tuple[str, str], str] = {}
        """(namespace, name) → uid of the Argo Workflows (pipeline runs) that exist"""
        self.faults: list[tuple[str, str, str]] = []
        """(method, path regex, action) answered in order: "403", "429", "503", "reset", "reset-after", "hang" """
        self.verbs: set[tuple[str, str]] = set()
        self.created: list[dict] = []
        self.deleted: list[str] = []
        self.collected: list[str] = []
        """TrainJobs the garbage collector deleted (their owners were gone)"""
        self.lock = threading.Lock()
        self.closing = threading.Event()

    # -- objects ---------------------------------------------------------------------------------------------

    def add_pod(self, ns: str, name: str, labels: dict | None = None, owners: list | None = None, phase="Running"):
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": ns,
                "uid": f"uid-{name}",
                "labels": labels or {},
                "ownerReferences": owners or [],
            },
            "spec": {"containers": [{"name": "node" if labels else "main", "image": "i"}]},
            "status": {"phase": phase},
        }
        self.pods[(ns, name)] = pod
        return pod

    def add_workflow(self, ns: str, name: str) -> dict:
        """An Argo Workflow and the pod of one of its steps (Argo makes the Workflow each pod's controller owner)."""
        uid = f"uid-wf-{name}"
        self.workflows[(ns, name)] = uid
        ref = {"apiVersion": "argoproj.io/v1alpha1", "kind": "Workflow", "name": name, "uid": uid, "controller": True}
        return self.add_pod(ns, f"{name}-train-1234", {"workflows.argoproj.io/workflow": name}, owners=[ref])

    def delete_workflow(self, ns: str, name: str) -> None:
        with self.lock:
            del self.workflows[(ns, name)]
            self.collect_garbage()

    def delete_pod(self, ns: str, name: str) -> None:
        """A drain or an eviction of a pod."""
        with self.lock:
            del self.pods[(ns, name)]
            self.collect_garbage()

    def uids(self) -> set[str]:
        return (
            set(self.workflows.values())
            | {p["metadata"]["uid"] for p in self.pods.values()}
            | {j["metadata"].get("uid") for j in self.jobs.values()}
        )

    def collect_garbage(self) -> None:
        alive = self.uids()
        for key, job in list(self.jobs.items()):
            owners = job["metadata"].get("ownerReferences") or []
            if owners and not any(ref["uid"] in alive for ref in owners):
                del self.jobs[key]
                self._remove_pods(*key)
                self.collected.append(key[1])

    def _remove_pods(self, ns: str, name: str) -> None:
        for key, pod in list(self.pods.items()):
            if key[0] == ns and pod["metadata"]["labels"].get("jobset.sigs.k8s.io/jobset-name") == name:
                del self.pods[key]

    def fault(self, method: str, path: str, action: str, times: int = 1) -> None:
        self.faults += [(method, path, action)] * times

    # -- Trainer's controller --------------------------------------------------------------------------------

    def _condition(self, job: dict, kind: str, status: str, reason: str) -> None:
        conditions = job.setdefault("status", {}).setdefault("conditions", [])
        conditions[:] = [c for c in conditions if c["type"] != kind]
        conditions.append(
            {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": f"TrainJob is {reason.lower()}",
                "lastTransitionTime": _now(),
            }
        )

    def advance(self, key: tuple[str, str]) -> None:
        """The controller's view after one more GET of the job."""
        n = self.gets.get(key, 0)
        self.gets[key] = n + 1
        job = self.jobs[key]
        job.setdefault("status", {})
        state = self.states[min(n, len(self.states) - 1)]
        ns, name = key
        if state == "Suspended":
            self._condition(job, "Suspended", "True", "Suspended")
            self._remove_pods(ns, name)  # JobSet deletes a suspended job's pods
        elif state == "Resumed":
            self._condition(job, "Suspended", "False", "Resumed")
        elif state in ("Complete", "Failed"):
            self._condition(job, state, "True", f"{state}Reason")
        for index in sorted(i for i in self.trainer_status if i <= n):
            job["status"]["trainerStatus"] = self.trainer_status[index]
        if state in ("Running", "Resumed", "Complete", "Failed"):
            phase = {"Complete": "Succeeded", "Failed": "Failed"}.get(state, "Running")
            pod = f"{name}-node-0-0-abcde"
            for index, pod_name in ((0, pod), (1, f"{name}-node-0-1-fghij")):
                labels = {
                    "jobset.sigs.k8s.io/jobset-name": name,
                    "jobset.sigs.k8s.io/replicatedjob-name": "node",
                    "batch.kubernetes.io/job-completion-index": str(index),
                }
                self.add_pod(ns, pod_name, labels, phase=phase)
            logged = self.pod_logs.setdefault((ns, pod), [])
            if len(logged) < len(self.logs):
                logged.append(f"{_now()} {self.logs[len(logged)]}")

    def _being_deleted(self, key: tuple[str, str]) -> None:
        """Foreground deletion: the object stays, marked, while its pods terminate; then it goes."""
        job = self.jobs[key]
        left = job["metadata"].setdefault("_pollsLeft", self.deletion_polls)
        if left <= 0:
            del self.jobs[key]
            self._remove_pods(*key)
        else:
            job["metadata"]["_pollsLeft"] = left - 1


class _Handler(BaseHTTPRequestHandler):
    cluster: Cluster

    def log_message(self, *args):
        pass

    def _send(self, code: int, body) -> None:
        if isinstance(body, dict) and "metadata" in body:
            body = json.loads(json.dumps(body))
            body["metadata"].pop("_pollsLeft", None)
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
        action = None
        with c.lock:
            for i, (m, pattern, act) in enumerate(c.faults):
                if m == method and re.search(pattern, url.path):
                    action = act
                    del c.faults[i]
                    break
        if action == "hang":  # a half-open connection: the request arrived, no answer ever comes
            c.closing.wait()
            return self._reset()
        with c.lock:
            if action in ("403", "429", "503"):
                reason = {"403": "Forbidden", "429": "TooManyRequests", "503": "ServiceUnavailable"}[action]
                return self._send(int(action), _status(int(action), reason, "refused"))
            if action == "reset":
                return self._reset()
            code, answer = self._route(method, url.path, query, body)
            c.collect_garbage()
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
                return self._create(ns, body)
            if name is None:
                items = [j for (n, _), j in c.jobs.items() if n == ns and _selected(j, query.get("labelSelector"))]
                return 200, {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJobList", "items": items}
            key = (ns, name)
            if key not in c.jobs:
                return 404, _status(404, "NotFound", f"trainjobs.trainer.kubeflow.org {name!r} not found")
            job = c.jobs[key]
            if method == "DELETE":
                policy = (body or {}).get("propagationPolicy") or query.get("propagationPolicy")
                if not job["metadata"].get("deletionTimestamp"):
                    c.deleted.append(name)
                if policy == "Foreground":
                    job["metadata"].setdefault("deletionTimestamp", _now())
                    job["metadata"]["finalizers"] = ["foregroundDeletion"]
                    return 200, job
                del c.jobs[key]
                c._remove_pods(ns, name)
                return 200, _status(200, "Success", "deleted") | {"status": "Success"}
            if job["metadata"].get("deletionTimestamp"):
                c._being_deleted(key)
            elif not _finished(job):
                c.advance(key)
            return 200, job
        if m := PODS.match(path):
            ns, name, log = m.groups()
            verb = {"GET": "get" if name else "list", "DELETE": "delete"}.get(method, method.lower())
            c.verbs.add(("pods/log" if log else "pods", verb))
            if method != "GET":
                return 405, _status(405, "MethodNotAllowed", method)
            if name is None:
                items = [p for (n, _), p in c.pods.items() if n == ns and _selected(p, query.get("labelSelector"))]
                return 200, {"apiVersion": "v1", "kind": "PodList", "items": items}
            if (ns, name) not in c.pods:
                return 404, _status(404, "NotFound", f"pods {name!r} not found")
            if log:
                return self._log(ns, name, query)
            return 200, c.pods[(ns, name)]
        return 404, _status(404, "NotFound", path)

    def _create(self, ns: str, body: dict):
        c = self.cluster
        refused = metadata_problems(body.get("metadata", {}), ns)
        if refused:
            code, message = refused
            reason = "BadRequest" if code == 400 else "Invalid"
            return code, _status(code, reason, f"TrainJob.trainer.kubeflow.org is invalid: {message}")
        found = problems(body, c.release)
        runtime = body.get("spec", {}).get("runtimeRef", {}).get("name")
        if not found and runtime not in c.runtimes:
            found = [
                f"webhook: spec.RuntimeRef: clustertrainingruntimes.trainer.kubeflow.org {runtime!r} not found: "
                "specified clusterTrainingRuntime must be created before the TrainJob is created"
            ]
        if found:
            webhook = [p for p in found if p.startswith("webhook")]
            if webhook:
                return 403, _status(
                    403,
                    "Forbidden",
                    'admission webhook "validate.trainjob.trainer.kubeflow.org" denied the request: '
                    + "; ".join(webhook),
                )
            return 422, _status(422, "Invalid", "TrainJob.trainer.kubeflow.org is invalid: " + "; ".join(found))
        key = (ns, body["metadata"]["name"])
        if key in c.jobs:
            return 409, _status(409, "AlreadyExists", f"trainjobs.trainer.kubeflow.org {key[1]!r} already exists")
        job = json.loads(json.dumps(body))
        job["metadata"].update(namespace=ns, uid=f"uid-{key[1]}-{len(c.created)}", creationTimestamp=_now())
        c.jobs[key] = job
        c.created.append(job)
        return 201, job

    def _log(self, ns: str, name: str, query: dict):
        c = self.cluster
        pod = c.pods[(ns, name)]
        containers = [x["name"] for x in pod["spec"]["containers"]]
        container = query.get("container") or (containers[0] if len(containers) == 1 else None)
        if container not in containers:
            return 400, _status(400, "BadRequest", f"container {container} is not valid for pod {name}")
        lines = c.pod_logs.get((ns, name), [])
        if "sinceSeconds" in query:
            since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=int(query["sinceSeconds"]))
            lines = [line for line in lines if _stamp(line) >= since]
        if "tailLines" in query:
            lines = lines[-int(query["tailLines"]) :]
        if query.get("timestamps", "").lower() == "true":
            return 200, "".join(line + "\n" for line in lines)
        return 200, "".join(line.partition(" ")[2] + "\n" for line in lines)

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_DELETE(self):
        self._handle("DELETE")


def _stamp(line: str) -> dt.datetime:
    return dt.datetime.fromisoformat(line.partition(" ")[0].replace("Z", "+00:00"))


def _finished(job: dict) -> bool:
    return any(
        c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
        for c in job.get("status", {}).get("conditions", [])
    )


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
    server.daemon_threads = True
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
        cluster.closing.set()
        server.shutdown()
        server.server_close()
