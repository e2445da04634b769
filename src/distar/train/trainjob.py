"""Multi-node training on Kubernetes: a Kubeflow Trainer v2 TrainJob (trainer.kubeflow.org/v1alpha1) on the
torch-distributed runtime, created from a pipeline step, followed to completion, kept for a while for inspection.

The runtime sets PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT, so the
container command is plain `torchrun -m distar.train …`. Pod settings go in spec.runtimePatches (Trainer ≥ 2.3.0, the
first to carry the pods' terminationGracePeriodSeconds there):
/dev/shm as a memory volume (NCCL and data loading need more than the default 64 MB), secrets as environment
variables (object storage, hub token), node selector and tolerations.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import signal
import threading
import time
from dataclasses import dataclass, field

from distar.errors import UserError
from distar.train.command import SHUTDOWN_TIMEOUT_S, torchrun_command

TERMINATION_GRACE_S = SHUTDOWN_TIMEOUT_S + 60
# Trainer's webhook wants a domain-prefixed path as the manager of a runtime patch (IsDomainPrefixedPath).
MANAGER = "distar.dev/launcher"
RESERVED_ENV = frozenset({"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"})

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
NODE = "node"  # the torch-distributed runtime's replicated job and container name
PART_OF = {"app.kubernetes.io/part-of": "distar"}
SPEC_DIGEST = "distar.dev/spec-digest"
"""Annotation: the digest of what the job runs; a retry adopts a job of the same name only when it matches."""
KEEP_SECONDS = "distar.dev/keep-seconds"
"""Annotation: how long a finished job (its pods and logs) is kept; the next launch in the namespace deletes it."""
# The pods of a job: JobSet labels every pod with its JobSet (the TrainJob's name) and replicated job, the Indexed
# Job with its index (the torch runtime's node rank; rank 0's log is the one streamed).
PODS_SELECTOR = "jobset.sigs.k8s.io/jobset-name={name},jobset.sigs.k8s.io/replicatedjob-name=node"
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
# Seconds to connect and to wait for an answer on every API call: a half-open connection must not hang the follow
# loop or the SIGTERM path.
REQUEST_TIMEOUT_S = (5.0, 30.0)
# The pipeline's one set of secrets (k8s/base/secrets.yaml creates them as templates): key → variable of the same name
STORAGE_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")
HUB_SECRET_KEYS = ("HF_TOKEN",)
TRANSIENT = frozenset({429, 500, 502, 503, 504})


class TrainJobFailed(UserError):
    """The TrainJob ended Failed, was deleted, or timed out."""


@dataclass
class TrainJobSpec:
    name: str
    namespace: str
    image: str
    config: str = "sdxl"
    overrides: list[str] = field(default_factory=list)
    num_nodes: int = 1
    nproc_per_node: int = 8
    gpus_per_node: int = 8
    cpu_per_node: str | None = None
    memory_per_node: str | None = None
    runtime: str = "torch-distributed"
    max_restarts: int | None = None
    """torchrun's restarts of the workers on each node after a failure (None: torchrun's default, 0)."""
    env: dict[str, str] = field(default_factory=dict)
    secret_env: dict[str, str] = field(default_factory=dict)
    """Environment variable → "secret-name/key", e.g. HF_TOKEN → "distar-hub/HF_TOKEN"."""
    shm_size: str = "64Gi"
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict] = field(default_factory=list)
    service_account: str | None = None
    queue: str | None = None
    """A Kueue LocalQueue: the job is admitted (and may be suspended) by Kueue."""
    keep_s: int = 86400
    """A finished job is kept this long (0: deleted as soon as it finished), then deleted by the next launch."""
    active_deadline_s: int | None = None
    """Trainer fails the job (DeadlineExceeded) after this long running (the clock restarts on resume)."""


def secret_env(storage_secret: str, hub_secret: str) -> dict[str, str]:
    """Variable → "secret/key" for the storage and hub secrets, as the pipeline's steps get them."""
    keys = [(storage_secret, k) for k in STORAGE_SECRET_KEYS] + [(hub_secret, k) for k in HUB_SECRET_KEYS]
    return {key: f"{secret}/{key}" for secret, key in keys if secret}


