"""A real S3-compatible server for tests: moto's standalone server in its own process,
listening on a free loopback port."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid

import httpx

ACCESS_KEY = "sma-test-access"
SECRET_KEY = "sma-test-secret"
REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoS3Server:
    def __init__(self, port: int | None = None):
        self.port = port or _free_port()
        self._proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "MotoS3Server":
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
               "AWS_DEFAULT_REGION": REGION}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self._proc.returncode}")
            try:
                if httpx.get(f"{self.endpoint}/moto-api/", timeout=1.0).status_code < 500:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server did not start on port {self.port}")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._proc = None

    def settings_overrides(self, bucket: str | None = None) -> dict:
        """Settings fields that point the object store at this server (a fresh bucket)."""
        return dict(object_store="s3", s3_endpoint=self.endpoint, s3_access_key=ACCESS_KEY,
                    s3_secret_key=SECRET_KEY, s3_secure=False, s3_region=REGION,
                    s3_bucket=bucket or f"sma-test-{uuid.uuid4().hex[:16]}")
