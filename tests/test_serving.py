"""`mlflow models serve` of the champion answers a real HTTP scoring request with the pyfunc's p,
and refuses bad requests with HTTP 400 whose message is the project's sentence (no stack trace)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from virtual_biopsy.mlops import tracking
from virtual_biopsy.serving import fused_model

URI = "models:/virtual-biopsy-resnet18@champion"
SIZE = 32  # conftest.FUSED_SIZE
COLUMNS = list(fused_model.INPUT_COLUMNS)


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


@pytest.fixture(scope="module")
def served(gated_project, tmp_path_factory):
    """The champion behind a real `mlflow models serve` on loopback; yields its port."""
    workdir = tmp_path_factory.mktemp("serve")
    port = _free_port()
    bin_dir = Path(sys.executable).parent  # mlflow runs `uvicorn` from PATH: the venv's
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.embedded_store(gated_project)[0],
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(workdir / "serve.log", "w") as log:
        proc = subprocess.Popen([str(bin_dir / "mlflow"), "models", "serve", "-m", URI, "--env-manager", "local",
                                 "-p", str(port), "-h", "127.0.0.1", "-w", "1"],
                                env=env, cwd=workdir, start_new_session=True, stdout=subprocess.DEVNULL, stderr=log)
    try:
        _wait_ready(port, proc)
        yield port
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server's process group: started in its own session
            proc.wait(timeout=30)


def _score(port: int, columns: list[str], rows: list[list]) -> tuple[int, str]:
    body = {"dataframe_split": {"columns": columns, "data": rows}}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _images(n: int, size: int = SIZE, seed: int = 5) -> list[str]:
    rng = np.random.default_rng(seed)
    return [fused_model.encode_image(rng.random((size, size), dtype=np.float32)) for _ in range(n)]


def test_served_champion_answers_a_scoring_request_with_the_same_p(served, gated_project):
    images = _images(4)
    rows = [images, [images[0], images[1], None, None]]
    status, text = _score(served, COLUMNS, rows)
    assert status == 200, text
    predictions = json.loads(text)["predictions"]

    import mlflow
    import pandas as pd

    from virtual_biopsy.mlops.registry import _fluent_store

    with _fluent_store(gated_project):
        local = mlflow.pyfunc.load_model(URI).predict(pd.DataFrame(rows, columns=COLUMNS))
    assert [r["p"] for r in predictions] == pytest.approx(local["p"].tolist(), abs=1e-6)
    assert [r["cesm_cc_synthetic"] for r in predictions] == [False, True]
    # the served answer carries the calibrated p, the fold spread, the conformal set and the imputed flags
    assert list(predictions[0]) == list(fused_model.OUTPUT_COLUMNS)
    for served, row in zip(predictions, local.to_dict("records")):
        for column in ("p_calibrated", "p_uncalibrated", "p_fold_sd", "p_fold_min", "p_fold_max", "conformal_level"):
            assert served[column] == pytest.approx(row[column], abs=1e-6)
        assert (served["conformal_set"], served["setting"], served["n_folds"]) == \
            (row["conformal_set"], row["setting"], row["n_folds"])
    assert [(r["setting"], r["imputed_cc"], r["imputed_mlo"]) for r in predictions] == \
        [("F+C", False, False), ("F+Ĉ", True, True)]


IMAGES = _images(4)
BAD_REQUESTS = {
    "mistyped column": (["ffdm_cc", "ffdm_mlo", "cesm_cc", "cesm_MLO"], [IMAGES],
                        "unknown column(s) 'cesm_MLO' (did you mean 'cesm_mlo'?); the pipeline takes exactly "
                        "['ffdm_cc', 'ffdm_mlo', 'cesm_cc', 'cesm_mlo'] (null in a CESM column: imputed)"),
    "missing column": (COLUMNS[:3], [IMAGES[:3]],
                       "input lacks column(s) ['cesm_mlo']; send all of ['ffdm_cc', 'ffdm_mlo', 'cesm_cc', 'cesm_mlo'], "
                       "with null for a CESM view that was not acquired (it is then imputed)"),
    "non-base64 image": (COLUMNS, [["not base64!", IMAGES[1], None, None]],
                         "row 0 ffdm_cc: not valid base64 (Only base64 data is allowed)"),
    "wrong-size image": (COLUMNS, [IMAGES[:3] + _images(1, size=16)],
                         "row 0 cesm_mlo: 1024 bytes, expected 4096 (float32 32 x 32, the pipeline's image size)"),
    "null FFDM image": (COLUMNS, [[IMAGES[0], None, None, None]],
                        "breast 0: no FFDM MLO image; the pipeline needs FFDM CC and MLO"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_refused_with_400_and_the_projects_message_only(served, case):
    columns, rows, message = BAD_REQUESTS[case]
    status, text = _score(served, columns, rows)
    assert status == 400, text
    body = json.loads(text)
    assert body["message"] == message
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "stack_trace" not in body
    for leak in ("Traceback", "/work", ".py", "Failed to predict data"):
        assert leak not in text, f"{leak!r} in {text}"
