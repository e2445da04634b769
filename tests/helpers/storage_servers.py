"""S3 and GCS emulator servers on 127.0.0.1 for tests: moto's S3 server and gcp-storage-emulator.

Each yields the environment a client (this process or a torchrun child) needs to reach it through s3fs/gcsfs.
"""

from __future__ import annotations

import contextlib
import os
import socket

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # else every bucket access stalls 60 s


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def s3_server(bucket: str):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    # moto keeps its buckets in this process's memory across servers: each server starts from none
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/moto-api/reset", method="POST")).close()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    with _environ(env):
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir(bucket)
        try:
            yield env
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()


@contextlib.contextmanager
def gcs_server(bucket: str):
    from gcp_storage_emulator.server import create_server

    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "FSSPEC_GS_TOKEN": "anon"}
    with _environ(env):
        import fsspec
        import gcsfs

        fsspec.config.conf.setdefault("gs", {})["token"] = "anon"  # what FSSPEC_GS_TOKEN gives a new process
        gcsfs.GCSFileSystem.clear_instance_cache()
        gcsfs.GCSFileSystem(token="anon").mkdir(bucket)
        try:
            yield env
        finally:
            fsspec.config.conf.get("gs", {}).pop("token", None)
            gcsfs.GCSFileSystem.clear_instance_cache()
            server.stop()


def server(scheme: str, bucket: str):
    """The emulated object-storage server of a URI scheme ("s3" or "gs") with `bucket` in it."""
    return {"s3": s3_server, "gs": gcs_server}[scheme](bucket)


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_S3_INTERNAL_ERROR = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code><Message>We encountered an internal '
    b"error. Please try again.</Message><RequestId>0</RequestId></Error>"
)


@contextlib.contextmanager
def s3_refusing_writes(bucket: str):
    """moto's S3 server behind a proxy that answers every object write (PUT, POST, multipart included) with S3's own
    500 InternalError, every time: a store whose writes never recover (reads pass through)."""
    import http.client
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import urlparse

    with s3_server(bucket) as env:
        upstream = urlparse(env["AWS_ENDPOINT_URL"])

        class Proxy(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # clients send `Expect: 100-continue` with a body and wait for the answer

            def log_message(self, *args):
                pass

            def handle_expect_100(self):
                if self._refused():  # answered before the body is sent, as S3 does
                    self._refuse()
                    return False
                return super().handle_expect_100()

            def _refused(self) -> bool:
                return self.command in ("PUT", "POST") and urlparse(self.path).path.strip("/").count("/") >= 1

            def _refuse(self):
                self.send_response(500)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(_S3_INTERNAL_ERROR)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(_S3_INTERNAL_ERROR)
                self.close_connection = True

            def _forward(self):
                if self._refused():
                    self._refuse()
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=30)
                conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                reply = conn.getresponse()
                data = reply.read()
                self.send_response(reply.status)
                for key, value in reply.getheaders():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        proxy = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        faulty = {**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.server_address[1]}"}
        with _environ(faulty):
            import s3fs

            s3fs.S3FileSystem.clear_instance_cache()
            try:
                yield faulty
            finally:
                s3fs.S3FileSystem.clear_instance_cache()
                proxy.shutdown()
