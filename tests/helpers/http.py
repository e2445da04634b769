"""What every stand-in server here answers with: a JSON body (or plain text), its length, its status code."""

import json
from http.server import BaseHTTPRequestHandler


def reply(handler: BaseHTTPRequestHandler, code: int, body) -> None:
    data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    handler.send_response(code)
    handler.send_header("Content-Type", "text/plain" if isinstance(body, str) else "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)
