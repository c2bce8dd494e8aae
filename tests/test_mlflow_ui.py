"""The MLflow UI links the project prints open the runs table in model-training mode, in a fresh browser.

MLflow 3.17's UI starts every browser in GenAI mode (Overview, Traces, Sessions, "Training runs")
and ignores the experiment's ``mlflow.experimentKind`` tag; only a ``workflowType`` URL parameter
(ui_links.UI_MODE) switches it. So this starts a real `mlflow ui` on 127.0.0.1 over a small store,
loads every link `vbiopsy pipeline summary`, the README and the screenshot script print in headless
Chromium with a new profile each (``--user-data-dir`` a new folder: no localStorage), and reads the
rendered page (``--dump-dom`` after a virtual-time budget).
"""
from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from browser import VisibleText, chromium, needs_chromium
from stack import free_port, stop_process

from virtual_biopsy.cli.main import main as vbiopsy
from virtual_biopsy.core.config import Params
from virtual_biopsy.mlops import tracking, ui_links

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# Navigation and headings of GenAI mode; none may show on a model-training page.
GENAI_MARKERS = ("Training runs", "Overview", "Sessions", "Judges", "Prompts & versions")
PRINTED_URL = re.compile(r"http://127\.0\.0\.1:5000/#/[^\s`'\")]+")



def page_text(url: str) -> str:
    """The visible text of ``url`` as a fresh headless Chromium profile renders it."""
    with tempfile.TemporaryDirectory(prefix="vbiopsy-profile-") as profile:
        done = chromium(["--virtual-time-budget=30000", "--dump-dom", url], profile, window="1600,1000", timeout=180)
    parser = VisibleText()
    parser.feed(done.stdout)
    return " | ".join(parser.parts)


@pytest.fixture(scope="module")
def store(tmp_path_factory, monkeypatch_module) -> Path:
    """A project whose embedded store holds a pipeline run: ingest, and evaluate with two settings."""
    root = tmp_path_factory.mktemp("ui-store")
    params = Params()
    with tracking.stage_run("ingest", root=root, params=params) as run:
        run.log_metrics({"ingest.accepted": 10})
    with tracking.stage_run("evaluate", root=root, params=params, tags={"archs": "resnet18"}) as run:
        for setting, share, auc in (("F", "n/a", 0.61), ("F+Ĉ", 100, 0.72)):
            with run.child(f"resnet18 {setting}", tags={"arch": "resnet18", "setting": setting, "fold": "all",
                                                         "synthetic_share": share}) as child:
                child.log_metrics({"test_auc": auc})
    return root


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv(tracking.PARENT_RUN_ENV, raising=False)
        yield patch


@pytest.fixture(scope="module")
def ui(store) -> str:
    """`mlflow ui` on the store at 127.0.0.1 (a free port); stopped by PID afterwards."""
    port = free_port()
    log = store / "ui.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "ui", "--backend-store-uri", tracking.tracking_uri(store),
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                assert time.monotonic() < deadline, f"mlflow ui not up after 180 s:\n{log.read_text()[-3000:]}"
                time.sleep(1)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(process, timeout=5.0)  # uvicorn and its job runners: no need to wait for a graceful end


def printed_urls(store: Path, capsys) -> list[str]:
    """Every UI link the project prints: the demo's summary, the README, scripts/demo.sh."""
    capsys.readouterr()
    assert vbiopsy(["pipeline", "--root", str(store), "summary"]) == 0
    urls = PRINTED_URL.findall(capsys.readouterr().out)
    for text in ((REPO / "README.md").read_text(), (REPO / "scripts" / "demo.sh").read_text()):
        urls += PRINTED_URL.findall(text)
    return list(dict.fromkeys(urls))


def assert_model_training(url: str, text: str, *expected: str) -> None:
    assert "Model registry" in text, f"{url}: no model-training navigation in {text[:600]!r}"
    shown = [m for m in GENAI_MARKERS if m in text]
    assert not shown, f"{url}: GenAI page ({shown}): {text[:600]!r}"
    for item in expected:
        assert item in text, f"{url}: {item!r} not shown in {text[:600]!r}"


def test_printed_links_carry_the_model_training_mode(store, capsys):
    urls = printed_urls(store, capsys)
    assert len(urls) >= 3, urls  # summary: all runs, settings compared, one setting (README: the first)
    assert PRINTED_URL.findall((REPO / "README.md").read_text())
    assert all(re.search(r"[?&]workflowType=machine_learning(&|$)", url) for url in urls), urls
    assert all(url.startswith("http://127.0.0.1:5000/#/experiments/1/runs?") for url in urls), urls


@needs_chromium
def test_every_printed_link_opens_the_runs_table_in_model_training_mode(store, ui, capsys):
    texts = {}
    for printed in printed_urls(store, capsys):
        url = printed.replace("http://127.0.0.1:5000", ui)
        texts[url] = page_text(url)
        assert_model_training(url, texts[url], "Runs - Experiment", "Run Name")
    # The filtered, metric-ordered links list the runs they name (flat, not folded under a parent).
    links = ui_links.ui_links(store, port=int(ui.rsplit(":", 1)[1]))
    text = texts[links["one setting (F+Ĉ, every architecture)"]]
    assert "resnet18 F+Ĉ" in text and "resnet18 F |" not in text, text[:600]
    text = texts[links["settings compared (evaluate, by test AUC)"]]
    assert "resnet18 F+Ĉ" in text and "resnet18 F |" in text, text[:600]


@needs_chromium
def test_run_comparison_link_opens_in_model_training_mode(store, ui):
    client = tracking.get_client(store)
    exp = tracking.experiment_id(client, store)
    runs = client.search_runs([exp], filter_string="tags.setting != ''")
    url = ui_links.compare_runs_link(ui, exp, [r.info.run_id for r in runs])
    assert_model_training(url, page_text(url), "Comparing 2 Runs", "resnet18 F+Ĉ")


@needs_chromium
def test_a_link_without_the_mode_lands_in_genai_mode(store, ui):
    """The reason for UI_MODE: the experiment's kind tag alone leaves a fresh browser in GenAI mode."""
    client = tracking.get_client(store)
    exp = client.get_experiment_by_name(tracking.EXPERIMENT_NAME)
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == tracking.MODEL_TRAINING
    text = page_text(f"{ui}/#/experiments/{exp.experiment_id}/runs")
    assert "Training runs" in text, text[:600]
