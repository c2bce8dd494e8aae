"""`mlflow models serve` of the champion answers a real HTTP scoring request with the pyfunc's p."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from virtual_biopsy.mlops import tracking
from virtual_biopsy.serving import fused_model

URI = "models:/virtual-biopsy-resnet18@champion"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(port: int, proc: subprocess.Popen, limit_s: float = 180) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("mlflow models serve did not answer /ping")


def test_served_champion_answers_a_scoring_request_with_the_same_p(gated_project, tmp_path):
    rng = np.random.default_rng(5)
    images = [fused_model.encode_image(rng.random((32, 32), dtype=np.float32)) for _ in range(4)]
    body = {"dataframe_split": {"columns": list(fused_model.INPUT_COLUMNS),
                                "data": [images, [images[0], images[1], None, None]]}}
    port = _free_port()
    bin_dir = Path(sys.executable).parent  # mlflow runs `uvicorn` from PATH: the venv's
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.embedded_store(gated_project)[0],
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    mlflow_cli = str(bin_dir / "mlflow")
    proc = subprocess.Popen([mlflow_cli, "models", "serve", "-m", URI, "--env-manager", "local",
                             "-p", str(port), "-h", "127.0.0.1", "-w", "1"],
                            env=env, cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "serve.log", "w"))
    try:
        _wait_ready(port, proc)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            served = json.loads(response.read())["predictions"]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server's process group: started in its own session
            proc.wait(timeout=30)

    import mlflow
    import pandas as pd

    from virtual_biopsy.mlops.registry import _fluent_store

    with _fluent_store(gated_project):
        local = mlflow.pyfunc.load_model(URI).predict(pd.DataFrame(body["dataframe_split"]["data"],
                                                                   columns=body["dataframe_split"]["columns"]))
    assert [r["p"] for r in served] == pytest.approx(local["p"].tolist(), abs=1e-6)
    assert [r["cesm_cc_synthetic"] for r in served] == [False, True]
