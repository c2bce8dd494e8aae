"""Screenshots of the MLflow UI as a user would use it after `make demo`.

Starts `mlflow ui` on the project's store (loopback, a free port), opens it in headless
Chromium (Debian's `chromium`), and saves PNGs under reports/ui/:

  runs_setting_<setting>.png   the experiment's runs filtered to one fusion setting
  compare_settings_<arch>.png  a run comparison across the settings of one architecture
  runs_all.png                 the experiment's runs, nested under the pipeline run

Usage:  .venv/bin/python scripts/mlflow_ui_screenshots.py [--root .] [--setting "F+Ĉ"] [--arch resnet18]
The server it starts is stopped (by PID) before the script exits.
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from virtual_biopsy.mlops import tracking

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--window-size=1600,1000", "--virtual-time-budget=20000",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ui(root: Path, port: int) -> subprocess.Popen:
    mlflow = Path(sys.executable).with_name("mlflow")
    uri = tracking.tracking_uri(root)
    process = subprocess.Popen(
        [str(mlflow), "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if answer.status == 200:
                    return process
        except OSError:
            time.sleep(1)
    process.kill()
    raise RuntimeError(f"mlflow ui did not answer on 127.0.0.1:{port} within 90 s")


def screenshot(chromium: str, url: str, out: Path) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={out}", url],
            check=True, capture_output=True, timeout=120,
        )
    print(f"wrote {out}")


def evaluate_runs(client, experiment_id: str, arch: str) -> list:
    """The evaluate stage's per-setting child runs of one architecture, newest pipeline first."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.stage = 'evaluate' and tags.arch = '{arch}' and tags.fold = 'all'",
        order_by=["attributes.start_time DESC"], max_results=50,
    )
    latest: dict[str, object] = {}
    for run in runs:  # newest first: keep one run per setting
        latest.setdefault(run.data.tags.get("setting", ""), run)
    return [run for setting, run in latest.items() if setting and "robustness" not in run.data.tags.get("mlflow.runName", "")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".", type=Path)
    parser.add_argument("--setting", default="F+Ĉ", help="fusion setting to filter on (F, C, Ĉ, F+C, F+Ĉ)")
    parser.add_argument("--arch", default="resnet18")
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("chromium is not installed (Debian: apt-get install chromium)", file=sys.stderr)
        return 1
    client = tracking.get_client(args.root)
    experiment_id = tracking.experiment_id(client, args.root)
    runs = evaluate_runs(client, experiment_id, args.arch)
    if not runs:
        print(f"no evaluate runs for {args.arch} in {tracking.tracking_uri(args.root)}: run `make demo` first",
              file=sys.stderr)
        return 1
    out_dir = args.root / "reports" / "ui"
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = start_ui(args.root, port)
    try:
        base = f"http://127.0.0.1:{port}/#/experiments/{experiment_id}"
        screenshot(chromium, f"{base}/runs", out_dir / "runs_all.png")
        search = urllib.parse.quote(f"tags.setting = '{args.setting}'")
        safe = args.setting.replace("+", "plus").replace("Ĉ", "Chat")
        screenshot(chromium, f"{base}/runs?searchFilter={search}", out_dir / f"runs_setting_{safe}.png")
        ids = json.dumps([run.info.run_id for run in runs])
        compare = (f"http://127.0.0.1:{port}/#/compare-runs?runs={urllib.parse.quote(ids)}"
                   f"&experiments={urllib.parse.quote(json.dumps([experiment_id]))}")
        screenshot(chromium, compare, out_dir / f"compare_settings_{args.arch}.png")
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
