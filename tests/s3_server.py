"""Local servers for the object-storage tests: moto's S3 server and an MLflow tracking server.

Both run as separate processes on 127.0.0.1 and a free port, started and stopped by the context
managers here (the tests wrap them in fixtures). Credentials reach every process only through the
standard AWS environment variables (``S3Endpoint.env``); the AWS config and credentials files are
pointed at paths that do not exist, so nothing on the machine is read. Nothing listens beyond
127.0.0.1.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

REPO_ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class S3Endpoint:
    """A running local S3 server with one bucket."""

    url: str
    bucket: str
    env: dict  # the AWS_* variables a process needs to reach it

    def client(self):
        """A boto3 S3 client for checks (credentials and endpoint from ``env``)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name=self.env["AWS_DEFAULT_REGION"],
                            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"])

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` in the bucket."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def read(self, key: str) -> bytes:
        return self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()


def _wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"server for {url} did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def _process(args: list[str], env: dict, log: Path, health_url: str, timeout: float) -> Iterator[subprocess.Popen]:
    """Run ``args`` as a server process until the block ends (then SIGTERM, SIGKILL after 10 s)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_until_up(health_url, proc, log, timeout)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _aws_env(url: str, tmp: Path) -> dict:
    return {"AWS_ACCESS_KEY_ID": "penni-test", "AWS_SECRET_ACCESS_KEY": "penni-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": url, "AWS_ENDPOINT_URL_S3": url,
            "AWS_CONFIG_FILE": str(tmp / "no-aws-config"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true"}


@contextlib.contextmanager
def s3_server(tmp: Path, bucket: str = "penni-test") -> Iterator[S3Endpoint]:
    """moto's standalone S3 server (``moto.server``) on 127.0.0.1 with ``bucket`` created."""
    port = free_port()
    url = f"http://{HOST}:{port}"
    aws = _aws_env(url, tmp)
    env = {**os.environ, **aws}
    args = [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)]
    with _process(args, env, tmp / "moto.log", f"{url}/moto-api/", timeout=60):
        endpoint = S3Endpoint(url=url, bucket=bucket, env=aws)
        endpoint.client().create_bucket(Bucket=bucket)
        yield endpoint


@contextlib.contextmanager
def mlflow_server(tmp: Path, s3: S3Endpoint, prefix: str = "mlflow") -> Iterator[str]:
    """``mlflow server`` (SQLite backend in ``tmp``, artifacts proxied to ``s3://<bucket>/<prefix>``);
    yields its tracking URI."""
    port = free_port()
    uri = f"http://{HOST}:{port}"
    env = {**os.environ, **s3.env, "MLFLOW_S3_ENDPOINT_URL": s3.url}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = [sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{tmp / 'mlflow-server.db'}",
            "--artifacts-destination", f"s3://{s3.bucket}/{prefix}"]
    # its start-up (imports, database set-up) can take minutes on a busy 2-core machine
    with _process(args, env, tmp / "mlflow-server.log", f"{uri}/health", timeout=400):
        yield uri


def run_pipeline(args: list[str], env: dict, log: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """``workflows/full_pipeline.py --config tiny ARGS`` with ``env`` added; output also saved to ``log``."""
    full_env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1", **env}
    full_env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "workflows" / "full_pipeline.py"), "--config", "tiny",
                           *args], cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    log.write_text(proc.stdout + proc.stderr)
    return proc
