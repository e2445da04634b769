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
