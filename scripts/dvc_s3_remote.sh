#!/usr/bin/env bash
# Configure DVC's default remote on S3 or an S3-compatible store (MinIO, Ceph, moto) from the
# environment. Run it in the repository root once per clone (and again after rotating keys).
#
#   VBIOPSY_DVC_REMOTE_URL   s3://BUCKET/PREFIX               required; written to .dvc/config
#                                                             (committed: holds no secret)
#   VBIOPSY_DVC_REMOTE       remote name                      default: storage
#   VBIOPSY_DVC_S3_ENDPOINT  http(s)://host:port of an S3-compatible store; unset means AWS S3.
#                            Falls back to MLFLOW_S3_ENDPOINT_URL. Written to .dvc/config.local
#   VBIOPSY_DVC_AWS_PROFILE  optional named profile of ~/.aws/credentials (.dvc/config.local)
#   AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
#                            read by DVC (boto3) from the environment at push/pull time. With
#                            --store-credentials they are also written to .dvc/config.local
#                            (git-ignored, mode 0600) so later shells need no exported keys.
#
# Nothing secret ever goes into .dvc/config: endpoint and keys live in .dvc/config.local, which
# DVC's own .dvc/.gitignore excludes from git.
set -euo pipefail

store_credentials=0
for arg in "$@"; do
  case "$arg" in
    --store-credentials) store_credentials=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "dvc_s3_remote.sh: unknown argument $arg (known: --store-credentials)" >&2; exit 2 ;;
  esac
done

die() { echo "dvc_s3_remote.sh: $*" >&2; exit 1; }

DVC=${DVC:-dvc}
command -v "$DVC" >/dev/null 2>&1 || DVC=.venv/bin/dvc
[ -d .dvc ] || die "no .dvc folder in $(pwd): run this in the repository root (after dvc init)"

url=${VBIOPSY_DVC_REMOTE_URL:-}
[ -n "$url" ] || die "VBIOPSY_DVC_REMOTE_URL is not set: the S3 location of the DVC cache, e.g. s3://vbiopsy-dvc/store"
case "$url" in s3://?*) ;; *) die "VBIOPSY_DVC_REMOTE_URL must look like s3://BUCKET[/PREFIX], got $url" ;; esac
name=${VBIOPSY_DVC_REMOTE:-storage}
endpoint=${VBIOPSY_DVC_S3_ENDPOINT:-${MLFLOW_S3_ENDPOINT_URL:-}}

"$DVC" remote add --default --force "$name" "$url"
if [ -n "$endpoint" ]; then
  case "$endpoint" in http://*|https://*) ;; *) die "S3 endpoint must be an http(s) URL, got $endpoint" ;; esac
  "$DVC" remote modify --local "$name" endpointurl "$endpoint"
fi
if [ -n "${VBIOPSY_DVC_AWS_PROFILE:-}" ]; then
  "$DVC" remote modify --local "$name" profile "$VBIOPSY_DVC_AWS_PROFILE"
fi

if [ "$store_credentials" -eq 1 ]; then
  [ -n "${AWS_ACCESS_KEY_ID:-}" ] || die "AWS_ACCESS_KEY_ID is not set (needed by --store-credentials)"
  [ -n "${AWS_SECRET_ACCESS_KEY:-}" ] || die "AWS_SECRET_ACCESS_KEY is not set (needed by --store-credentials)"
  if [ -d .git ] && ! git check-ignore -q .dvc/config.local; then
    die ".dvc/config.local is not git-ignored: restore DVC's .dvc/.gitignore before storing credentials"
  fi
  touch .dvc/config.local && chmod 600 .dvc/config.local
  # `dvc remote modify` takes the value on its command line, visible to `ps`; write the two keys
  # through DVC's Python API instead so they only ever pass through this process's environment.
  PY=${PYTHON:-python3}
  [ -x .venv/bin/python ] && PY=.venv/bin/python
  "$PY" - "$name" <<'PYEOF'
import os
import sys

from dvc.config import Config

name = sys.argv[1]
config = Config.from_cwd()
with config.edit("local") as local:
    remote = local.setdefault("remote", {}).setdefault(name, {})
    remote["access_key_id"] = os.environ["AWS_ACCESS_KEY_ID"]
    remote["secret_access_key"] = os.environ["AWS_SECRET_ACCESS_KEY"]
PYEOF
  chmod 600 .dvc/config.local
fi

echo "DVC remote '$name' -> $url${endpoint:+ (endpoint $endpoint)}; default remote set."
echo "Secrets: $([ "$store_credentials" -eq 1 ] && echo 'in .dvc/config.local (git-ignored)' || echo 'read from the environment at push/pull time')."
