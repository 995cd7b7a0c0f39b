"""An S3-API server for tests: moto's, on a free loopback port (an emulator of S3, not S3).

`moto_server()` starts it, waits until it accepts connections, yields its endpoint URL and
stops it on exit; the object-storage, Spark-on-s3 and doc-snippet tests share it.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

CREDENTIALS = {"key": "testing", "secret": "testing"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def moto_server(timeout: float = 60.0) -> Iterator[str]:
    """The endpoint URL of a moto S3 server on 127.0.0.1, running while the block runs."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("the moto S3 server did not start")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        _forget_filesystems()


def _forget_filesystems() -> None:
    """fsspec keeps one S3FileSystem per set of arguments; one made from the environment (the
    CLI's) has no endpoint among them, so the next server's tests would reach this stopped one."""
    try:
        import s3fs
    except ImportError:
        return
    s3fs.S3FileSystem.clear_instance_cache()


def storage_options(endpoint: str) -> dict:
    """fsspec / s3fs options for the server at `endpoint`."""
    return {**CREDENTIALS, "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}


def aws_env(endpoint: str) -> dict[str, str]:
    """The same server for boto3 / the CLI through the environment."""
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
