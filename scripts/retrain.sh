#!/usr/bin/env bash
# Retraining, as CI's .github/workflows/retrain.yml runs it (and `make retrain`, and the compose
# trainer): pull data, reproduce the pipeline (the gate is its last stage), diff metrics and
# params against a base git ref, push outputs.
#
#   RETRAIN_BASE_REF         ref to diff against; default main, or HEAD~ when on main itself
#   RETRAIN_SUMMARY          where the markdown summary goes (default reports/retrain/summary.md);
#                            also appended to $GITHUB_STEP_SUMMARY when that is set
#   RETRAIN_REQUIRE_REMOTE   1: fail when no DVC remote is configured or it cannot be reached
#                            (CI sets it); default 0: warn and work on local data
#   VBIOPSY_DVC_REMOTE_URL   when set, configure the remote first (scripts/dvc_s3_remote.sh)
#   DVC                      dvc executable (default: .venv/bin/dvc, else dvc on PATH)
# Extra arguments go to `dvc repro` (e.g. --force, a stage name).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(git rev-parse --show-toplevel 2>/dev/null) || { echo "retrain.sh: not inside a git repository" >&2; exit 1; }
cd "$root"

# dvc.yaml's stages run `python -m virtual_biopsy.stages...`: that must be the project's venv.
[ -x .venv/bin/python ] && export PATH="$PWD/.venv/bin:$PATH"
if [ -z "${DVC:-}" ]; then
  if [ -x .venv/bin/dvc ]; then DVC=.venv/bin/dvc; else DVC=dvc; fi
fi
require_remote=${RETRAIN_REQUIRE_REMOTE:-0}
summary=${RETRAIN_SUMMARY:-reports/retrain/summary.md}
say() { printf '\n== %s\n' "$*"; }
warn() { printf 'retrain.sh: warning: %s\n' "$*" >&2; }
die() { printf 'retrain.sh: %s\n' "$*" >&2; exit 1; }

# --- 1. remote ------------------------------------------------------------------------------
if [ -n "${VBIOPSY_DVC_REMOTE_URL:-}" ]; then
  say "configuring the DVC remote from the environment"
  bash "$here/dvc_s3_remote.sh"
fi
remote=$("$DVC" remote default 2>/dev/null || true)
remote=${remote//[[:space:]]/}

# --- 2. pull --------------------------------------------------------------------------------
if [ -n "$remote" ]; then
  say "dvc pull from remote '$remote'"
  # --allow-missing: outputs of stages that never ran on the remote are simply rebuilt below.
  if ! "$DVC" pull --allow-missing; then
    [ "$require_remote" = 1 ] && die "dvc pull from remote '$remote' failed (unreachable or no access)"
    warn "dvc pull from remote '$remote' failed (unreachable or no access); continuing with local data"
    remote_ok=0
  else
    remote_ok=1
  fi
else
  [ "$require_remote" = 1 ] && die "no default DVC remote configured (set VBIOPSY_DVC_REMOTE_URL or run scripts/dvc_s3_remote.sh)"
  warn "no default DVC remote configured: no pull, no push (scripts/dvc_s3_remote.sh sets one up)"
  remote_ok=0
fi

# --- 3. reproduce: every stage, the gate last ---------------------------------------------
say "dvc repro $*"
"$DVC" repro "$@"
# Nothing may be left stale: a stage that did not run means the gate did not judge this state.
if ! "$DVC" status --quiet; then
  "$DVC" status
  die "pipeline outputs are out of date after dvc repro"
fi

# --- 4. diff against the base ref ---------------------------------------------------------
base=${RETRAIN_BASE_REF:-}
if [ -z "$base" ]; then
  branch=$(git rev-parse --abbrev-ref HEAD 2>/dev/null || echo HEAD)
  if [ "$branch" = main ]; then base=HEAD~; else base=main; fi
fi
mkdir -p "$(dirname "$summary")"
{
  echo "## Retraining on $(git rev-parse --short HEAD) against \`$base\`"
  echo
  if git rev-parse --verify --quiet "$base^{commit}" >/dev/null; then
    echo "### Metrics"
    echo
    "$DVC" metrics diff "$base" --md --all || echo "_dvc metrics diff failed_"
    echo
    echo "### Params"
    echo
    "$DVC" params diff "$base" --md --all || echo "_dvc params diff failed_"
  else
    echo "_Base ref \`$base\` does not exist here: no diff._"
    echo
    echo "### Metrics"
    echo
    "$DVC" metrics show --md || true
  fi
} > "$summary.tmp"
mv "$summary.tmp" "$summary"
say "summary ($summary)"
cat "$summary"
if [ -n "${GITHUB_STEP_SUMMARY:-}" ]; then
  cat "$summary" >> "$GITHUB_STEP_SUMMARY"
fi

# --- 5. push --------------------------------------------------------------------------------
if [ -n "$remote" ]; then
  if [ "$remote_ok" = 1 ] || [ "$require_remote" = 1 ]; then
    say "dvc push to remote '$remote'"
    "$DVC" push
  else
    warn "skipping dvc push: remote '$remote' was not reachable at pull time"
  fi
fi
say "retraining done"