def job_name(run_id: str, task: str, variant: str = "") -> str:
    """The TrainJob of one pipeline task: the same for every retry of that task, different for every run, task
    and variant (a ParallelFor branch), and a valid DNS-1035 label (Trainer's CEL rule on metadata.name)."""
    return "distar-" + hashlib.sha256(f"{run_id}\0{task}\0{variant}".encode()).hexdigest()[:20]


def check_shared_locations(config) -> None:
    """What every node of the job reads or writes (the run, the prompts, the model cache) is object storage:
    refused here, before the job and its GPU pods exist."""
    from distar import storage

    for key, value in (
        ("out", config.out),
        ("data.prompts", config.data.prompts),
        ("model.cache_dir", config.model.cache_dir),
    ):
        if value:
            storage.check_shared(key, value)


def parse_toleration(text: str) -> dict:
    """key[=value]:Effect → a toleration (Equal with a value, Exists without)."""
    body, sep, effect = text.rpartition(":")
    if not sep or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute") or not body:
        raise UserError(f"--toleration {text!r}: write key[=value]:Effect (NoSchedule, PreferNoSchedule, NoExecute)")
    key, eq, value = body.partition("=")
    if eq:
        return {"key": key, "operator": "Equal", "value": value, "effect": effect}
    return {"key": key, "operator": "Exists", "effect": effect}


_DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS_1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_spec(spec: TrainJobSpec) -> None:
    """The names and numbers the API server and Trainer's webhook would refuse, refused here with the fix: a
    DNS-1035 job name (Trainer's CEL rule) and DNS-1123 namespace and service account of at most 63 characters,
    variable names, integers that are integers."""
    for what, value, rule in (("name", spec.name, _DNS_1035), ("namespace", spec.namespace, _DNS_1123),
                              ("service account", spec.service_account, _DNS_1123),
                              ("runtime", spec.runtime, _DNS_1123), ("queue", spec.queue, _DNS_1123)):  # fmt: skip
        if value is None and what in ("service account", "queue"):
            continue
        if not isinstance(value, str) or len(value) > 63 or not rule.fullmatch(value):
            raise UserError(
                f"TrainJob {what} {str(value)[:80]!r}: Kubernetes takes lower-case letters, digits and '-', at most "
                f"63 characters{', starting with a letter' if rule is _DNS_1035 else ''}"
            )
    for what in ("num_nodes", "nproc_per_node", "gpus_per_node", "keep_s"):
        value, lo = getattr(spec, what), 0 if what in ("gpus_per_node", "keep_s") else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < lo:
            raise UserError(f"TrainJob {spec.name!r}: {what} must be a whole number ≥ {lo}, got {value!r}")
    bad = sorted(k for k in {*spec.env, *spec.secret_env} if not _ENV_NAME.fullmatch(str(k)))
    if bad:
        raise UserError(
            f"TrainJob {spec.name!r}: {bad[:3]} are not environment variable names ([A-Za-z_][A-Za-z0-9_]*)"
        )
    if any("\n" in str(x) or "\0" in str(x) for x in (*spec.overrides, spec.image, spec.config)):
        raise UserError(f"TrainJob {spec.name!r}: the image, config and overrides must not hold newlines or NUL")


