"""`vbiopsy server`: the team's MLflow tracking server (PostgreSQL backend, S3 artifacts, optional login).

What it starts
    ``mlflow server`` with the run/registry store in PostgreSQL and artifacts *proxied* by the
    server to an S3 bucket (``--serve-artifacts --artifacts-destination s3://...``; boto3 under
    MLflow does the S3 calls). Clients therefore need neither database nor S3 credentials: pointing
    ``MLFLOW_TRACKING_URI`` at the server is all a user changes (plus a login when ``--auth`` is on).

Where settings come from
    The environment only, so nothing secret lands in a committed file or on a command line
    (``ps`` shows argv to every local user; the backend URI travels as ``MLFLOW_BACKEND_STORE_URI``
    in the child's environment instead):

    ==============================  =============================================================
    VBIOPSY_BACKEND_STORE_URI       postgresql://USER[:PASSWORD]@HOST:PORT/DB (password may instead
                                    come from PGPASSWORD, which libpq reads)
    VBIOPSY_ARTIFACTS_DESTINATION   s3://BUCKET[/PREFIX]
    AWS_ACCESS_KEY_ID               S3 credentials of the server (clients never see them)
    AWS_SECRET_ACCESS_KEY
    MLFLOW_S3_ENDPOINT_URL          optional: endpoint of an S3-compatible store (MinIO, ...);
                                    unset means AWS S3 itself
    --auth only:
    VBIOPSY_AUTH_DATABASE_URI       user/permission store of the basic-auth app
                                    (default: the backend store URI)
    MLFLOW_AUTH_ADMIN_USERNAME      admin login created on first start (default ``admin``)
    MLFLOW_AUTH_ADMIN_PASSWORD      its password; read by MLflow on first start only
    MLFLOW_FLASK_SERVER_SECRET_KEY  static CSRF key, identical on every server replica
    ==============================  =============================================================

``vbiopsy server check`` verifies a running server end to end from a client's side: it logs a run
with a param, a metric and an artifact through :mod:`virtual_biopsy.mlops.tracking`, reads the artifact
back and reports where it went. It is also the MLproject entry point ``check_stack``.
"""
from __future__ import annotations

import argparse
import configparser
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

BACKEND_ENV = "VBIOPSY_BACKEND_STORE_URI"
ARTIFACTS_ENV = "VBIOPSY_ARTIFACTS_DESTINATION"
AUTH_DB_ENV = "VBIOPSY_AUTH_DATABASE_URI"
AUTH_DEFAULT_PERMISSION_ENV = "VBIOPSY_AUTH_DEFAULT_PERMISSION"
S3_ENDPOINT_ENV = "MLFLOW_S3_ENDPOINT_URL"
AWS_KEY_ENVS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
AUTH_ENVS = ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")
AUTH_PERMISSIONS = ("READ", "EDIT", "MANAGE", "NO_PERMISSIONS")


class ServerConfigError(ValueError):
    """The environment lacks (or holds an unusable) setting the tracking server needs."""


@dataclass(frozen=True)
class ServerPlan:
    """What `vbiopsy server` will execute: argv (no secrets) and the extra environment."""

    argv: list[str]
    env: dict[str, str]
    auth_config: str | None = None  # contents of the basic-auth ini, written at start

    def redacted(self) -> str:
        """The command line plus the names (never the values) of the variables it sets."""
        return " ".join(self.argv) + "  # env: " + ", ".join(sorted(self.env))


