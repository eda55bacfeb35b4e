"""A local S3-compatible server (moto's server mode) on 127.0.0.1, for tests: started, then stopped.

Example (not run here: it starts a process)::

    with S3Server() as s3:
        fs = s3fs.S3FileSystem(**s3.options)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from typing import Any

from dist_launch import free_port


class S3Server:
    """``python -m moto.server`` on a free port; ``options`` are the s3fs storage options for it."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoint = ""

    @property
    def options(self) -> dict[str, Any]:
        return {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"},
            "skip_instance_cache": True,
        }

    @property
    def env(self) -> dict[str, str]:
        """Environment for a child process (or the CLI) to reach this server through standard AWS settings."""
        return {
            **os.environ,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def start(self) -> S3Server:
        for _ in range(5):  # a port found free can be taken before the server binds it
            port = free_port()
            self.endpoint = f"http://127.0.0.1:{port}"
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    urllib.request.urlopen(self.endpoint, timeout=1).close()
                    return self
                except OSError:
                    time.sleep(0.1)
            self.stop()
        raise RuntimeError("could not start the local S3 server (python -m moto.server)")

    def client(self) -> Any:
        """A boto3 S3 client for this server."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def bucket(self, name: str) -> str:
        """Create a bucket; returns its ``s3://`` URL."""
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=30)
            self.proc = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