def manifest(spec: TrainJobSpec) -> dict:
    check_spec(spec)
    limits, requests = {}, {}
    if spec.gpus_per_node:
        limits["nvidia.com/gpu"] = str(spec.gpus_per_node)
    for key, value in (("cpu", spec.cpu_per_node), ("memory", spec.memory_per_node)):
        if value:
            requests[key] = value
    trainer = {
        "image": spec.image,
        "command": torchrun_command(spec.config, spec.overrides, None, spec.max_restarts, program=["torchrun"]),
        "numNodes": spec.num_nodes,
        "numProcPerNode": spec.nproc_per_node,
        "resourcesPerNode": {k: v for k, v in (("limits", limits), ("requests", requests)) if v},
        # Every variable, secrets included, goes here: Trainer's webhook refuses env on the node container of a
        # runtime patch, and the torch plugin's PET_* names are its own.
        "env": [{"name": k, "value": v} for k, v in spec.env.items()]
        + [_secret_env(k, v) for k, v in spec.secret_env.items()],
    }
    reserved = sorted(name for name in {*spec.env, *spec.secret_env} if name in RESERVED_ENV)
    if reserved:
        raise UserError(f"TrainJob {spec.name!r}: {reserved} are set by the torch-distributed runtime itself")
    container = {
        "name": NODE,
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    pod = {
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}}],
        "containers": [container],
        # SIGTERM → the step in flight, a checkpoint, exit 75 (distar.train): room for torchrun's shutdown timeout
        "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
    }
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod["tolerations"] = list(spec.tolerations)
    if spec.service_account:
        pod["serviceAccountName"] = spec.service_account
    # Istio's sidecar (multi-user Kubeflow injects it in profile namespaces) outlives the trainer, so the Job's pods
    # would never complete; KFP and torchx turn injection off on their pods in the same way.
    pod_template = {"metadata": {"labels": {"sidecar.istio.io/inject": "false"}}, "spec": pod}
    patch = {
        "manager": MANAGER,
        "trainingRuntimeSpec": {
            "template": {"spec": {"replicatedJobs": [{"name": NODE, "template": {"spec": {"template": pod_template}}}]}}
        },
    }
    labels = PART_OF | ({"kueue.x-k8s.io/queue-name": spec.queue} if spec.queue else {})
    body = {
        "runtimeRef": {"name": spec.runtime, "kind": "ClusterTrainingRuntime", "apiGroup": GROUP},
        "trainer": trainer,
        "runtimePatches": [patch],
    }
    if spec.active_deadline_s is not None:
        if spec.active_deadline_s < 1:
            raise UserError(f"TrainJob {spec.name!r}: active_deadline_s must be at least 1 (or unset)")
        body["activeDeadlineSeconds"] = int(spec.active_deadline_s)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {
            "name": spec.name,
            "namespace": spec.namespace,
            "labels": labels,
            "annotations": {SPEC_DIGEST: spec_digest(labels, body), KEEP_SECONDS: str(spec.keep_s)},
        },
        "spec": body,
    }


def spec_digest(labels: dict, spec: dict) -> str:
    return hashlib.sha256(json.dumps([labels, spec], sort_keys=True).encode()).hexdigest()[:16]


def _secret_env(name: str, ref: str) -> dict:
    secret, sep, key = ref.partition("/")
    if not sep or not secret or not key:
        raise UserError(f"secret_env {name}={ref!r}: write secret-name/key")
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def state_of(obj: dict, pods: list | None = None) -> str:
    """Complete, Failed or Suspended from the conditions Trainer writes (v2.3 copies them from the JobSet and writes
    no condition while a job runs); otherwise Running once a pod of the job runs, else Pending."""
    conditions = {c["type"]: c for c in obj.get("status", {}).get("conditions", [])}
    for kind in ("Complete", "Failed", "Suspended"):
        if conditions.get(kind, {}).get("status") == "True":
            return kind
    if any(pod.status and pod.status.phase == "Running" for pod in pods or []):
        return "Running"
    return "Pending"


def _was_admitted(obj: dict) -> bool:
    """A Suspended condition turned False: a queue admitted the job (it may suspend it again to preempt it)."""
    return any(
        c.get("type") == "Suspended" and c.get("status") == "False" for c in obj.get("status", {}).get("conditions", [])
    )


def _finished_at(obj: dict) -> dt.datetime | None:
    for c in obj.get("status", {}).get("conditions", []):
        if c.get("type") in ("Complete", "Failed") and c.get("status") == "True" and c.get("lastTransitionTime"):
            return dt.datetime.fromisoformat(c["lastTransitionTime"].replace("Z", "+00:00"))
    return None


def describe_status(trainer_status: dict) -> str:
    """status.trainerStatus (what rank 0 reports) as one log line."""
    parts = []
    if "progressPercentage" in trainer_status:
        parts.append(f"{trainer_status['progressPercentage']}% done")
    if "estimatedRemainingSeconds" in trainer_status:
        parts.append(f"ETA {dt.timedelta(seconds=int(trainer_status['estimatedRemainingSeconds']))}")
    parts += [f"{m['name']}={m['value']}" for m in trainer_status.get("metrics", [])]
    return ", ".join(parts)


