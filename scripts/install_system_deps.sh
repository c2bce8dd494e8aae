#!/usr/bin/env bash
# Debian packages the test suite needs: PostgreSQL server binaries (tests start a throwaway
# cluster on loopback themselves), dicom3tools (dciodvfy validates the DICOM we write) and
# Chromium (headless: the MLflow UI links open in model-training mode; the UI screenshots; the
# dvc plots page draws offline).
# Idempotent: does nothing when they are already there.
set -euo pipefail
need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)   # DICOM IOD validator (tests/test_dicom_write.py)
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
  || need+=(chromium)   # headless browser (tests/test_mlflow_ui.py, tests/test_dvc_plots.py,
  #   scripts/mlflow_ui_screenshots.py)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "Missing Debian packages: ${need[*]}. Install them with: sudo apt-get install ${need[*]}" >&2
  exit 1
fi
echo "Installing Debian packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian starts a default cluster on install; the tests use their own, so stop it.
if command -v pg_ctlcluster >/dev/null 2>&1; then
  for c in $(pg_lsclusters -h 2>/dev/null | awk '{print $1"/"$2}'); do pg_ctlcluster ${c%/*} ${c#*/} stop || true; done
fi
