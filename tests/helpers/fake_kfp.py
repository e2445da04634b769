"""A small fake of the Kubeflow Pipelines v2beta1 REST API on 127.0.0.1: healthz, experiments, runs. It records
every request so tests can check what a client sent. With `token` or `cookie` set it stands behind an auth proxy
as multi-user Kubeflow does (oauth2-proxy / Istio): a request without that bearer token or session cookie gets 401
and never reaches the API."""

from __future__ import annotations

import datetime
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from helpers.http import reply


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeKFP:
    def __init__(self, token: str | None = None, cookie: str | None = None):
        self.token, self.cookie = token, cookie
        self.refused = 0
        self.requests: list[tuple[str, str, dict | None]] = []
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, code: int, body) -> None:
                reply(self, code, body)

            def _authorised(self) -> bool:
                if fake.token is None and fake.cookie is None:
                    return True
                bearer = fake.token is not None and self.headers.get("Authorization") == f"Bearer {fake.token}"
                cookie = fake.cookie is not None and fake.cookie in (self.headers.get("Cookie") or "")
                if not (bearer or cookie):
                    fake.refused += 1
                    self.rfile.read(int(self.headers.get("Content-Length", 0)))
                    self._reply(401, {"error": "Unauthorized"})
                return bearer or cookie

            def do_GET(self):
                if not self._authorised():
                    return
                url = urlparse(self.path)
                fake.requests.append(("GET", url.path, None))
                if url.path == "/apis/v2beta1/healthz":
                    return self._reply(200, {"multi_user": False})
                if url.path == "/apis/v2beta1/experiments":
                    flt = json.loads(parse_qs(url.query).get("filter", ["{}"])[0] or "{}")
                    names = [p.get("string_value") for p in flt.get("predicates", [])]
                    found = [e for e in fake.experiments.values() if not names or e["display_name"] in names]
                    return self._reply(200, {"experiments": found, "total_size": len(found)} if found else {})
                if url.path.startswith("/apis/v2beta1/runs/"):
                    run = fake.runs.get(url.path.rsplit("/", 1)[-1])
                    return self._reply(200 if run else 404, run or {"error": "not found"})
                return self._reply(404, {"error": f"no route {url.path}"})

            def do_POST(self):
                if not self._authorised():
                    return
                url = urlparse(self.path)
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                fake.requests.append(("POST", url.path, body))
                if url.path == "/apis/v2beta1/experiments":
                    exp = {
                        "experiment_id": str(uuid.uuid4()),
                        "display_name": body["display_name"],
                        "namespace": body.get("namespace", ""),
                        "created_at": _now(),
                    }
                    fake.experiments[exp["experiment_id"]] = exp
                    return self._reply(200, exp)
                if url.path == "/apis/v2beta1/runs":
                    run = {**body, "run_id": str(uuid.uuid4()), "state": "PENDING", "created_at": _now()}
                    fake.runs[run["run_id"]] = run
                    return self._reply(200, run)
                return self._reply(404, {"error": f"no route {url.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
