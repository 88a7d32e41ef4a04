"""Real services on 127.0.0.1 for the lifecycle tests, each started and stopped by its test fixture:
PostgreSQL (Debian's package, run as the `postgres` user when the tests run as root, since initdb
refuses root), an S3 API server (moto's standalone server) and an MLflow tracking server on them."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from tests.helpers.project import BIN

# moto accepts any key pair; the names are what boto, s3fs (DVC) and MLflow read
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "lifecycle-test-key", "AWS_SECRET_ACCESS_KEY": "lifecycle-test-secret",
                  "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(ready, what: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {seconds:.0f} s")
        time.sleep(0.3)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


class Postgres:
    """A throwaway cluster in a temporary folder, on a free loopback port, with a database `mlflow`."""

    def __init__(self):
        self.bin = Path(sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1])
        self.folder = Path(tempfile.mkdtemp(prefix="lifecycle-pg-"))
        self.data, self.log = self.folder / "data", self.folder / "server.log"
        self.port = free_port()
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        self.as_owner([self.bin / "initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync"])
        self.start()
        self.as_owner([self.bin / "createdb", "-h", "127.0.0.1", "-p", self.port, "-U", "postgres", "mlflow"])
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/mlflow"

    def as_owner(self, command: list) -> None:
        command = [str(part) for part in command]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--"] + command
        subprocess.run(command, check=True, capture_output=True, text=True)

    def start(self) -> None:
        self.as_owner([self.bin / "pg_ctl", "-D", self.data, "-l", self.log, "-w", "start", "-o",
                       f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"])

    def stop(self) -> None:
        self.as_owner([self.bin / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop"])

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


class Server:
    """A server process in its own process group (stopping it stops its workers too)."""

    def __init__(self, command: list[str], env: dict, health_url: str, log: Path):
        self.command, self.env, self.health_url, self.log = command, env, health_url, log
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        wait_until(lambda: answers(self.health_url) or self.process.poll() is not None, self.command[0])
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.command[0]} exited: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


class S3Server(Server):
    """moto's S3 API server (in memory: a restart starts empty), with the given buckets."""

    def __init__(self, folder: Path, buckets: list[str], port: int | None = None):
        self.port, self.buckets = port or free_port(), buckets
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                         {**os.environ, **S3_CREDENTIALS}, f"{self.url}/moto-api/", folder / f"s3-{self.port}.log")

    def start(self) -> None:
        import boto3

        super().start()
        client = boto3.client("s3", endpoint_url=self.url, **{k.lower(): v for k, v in S3_CREDENTIALS.items()
                                                              if k != "AWS_DEFAULT_REGION"}, region_name="us-east-1")
        for bucket in self.buckets:
            client.create_bucket(Bucket=bucket)

    def client_env(self) -> dict[str, str]:
        """What a DVC or boto client needs: the credentials and this endpoint (AWS_ENDPOINT_URL_S3)."""
        return {**S3_CREDENTIALS, "AWS_ENDPOINT_URL_S3": self.url}


class MlflowServer(Server):
    """`mlflow server` with its backend store in PostgreSQL and its artifacts in S3 (served through the
    server: clients need no S3 credentials)."""

    def __init__(self, folder: Path, postgres: Postgres, s3: S3Server, bucket: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, **S3_CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": s3.url,
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # up in seconds, not ~20
        super().__init__([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
                          "--workers", "1", "--backend-store-uri", postgres.url,
                          "--artifacts-destination", f"s3://{bucket}/artifacts"],
                         env, f"{self.url}/health", folder / "mlflow-server.log")
