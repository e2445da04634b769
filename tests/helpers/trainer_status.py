"""A stand-in for Kubeflow Trainer's TrainJob status endpoint (Trainer >= 2.2, TrainJobStatus gate): HTTPS on
127.0.0.1 with a certificate from a test CA (trustme), a bearer token read from a file (another token: 403, as the
real server answers), and the payload checked
against the v2.3.0 CRD's status.trainerStatus schema and its CEL rule, as the controller does before it writes it.

`status_server(tmp_path)` yields the server; `server.env` holds the three variables the controller injects.
"""

from __future__ import annotations

import copy
import json
import ssl
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from helpers.http import reply
from helpers.trainer_api import _cel_problems, _crd_schema, _json_schema

PATH = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/team/trainjobs/distar-job/status"


def _trainer_status_problems(payload) -> list[str]:
    import jsonschema

    schema = _crd_schema()["properties"]["status"]["properties"]["trainerStatus"]
    wrapper = {
        "type": "object",
        "properties": {"trainerStatus": _json_schema(copy.deepcopy(schema))},
        "required": ["trainerStatus"],
        "additionalProperties": False,
    }
    found = [e.message for e in jsonschema.Draft7Validator(wrapper).iter_errors(payload)]
    if not found:
        found = _cel_problems(schema, payload["trainerStatus"], "/trainerStatus")
    return found


class StatusServer:
    def __init__(self, token: str, answer: int = 200):
        self.token, self.answer = token, answer
        self.received: list[dict] = []
        self.refused: list[str] = []
        self.env: dict[str, str] = {}


def _handler(state: StatusServer):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, code: int, body) -> None:
            reply(self, code, body)

        def do_POST(self):
            payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
            if self.path != PATH:
                return self._send(404, {"kind": "Status", "code": 404, "message": self.path})
            if self.headers.get("Authorization") != f"Bearer {state.token}":
                # pkg/statusserver/server.go (v2.3.0): a token that does not belong to a pod of this TrainJob is 403
                state.refused.append("token")
                return self._send(403, {"kind": "Status", "code": 403, "reason": "Forbidden", "message": "Forbidden"})
            problems = _trainer_status_problems(payload)
            if problems:
                state.refused.append("; ".join(problems))
                return self._send(422, {"kind": "Status", "code": 422, "message": "; ".join(problems)})
            if state.answer != 200:
                return self._send(state.answer, {"kind": "Status", "code": state.answer, "message": "unavailable"})
            state.received.append(payload["trainerStatus"])
            return self._send(200, payload)

    return Handler


@contextmanager
def status_server(tmp_path, answer: int = 200):
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca_file, token_file = tmp_path / "ca.crt", tmp_path / "token"
    ca.cert_pem.write_to_path(str(ca_file))
    token_file.write_text("projected-token-abc\n")
    state = StatusServer("projected-token-abc", answer)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(context)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.env = {
        "KUBEFLOW_TRAINER_SERVER_URL": f"https://127.0.0.1:{server.server_address[1]}{PATH}",
        "KUBEFLOW_TRAINER_SERVER_CA_CERT": str(ca_file),
        "KUBEFLOW_TRAINER_SERVER_TOKEN": str(token_file),
    }
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