def _require(env: Mapping[str, str], name: str, why: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise ServerConfigError(f"{name} is not set: {why}")
    return value


def postgres_sqlalchemy_uri(uri: str, name: str = BACKEND_ENV) -> str:
    """Check a PostgreSQL URI and name the installed driver in it.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3, while the pinned driver is
    psycopg2 (psycopg2-binary); an explicit ``postgresql+DRIVER://`` is kept as given.
    """
    scheme = urlsplit(uri).scheme
    if scheme not in ("postgresql", "postgres") and not scheme.startswith("postgresql+"):
        raise ServerConfigError(
            f"{name} must be a PostgreSQL URI (postgresql://user@host:port/db), got scheme {scheme!r}"
        )
    if scheme in ("postgresql", "postgres"):
        return "postgresql+psycopg2" + uri[len(scheme):]
    return uri


def plan_server(env: Mapping[str, str], *, host: str = "127.0.0.1", port: int = 5000, workers: int = 2,
                auth: bool = False, python: str = sys.executable) -> ServerPlan:
    """Validate the environment and build the ``mlflow server`` invocation; raises ServerConfigError."""
    backend = _require(env, BACKEND_ENV, "the PostgreSQL URI of the run and model-registry store, "
                       "e.g. postgresql://mlflow@db.example.org:5432/mlflow (password via PGPASSWORD)")
    backend = postgres_sqlalchemy_uri(backend)
    destination = _require(env, ARTIFACTS_ENV, "the S3 location artifacts are proxied to, e.g. s3://mlflow-artifacts")
    if urlsplit(destination).scheme != "s3" or not urlsplit(destination).netloc:
        raise ServerConfigError(f"{ARTIFACTS_ENV} must look like s3://BUCKET[/PREFIX], got {destination!r}")
    for name in AWS_KEY_ENVS:
        _require(env, name, f"S3 credentials of the tracking server (for {destination})")
    endpoint = env.get(S3_ENDPOINT_ENV, "").strip()
    if endpoint and urlsplit(endpoint).scheme not in ("http", "https"):
        raise ServerConfigError(f"{S3_ENDPOINT_ENV} must be an http(s) URL, got {endpoint!r}")

    argv = [python, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", str(workers),
            "--serve-artifacts", "--artifacts-destination", destination]
    # The backend URI may carry a password: hand it over in the environment, not in argv.
    child_env = {"MLFLOW_BACKEND_STORE_URI": backend, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
                 # MLflow 3's job runner (huey consumers for GenAI jobs: prompt optimisation, scorers)
                 # serves nothing this platform uses and keeps three more processes polling.
                 "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": env.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")}
    auth_config = None
    if auth:
        for name in AUTH_ENVS:
            _require(env, name, "needed by --auth (basic-auth app): "
                     + ("the admin password created on first start" if "PASSWORD" in name
                        else "a static CSRF key shared by all server replicas"))
        auth_db = postgres_sqlalchemy_uri(env.get(AUTH_DB_ENV, "").strip() or backend, AUTH_DB_ENV)
        permission = env.get(AUTH_DEFAULT_PERMISSION_ENV, "READ").strip().upper()
        if permission not in AUTH_PERMISSIONS:
            raise ServerConfigError(f"{AUTH_DEFAULT_PERMISSION_ENV} must be one of {AUTH_PERMISSIONS}, got {permission!r}")
        ini = configparser.ConfigParser()
        # No password in the ini: MLflow reads MLFLOW_AUTH_ADMIN_PASSWORD from the environment and
        # the auth DB password comes from PGPASSWORD or the URI, which stays in the environment.
        ini["mlflow"] = {
            "default_permission": permission,
            "database_uri": "${" + AUTH_DB_ENV + "}",  # placeholder, substituted at start (see start)
            "admin_username": env.get("MLFLOW_AUTH_ADMIN_USERNAME", "").strip() or "admin",
            "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
        }
        auth_config = _ini_text(ini)
        argv += ["--app-name", "basic-auth"]
        child_env[AUTH_DB_ENV] = auth_db
    return ServerPlan(argv=argv, env=child_env, auth_config=auth_config)


def _ini_text(ini: configparser.ConfigParser) -> str:
    import io

    buffer = io.StringIO()
    ini.write(buffer)
    return buffer.getvalue()


def _check_auth_dependencies() -> None:
    try:
        import flask_wtf  # noqa: F401  (MLflow's basic-auth app needs it for CSRF protection)
    except ImportError as exc:
        raise ServerConfigError(
            "--auth needs the Python package Flask-WTF (MLflow's basic-auth app imports flask_wtf); "
            "install mlflow's auth extra: pip install -c requirements/constraints.txt 'mlflow[auth]'"
        ) from exc


def start(plan: ServerPlan, environ: Mapping[str, str]) -> None:
    """Replace this process by ``mlflow server`` (so signals and the PID belong to the server)."""
    env = {**environ, **plan.env}
    if plan.auth_config is not None:
        _check_auth_dependencies()
        # The auth ini holds the auth DB URI, which may carry a password: a private temp folder,
        # mode 0600, is the narrowest place MLflow can read it from (it only reads files).
        folder = Path(tempfile.mkdtemp(prefix="vbiopsy-auth-"))
        ini_path = folder / "basic_auth.ini"
        fd = os.open(ini_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(plan.auth_config.replace("${" + AUTH_DB_ENV + "}", env[AUTH_DB_ENV].replace("%", "%%")))
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini_path)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(plan.argv[0], plan.argv, env)


# ---------------------------------------------------------------------------------------------
# vbiopsy server check: a client-side end-to-end check of a running server
# ---------------------------------------------------------------------------------------------
def check_stack(root: str | Path = ".") -> dict[str, str]:
    """Log a run with a param, a metric and an artifact to ``MLFLOW_TRACKING_URI``; read it back.

    Returns what was checked (tracking URI, run id, artifact URI). Raises when the server is
    unreachable, refuses the login, or the artifact does not come back byte for byte.
    """
    from virtual_biopsy.mlops import tracking

    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        raise ServerConfigError("MLFLOW_TRACKING_URI is not set: point it at the tracking server, e.g. http://mlflow:5000")
    payload = f"virtual-biopsy stack check {os.getpid()}\n"
    with tracking.stage_run("check_stack", root=root, tags={"check": "stack"}) as run:
        run.log_params({"check.pid": os.getpid()})
        run.log_metrics({"check.ok": 1.0})
        run.log_text(payload, "check/hello.txt")
        artifact_uri = run.artifact_uri()
        with tempfile.TemporaryDirectory() as tmp:
            local = run.client.download_artifacts(run.run_id, "check/hello.txt", tmp)
            returned = Path(local).read_text()
    if returned != payload:
        raise RuntimeError(f"artifact check/hello.txt of run {run.run_id} came back altered from {artifact_uri}")
    return {"tracking_uri": uri, "run_id": run.run_id, "artifact_uri": artifact_uri}


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", choices=("start", "check"), default="start",
                        help="start (default): run the tracking server; check: log a test run to "
                             "MLFLOW_TRACKING_URI and read its artifact back")
    parser.add_argument("--host", default=os.environ.get("VBIOPSY_SERVER_HOST", "127.0.0.1"),
                        help="interface to bind (default 127.0.0.1; 0.0.0.0 inside a container)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("VBIOPSY_SERVER_PORT", "5000")))
    parser.add_argument("--workers", type=int, default=int(os.environ.get("VBIOPSY_SERVER_WORKERS", "2")))
    parser.add_argument("--auth", action="store_true",
                        help="require a login (MLflow basic-auth app); see MLFLOW_AUTH_ADMIN_PASSWORD")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the environment and print the command (secrets redacted)")
    parser.add_argument("--root", default=".", help="project root (check only)")
    parser.set_defaults(func=run)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "server", help="start the team MLflow server (PostgreSQL + S3) or check one",
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        if args.action == "check":
            result = check_stack(args.root)
            print(f"stack OK: run {result['run_id']} on {result['tracking_uri']}, artifacts at {result['artifact_uri']}")
            return 0
        plan = plan_server(os.environ, host=args.host, port=args.port, workers=args.workers, auth=args.auth)
        if args.dry_run:
            print(plan.redacted())
            return 0
        if shutil.which(plan.argv[0]) is None and not Path(plan.argv[0]).exists():
            raise ServerConfigError(f"python interpreter {plan.argv[0]} not found")
        start(plan, os.environ)
        return 0  # not reached: execve replaced the process
    except ServerConfigError as exc:
        print(f"vbiopsy server: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m virtual_biopsy.mlops.server", description=__doc__.split("\n\n")[0])
    _add_arguments(parser)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
