#!/usr/bin/env bash
# `make demo`: the whole pipeline on the embedded synthetic dataset, then where to look.
set -euo pipefail
cd "$(dirname "$0")/.."
# `make install`'s venv, named here: nothing is activated, and dvc.yaml's stage commands find it
# on their own (scripts/python.sh).
bin=.venv/bin

if [ ! -d data/raw/images ]; then
  echo "==> Synthesising the embedded dataset into data/raw (deterministic: it matches data.dvc)"
  "$bin/vbiopsy" synth --out data/raw
fi

echo "==> Checking data/raw against data.dvc"
# On a fresh clone the DVC cache is empty: DVC then says "not in cache" for data whose content
# matches data.dvc; only "modified" (or "deleted") means the data differ from the recorded version.
state=$("$bin/dvc" status data.dvc --json | "$bin/python" -c '
import json, sys
changes = json.load(sys.stdin).get("data.dvc", [])
print(" ".join(sorted({s for c in changes for s in c.get("changed outs", {}).values()})))')
case "$state" in
  "") ;;
  "not in cache") "$bin/dvc" commit -q -f data.dvc ;;   # same content: just put it in the cache
  *)
    echo "data/raw differs from the version data.dvc records ($state; dvc status data.dvc shows how)." >&2
    echo "Either restore it (rm -rf data/raw && make demo) or record the new version (dvc commit -f data.dvc; see README)." >&2
    exit 1 ;;
esac

# One parent MLflow run for this pipeline run: every stage's run nests under it.
VBIOPSY_PARENT_RUN_ID="$("$bin/vbiopsy" pipeline start)"
export VBIOPSY_PARENT_RUN_ID
# If dvc repro fails or is stopped, the parent still ends: KILLED when a stage was killed, else FAILED.
trap '"$bin/vbiopsy" pipeline finish --aborted "$VBIOPSY_PARENT_RUN_ID" || true' EXIT

echo "==> dvc repro (stages that are up to date are skipped)"
"$bin/dvc" repro

trap - EXIT
"$bin/vbiopsy" pipeline finish "$VBIOPSY_PARENT_RUN_ID"
"$bin/vbiopsy" pipeline summary