class TrainJobLauncher:
    """Create a TrainJob (or adopt the one a previous attempt of the same step created), follow it to Complete or
    Failed, stream rank 0's log and the reported progress into this process's log, and never leave it behind:
    SIGTERM or SIGINT of this process (the DELETE goes out from the signal handler itself: Argo kills the container
    about a second later), a timeout, or a Suspended timeout delete the job. Every API call has a connect and read
    timeout; transient API errors (429, 5xx, timeouts, connection resets) are retried with exponential backoff.

    `api` is a kubernetes CustomObjectsApi, `core` a CoreV1Api (the job's pods: Running, and rank 0's log; None:
    neither is read).
    """

    def __init__(
        self,
        api,
        core=None,
        poll_s: float = 15.0,
        timeout_s: float | None = None,
        suspend_timeout_s: float | None = None,
        retries: int = 6,
        backoff_s: float = 1.0,
        backoff_cap_s: float = 60.0,
        request_timeout_s: tuple[float, float] = REQUEST_TIMEOUT_S,
        log=print,
        clock=time.monotonic,
        now=lambda: dt.datetime.now(dt.UTC),
    ):
        self.api, self.core, self.poll_s, self.timeout_s = api, core, poll_s, timeout_s
        self.suspend_timeout_s, self.retries, self.backoff_s, self.backoff_cap_s = (
            suspend_timeout_s,
            retries,
            backoff_s,
            backoff_cap_s,
        )
        self.request_timeout_s = request_timeout_s
        self.log, self.clock, self.now = log, clock, now
        self.stop = threading.Event()
        self.stopped_by: str | None = None
        self.deleted_on_signal = False
        self._job: tuple[str, str] | None = None
        self._log_marks: dict[str, str] = {}

    # -- the API, with timeouts and retries ------------------------------------------------------------------

    def _call(self, what: str, fn, *args, stoppable: bool = True, **kwargs):
        """`fn(*args, **kwargs)` with the request timeout, retried on transient errors. A stop ends the retries of a
        `stoppable` call (a delete is not: it is what a stop must still get done)."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        kwargs.setdefault("_request_timeout", self.request_timeout_s)
        for attempt in range(self.retries + 1):
            try:
                return fn(*args, **kwargs)
            except ApiException as err:
                if err.status not in TRANSIENT or attempt == self.retries:
                    raise
                reason = f"{err.status} {err.reason}"
            except (HTTPError, ConnectionError, TimeoutError) as err:
                if attempt == self.retries:
                    raise TrainJobFailed(f"{what}: the Kubernetes API is unreachable ({err!r})") from err
                reason = type(err).__name__
            delay = min(self.backoff_cap_s, self.backoff_s * 2**attempt)
            self.log(f"{what}: {reason}; retrying in {delay:g} s ({attempt + 1}/{self.retries})")
            if self.stop.wait(delay) and stoppable:
                raise TrainJobFailed(f"{what}: stopped by {self.stopped_by or 'a stop'} while retrying")
        raise AssertionError("unreachable")

    def _get(self, ns: str, name: str) -> dict | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self._call(
                f"get TrainJob {ns}/{name}", self.api.get_namespaced_custom_object, GROUP, VERSION, ns, PLURAL, name
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def _delete(self, ns: str, name: str, why: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self._call(
                f"delete TrainJob {ns}/{name}",
                self.api.delete_namespaced_custom_object,
                GROUP,
                VERSION,
                ns,
                PLURAL,
                name,
                propagation_policy="Foreground",
                stoppable=False,
            )
        except ApiException as err:
            if err.status != 404:
                raise
        self.log(f"deleted TrainJob {ns}/{name} ({why})")

    # -- one launch ------------------------------------------------------------------------------------------

    def run(self, job: dict) -> dict:
        """Returns the finished TrainJob; raises TrainJobFailed when it failed, vanished, timed out or was stopped."""
        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        handlers = self._catch_signals()
        try:
            self.sweep(ns)
            self._create_or_adopt(job)
            self._job = (ns, name)
            return self._follow(ns, name)
        except TrainJobFailed:
            if self.stop.is_set() and self._job is not None:  # stopped inside a call: the job must not outlive us
                self._delete(ns, name, f"this step received {self.stopped_by or 'a stop'}")
            raise
        finally:
            self._job = None
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def _catch_signals(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handle(signum, frame):
            self.stopped_by = signal.Signals(signum).name
            self.stop.set()
            if self._job is not None and not self.deleted_on_signal:
                # once, at once, without retries: the container may have a second left
                ns, name = self._job
                try:
                    self.api.delete_namespaced_custom_object(
                        GROUP, VERSION, ns, PLURAL, name, propagation_policy="Foreground", _request_timeout=(1.0, 2.0)
                    )
                    self.deleted_on_signal = True
                except Exception:  # the follow loop deletes it again, with retries, if it still can
                    pass

        return {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def sweep(self, ns: str) -> list[str]:
        """Delete this project's finished TrainJobs in `ns` whose keep time has passed; returns their names."""
        from kubernetes.client.exceptions import ApiException

        selector = ",".join(f"{k}={v}" for k, v in PART_OF.items())
        try:
            listed = self._call(
                f"list TrainJobs in {ns}",
                self.api.list_namespaced_custom_object,
                GROUP,
                VERSION,
                ns,
                PLURAL,
                label_selector=selector,
            )
        except (ApiException, TrainJobFailed) as err:  # housekeeping: never a reason not to train
            self.log(f"could not list finished TrainJobs in {ns} ({getattr(err, 'status', err)}); none deleted")
            return []
        swept = []
        for obj in listed.get("items", []):
            finished = _finished_at(obj)
            keep = obj.get("metadata", {}).get("annotations", {}).get(KEEP_SECONDS)
            if finished is None or keep is None or obj["metadata"].get("deletionTimestamp"):
                continue
            if self.now() >= finished + dt.timedelta(seconds=int(keep)):
                name = obj["metadata"]["name"]
                try:
                    self._delete(ns, name, f"finished {finished.isoformat()}, kept {keep} s")
                except (ApiException, TrainJobFailed) as err:
                    self.log(f"could not delete finished TrainJob {ns}/{name} ({getattr(err, 'status', err)})")
                    continue
                swept.append(name)
        return swept

    def _create_or_adopt(self, job: dict) -> None:
        from kubernetes.client.exceptions import ApiException

        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        ours = job["metadata"]["annotations"][SPEC_DIGEST]
        for _ in range(4):  # create; or adopt; or wait out a deletion / replace a failed attempt, and create
            try:
                self._call(
                    f"create TrainJob {ns}/{name}",
                    self.api.create_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    ns,
                    PLURAL,
                    job,
                )
                self.log(f"created TrainJob {ns}/{name}")
                return
            except ApiException as err:
                if err.status != 409:
                    raise TrainJobFailed(
                        f"could not create TrainJob {ns}/{name}: {err.status} {err.reason}: {_message(err)}"
                    ) from err
            existing = self._get(ns, name)
            if existing is None:
                continue  # deleted between the two calls
            if existing.get("metadata", {}).get("deletionTimestamp"):
                # an earlier attempt's job on its way out (a foreground deletion keeps it until its pods are gone):
                # adopting it would follow a job that is about to vanish
                self.log(f"TrainJob {ns}/{name} is being deleted; waiting for it to go before creating it again")
                self._wait_gone(ns, name)
                continue
            theirs = existing.get("metadata", {}).get("annotations", {}).get(SPEC_DIGEST)
            if theirs != ours:
                raise TrainJobFailed(
                    f"TrainJob {ns}/{name} already exists with a different spec (digest {theirs}, this step's is "
                    f"{ours}): delete it (kubectl delete trainjob -n {ns} {name}) or run under another name"
                )
            state = state_of(existing)
            if state != "Failed":
                self.log(f"adopting TrainJob {ns}/{name} ({state}), created by an earlier attempt of this step")
                return
            self._delete(ns, name, "an earlier attempt failed; training resumes from its newest complete checkpoint")
            self._wait_gone(ns, name)
        raise TrainJobFailed(f"could not create TrainJob {ns}/{name}: it keeps coming back")

    def _wait_gone(self, ns: str, name: str) -> None:
        while self._get(ns, name) is not None:
            if self.stop.wait(min(self.poll_s, 5.0)):
                raise TrainJobFailed(f"stopped by {self.stopped_by or 'a stop'} while TrainJob {ns}/{name} was deleted")

    def _pods(self, ns: str, name: str) -> list:
        """The job's pods (best effort: none when they cannot be listed)."""
        if self.core is None:
            return []
        try:
            return self._call(
                f"list pods of {ns}/{name}",
                self.core.list_namespaced_pod,
                ns,
                label_selector=PODS_SELECTOR.format(name=name),
            ).items
        except Exception:  # the state then reads Pending until the next poll; nothing to fail the step for
            return []

    def _follow(self, ns: str, name: str) -> dict:
        started, last, reported = self.clock(), None, None
        waiting_since, admitted = None, False
        while True:
            if self.stop.is_set():  # run() deletes the job
                raise TrainJobFailed(f"stopped by {self.stopped_by or 'a stop'}: TrainJob {ns}/{name} was deleted")
            obj = self._get(ns, name)
            if obj is None:
                raise TrainJobFailed(f"TrainJob {ns}/{name} was deleted before it finished")
            if obj["metadata"].get("deletionTimestamp"):
                raise TrainJobFailed(
                    f"TrainJob {ns}/{name} is being deleted by someone else (deletionTimestamp "
                    f"{obj['metadata']['deletionTimestamp']}); retrying the step creates it again and resumes"
                )
            pods = self._pods(ns, name)
            state = state_of(obj, pods)
            admitted = admitted or state == "Running" or _was_admitted(obj)
            if state != last:
                self.log(
                    f"TrainJob {ns}/{name}: {state}"
                    + (" (preempted; waiting)" if state == "Suspended" and admitted else "")
                )
                last = state
            trainer_status = obj.get("status", {}).get("trainerStatus") or {}
            if trainer_status and trainer_status.get("lastUpdatedTime") != reported:
                reported = trainer_status.get("lastUpdatedTime")
                self.log(f"TrainJob {ns}/{name} progress: {describe_status(trainer_status)}")
            self._stream_logs(ns, pods)
            if state == "Complete":
                if int(obj["metadata"].get("annotations", {}).get(KEEP_SECONDS, "0")) == 0:
                    self._delete(ns, name, "finished, keep-seconds 0")
                return obj
            if state == "Failed":
                c = next(c for c in obj["status"]["conditions"] if c["type"] == "Failed")
                raise TrainJobFailed(
                    f"TrainJob {ns}/{name} failed: {c.get('reason', '')}: {c.get('message', '')} (kept for "
                    f"inspection: kubectl describe trainjob -n {ns} {name})"
                )
            # the queue timeout counts only while a job waits for its first admission: a job preempted back
            # into Suspended has run, holds checkpoints, and resumes when the queue admits it again
            if state == "Suspended" and not admitted:
                waiting_since = waiting_since if waiting_since is not None else self.clock()
                if self.suspend_timeout_s is not None and self.clock() - waiting_since > self.suspend_timeout_s:
                    self._delete(ns, name, "suspended too long")
                    raise TrainJobFailed(
                        f"TrainJob {ns}/{name} stayed Suspended (not admitted by its queue) for more than "
                        f"{self.suspend_timeout_s:g} s; it was deleted. Check the queue's quota, or raise the "
                        f"suspend timeout"
                    )
            else:
                waiting_since = None
            if self.timeout_s is not None and self.clock() - started > self.timeout_s:
                self._delete(ns, name, "timed out")
                raise TrainJobFailed(f"TrainJob {ns}/{name} did not finish within {self.timeout_s:g} s; it was deleted")
            self.stop.wait(self.poll_s)

    def _stream_logs(self, ns: str, pods: list) -> None:
        """New lines of rank 0's log since the last poll (timestamps keep the place; a restarted pod starts over)."""
        if self.core is None:
            return
        for pod in pods:
            meta = pod.metadata
            if (meta.labels or {}).get(INDEX_LABEL) != "0":
                continue
            try:
                mark = self._log_marks.get(meta.name)
                # the first read takes the tail (an adopted job may have logged for days), later ones a window
                # wider than a poll, deduplicated by timestamp
                window = {"tail_lines": 1000} if mark is None else {"since_seconds": int(2 * self.poll_s) + 60}
                text = self.core.read_namespaced_pod_log(
                    meta.name, ns, container=NODE, timestamps=True, _request_timeout=self.request_timeout_s, **window
                )
            except Exception:  # a pod still starting has no log yet, a connection drops: streaming is best effort
                continue
            mark = mark or ""
            for line in text.splitlines():
                stamp, _, message = line.partition(" ")
                if _stamp_key(stamp) > mark:
                    self.log(f"[{meta.name}] {message}")
                    mark = _stamp_key(stamp)
            self._log_marks[meta.name] = mark


def _stamp_key(stamp: str) -> str:
    """RFC 3339 with nanoseconds drops trailing zeros; padded, the stamps of one pod's log compare as strings."""
    base, _, fraction = stamp.rstrip("Z").partition(".")
    return f"{base}.{fraction.ljust(9, '0')}"


def _message(err) -> str:
    try:
        return json.loads(err.body).get("message", "")
    except (TypeError, ValueError, AttributeError):
        return str(err.body or "")
