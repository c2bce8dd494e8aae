"""A real team stack on loopback for tests: PostgreSQL + S3 (moto's standalone server) + `mlflow server`.

Every process is started here, watched by PID and stopped by PID (its own process group), and
every folder is a throwaway one under /tmp that is removed afterwards. Nothing listens on anything
but 127.0.0.1. Credentials are random per session and live only in the environment of the
processes that need them.

conftest.py imports the session fixture, so any test module takes it::

    def test_something(team_stack):
        env = team_stack.client_env()          # MLFLOW_TRACKING_URI etc. for a client process

``TeamStack`` is deliberately a plain object with the URLs and a ``client_env()`` so later tests
(for example the tiny pipeline run against the server) can reuse the same session.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PG_BIN_CANDIDATES = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
STARTUP_TIMEOUT_S = 120.0
BUCKET = "vbiopsy-artifacts"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pg_bin() -> Path | None:
    for candidate in PG_BIN_CANDIDATES:
        if (candidate / "initdb").exists() and (candidate / "postgres").exists():
            return candidate
    return None


def _wait_for(check, what: str, process: subprocess.Popen | None, log: Path | None,
              timeout: float = STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with code {process.returncode} during start-up:\n{tail}")
        try:
            if check():
                return
        except Exception as exc:  # not up yet
            last_error = exc
        time.sleep(0.3)
    tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} not ready after {timeout:.0f} s (last error: {last_error}):\n{tail}")


def stop_process(process: subprocess.Popen | None, timeout: float = 20.0) -> None:
    """Stop a process started with start_new_session=True: its group, by its PID."""
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


@dataclass
class PostgresCluster:
    """A throwaway PostgreSQL cluster: initdb into /tmp, listen on 127.0.0.1 only, password auth."""

    base: Path
    port: int = field(default_factory=free_port)
    user: str = "vbiopsy"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    process: subprocess.Popen | None = None

    @property
    def data_dir(self) -> Path:
        return self.base / "pgdata"

    @property
    def log(self) -> Path:
        return self.base / "postgres.log"

    def url(self, database: str, *, with_password: bool = True) -> str:
        secret = f":{self.password}" if with_password else ""
        return f"postgresql://{self.user}{secret}@127.0.0.1:{self.port}/{database}"

    def _as_owner(self) -> dict:
        # initdb and postgres refuse to run as root: drop to the `postgres` account when we are root.
        return {"user": "postgres", "group": "postgres"} if os.geteuid() == 0 else {}

    def start(self) -> None:
        binaries = pg_bin()
        if binaries is None:
            raise RuntimeError("PostgreSQL server binaries not found under /usr/lib/postgresql (make system-deps)")
        socket_dir = self.base / "sock"
        for folder in (self.base, socket_dir):
            folder.mkdir(parents=True, exist_ok=True)
        pwfile = self.base / "pwfile"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            import pwd

            owner = pwd.getpwnam("postgres")
            for path in (self.base, socket_dir, pwfile):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        os.chmod(pwfile, 0o600)
        try:
            subprocess.run(
                [str(binaries / "initdb"), "-D", str(self.data_dir), "-U", self.user, "--pwfile", str(pwfile),
                 "--auth", "scram-sha-256", "--encoding", "UTF8", "--no-sync", "--no-instructions"],
                check=True, capture_output=True, text=True, **self._as_owner(),
            )
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"initdb failed: {exc.stderr}") from exc
        finally:
            pwfile.unlink()
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [str(binaries / "postgres"), "-D", str(self.data_dir), "-h", "127.0.0.1", "-p", str(self.port),
                 "-k", str(socket_dir), "-c", "fsync=off", "-c", "full_page_writes=off",
                 "-c", "synchronous_commit=off", "-c", "max_connections=60"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **self._as_owner(),
            )
        _wait_for(lambda: self._connect("postgres"), "PostgreSQL", self.process, self.log)

    def _connect(self, database: str) -> bool:
        import psycopg2

        psycopg2.connect(self.url(database), connect_timeout=2).close()
        return True

    def create_database(self, name: str) -> str:
        import psycopg2

        connection = psycopg2.connect(self.url("postgres"))
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        connection.close()
        return self.url(name)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            # SIGINT is PostgreSQL's "fast shutdown"; the postmaster ends its own children.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                stop_process(self.process)


@dataclass
class S3Server:
    """moto's standalone S3 server on loopback (the one stand-in: no S3 service runs here)."""

    base: Path
    port: int = field(default_factory=free_port)
    access_key: str = field(default_factory=lambda: "test" + secrets.token_hex(8))
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.base / "moto.log"

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": self.endpoint}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1")

    def start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.base,
            )
        _wait_for(lambda: self.client().list_buckets() is not None, "moto S3 server", self.process, self.log)

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        paginator = self.client().get_paginator("list_objects_v2")
        return [obj["Key"] for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
                for obj in page.get("Contents", [])]

    def stop(self) -> None:
        stop_process(self.process)


