"""No credential in any git-tracked file.

Patterns: AWS access key ids, private key blocks, ``password``/``secret``/``token`` assignments with
a literal value, and database URLs with an inline password. Values that are documented
placeholders (change-me, ..., <...>, ${VAR}, $VAR, empty) are allowed; nothing else is.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[0-9A-Z]{16}\b")
PRIVATE_KEY = re.compile(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")
ASSIGNMENT = re.compile(
    r"""(?ix)
    (?<![{$\w.-])[\w.-]*(?:password|passwd|secret[_-]?access[_-]?key|secret[_-]?key|api[_-]?key|token)\b
    ["']?\s*[:=]\s*
    (?P<value>"[^"\n]*"|'[^'\n]*'|[^\s,;#)}\]]+)
    """
)
DB_URL_PASSWORD = re.compile(r"(?i)\b(?:postgres(?:ql)?(?:\+\w+)?|mysql(?:\+\w+)?|mssql|redis|amqp)://"
                             r"[A-Za-z0-9_.%-]+:(?P<value>[^@/\s'\"]+)@")

# Values a reader sees as "fill this in", never as a credential.
PLACEHOLDER = re.compile(
    r"""(?ix)^(?:
        |change-?me|changeme|replace-?me|example|placeholder|redacted|\*+|\.\.\.|x+
        |<[^>]*>|\$\{.*|\$\w+|\{[\w.]*\}|%\([\w]+\)s
        |none|null|true|false|\d{1,3}
        |test|testing|dummy|secret|password
    )$"""
)
# Unquoted expressions in Python (the value is computed, not written down): names, calls, f-strings.
PY_EXPRESSION = re.compile(r"""^(?:[A-Za-z_][\w.]*(?:[(\[].*)?|f["'].*|[{\[(].*)$""")

# Files whose matches are the subject of the file, not credentials.
ALLOWED_FILES = {"tests/test_secrets.py"}


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return [REPO / name for name in out.decode().split("\0") if name]


def _unquote(value: str) -> str:
    return value.strip().strip("\"'").strip()


def findings_in(text: str, python: bool = False) -> list[str]:
    """Credential-looking strings in ``text``; ``python``: unquoted names are code, not literals."""
    found: list[str] = []
    for pattern, what in ((AWS_KEY_ID, "AWS access key id"), (PRIVATE_KEY, "private key")):
        found += [f"{what}: {m.group(0)[:12]}..." for m in pattern.finditer(text)]
    for match in DB_URL_PASSWORD.finditer(text):
        value = match.group("value")
        if not PLACEHOLDER.match(value):
            found.append(f"database URL with inline password: {match.group(0)[:40]}")
    for match in ASSIGNMENT.finditer(text):
        raw = match.group("value")
        value = _unquote(raw)
        quoted = raw[:1] in "\"'"
        if PLACEHOLDER.match(value) or (python and not quoted and PY_EXPRESSION.match(raw)):
            continue
        found.append(f"literal credential: {match.group(0)[:60]}")
    return found


def test_no_credentials_in_tracked_files():
    problems = []
    for path in tracked_files():
        rel = path.relative_to(REPO).as_posix()
        if rel in ALLOWED_FILES or not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue  # binary (DICOM, images): no text credentials
        problems += [f"{rel}: {finding}" for finding in findings_in(text, python=path.suffix == ".py")]
    assert not problems, "credentials in tracked files:\n" + "\n".join(problems)


@pytest.mark.parametrize("text", [
    "aws_access_key_id = AKIAIOSFODNN7EXAMPLE",
    "-----BEGIN RSA PRIVATE KEY-----",
    "-----BEGIN OPENSSH PRIVATE KEY-----",
    "POSTGRES_PASSWORD=s3cr3t-Value",
    'password: "hunter2hunter2"',
    "uri = postgresql://mlflow:Tr0ub4dor@db:5432/mlflow",
    "MLFLOW_S3_SECRET_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
])
def test_scanner_catches_credentials(text):
    assert findings_in(text), text


@pytest.mark.parametrize("text", [
    "POSTGRES_PASSWORD=change-me",
    "POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD in docker/.env}",
    "AWS_SECRET_ACCESS_KEY: ${{ secrets.DVC_AWS_SECRET_ACCESS_KEY }}",
    "VBIOPSY_BACKEND_STORE_URI: postgresql://${POSTGRES_USER:-mlflow}@postgres:5432/mlflow",
    "postgresql://mlflow:<password>@db:5432/mlflow",
    'secret = f"{self.password}"',
    "password = secrets.token_urlsafe(18)",
    "token: str = field(default_factory=lambda: secrets.token_hex(8))",
    "MLFLOW_TRACKING_PASSWORD=...",
    '[ -n "${AWS_SECRET_ACCESS_KEY:-}" ] || die',
])
def test_scanner_accepts_placeholders_and_expressions(text):
    assert not findings_in(text, python=True), findings_in(text, python=True)