@dataclass
class MlflowServer:
    """`vbiopsy server` (mlflow server on PostgreSQL, artifacts proxied to S3) on loopback."""

    base: Path
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    auth: bool = False
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.base / f"mlflow-{self.port}.log"

    def start(self) -> None:
        import requests

        self.base.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "virtual_biopsy.mlops.server", "start", "--host", "127.0.0.1",
                   "--port", str(self.port), "--workers", "1"] + (["--auth"] if self.auth else [])
        # TMPDIR: the --auth ini (it holds the auth DB password) goes in the test's folder, which
        # pytest removes, not in the machine's /tmp, where it would outlive the server.
        env = {**self.env, "TMPDIR": str(self.base)}
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            cwd=self.base, start_new_session=True)
        _wait_for(lambda: requests.get(f"{self.url}/health", timeout=2).ok, "mlflow server", self.process, self.log)

    def stop(self) -> None:
        # The server's state is all in PostgreSQL and S3, so a slow graceful exit buys nothing.
        stop_process(self.process, timeout=5.0)


@dataclass
class TeamStack:
    postgres: PostgresCluster
    s3: S3Server
    mlflow: MlflowServer
    bucket: str
    artifacts_destination: str
    base: Path

    @property
    def tracking_uri(self) -> str:
        return self.mlflow.url

    def client_env(self) -> dict[str, str]:
        """Environment of a client process: only the tracking URI (no DB or S3 credentials)."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AWS_", "MLFLOW_S3_", "VBIOPSY_BACKEND", "PGPASSWORD"))}
        env["MLFLOW_TRACKING_URI"] = self.tracking_uri
        return env

    def server_env(self, backend_uri: str) -> dict[str, str]:
        return {**os.environ, **self.s3.env(), "VBIOPSY_BACKEND_STORE_URI": backend_uri,
                "VBIOPSY_ARTIFACTS_DESTINATION": self.artifacts_destination}


@contextlib.contextmanager
def running_stack() -> Iterator[TeamStack]:
    base = Path(tempfile.mkdtemp(prefix="vbiopsy-stack-", dir="/tmp"))
    base.chmod(0o711)  # the `postgres` account must traverse it to reach its own data folder
    postgres = PostgresCluster(base / "postgres")
    s3 = S3Server(base / "s3")
    mlflow_server: MlflowServer | None = None
    try:
        postgres.start()
        s3.start()
        bucket = s3.create_bucket(BUCKET)
        backend = postgres.create_database("mlflow")
        destination = f"s3://{bucket}/mlartifacts"
        env = {**os.environ, **s3.env(), "VBIOPSY_BACKEND_STORE_URI": backend,
               "VBIOPSY_ARTIFACTS_DESTINATION": destination}
        mlflow_server = MlflowServer(base / "mlflow", env)
        mlflow_server.start()
        yield TeamStack(postgres, s3, mlflow_server, bucket, destination, base)
    finally:
        if mlflow_server is not None:
            mlflow_server.stop()
        s3.stop()
        postgres.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def team_stack() -> Iterator[TeamStack]:
    if pg_bin() is None:
        pytest.fail("PostgreSQL server binaries missing: run `make system-deps`")
    with running_stack() as stack:
        yield stack
