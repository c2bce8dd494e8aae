"""`dvc plots show` on a real pipeline run gives a page a user can open: it renders without a
network, draws one ROC curve per architecture and setting, and shows Figures 3, 4 and 5."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from tiny_pipeline import BIN, REPO

pytestmark = pytest.mark.slow

SETTINGS = ("F", "C", "Ĉ", "F+C", "F+Ĉ")
_spec = importlib.util.spec_from_file_location("dvc_plots_template", REPO / "scripts" / "dvc_plots_template.py")
plots_template = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plots_template)


def _dvc(root: Path, *args: str) -> str:
    done = subprocess.run([str(BIN / "dvc"), *args], cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"})
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _offline_template() -> Path:
    page = plots_template.DEFAULT_OUT
    if not page.exists() or plots_template.MARKER not in page.read_text(encoding="utf-8"):
        pytest.skip(f"{page} is not the offline page: `make install` writes it (npm fetches Vega)")
    return page


def test_the_project_points_dvc_at_the_offline_page_template():
    configured = _dvc(REPO, "config", "plots.html_template").strip()
    assert (REPO / ".dvc" / configured).resolve() == plots_template.DEFAULT_OUT.resolve()


@pytest.mark.xdist_group("tiny_pipeline")
@pytest.mark.timeout(1800)  # the first test of the group pays for the session's two pipeline runs
def test_roc_plot_draws_one_curve_per_architecture_and_setting(tiny_pipeline_run):
    spec = json.loads(_dvc(tiny_pipeline_run, "plots", "show", "--show-vega", "reports/evaluation/roc.csv"))
    encoding = spec["encoding"]
    assert (encoding["color"]["field"], encoding["column"]["field"], encoding["strokeDash"]["field"]) == (
        "setting", "arch", "rev")
    archs = yaml.safe_load((tiny_pipeline_run / "params.yaml").read_text())["classifier"]["architectures"]
    curves = {(point["arch"], point["setting"]) for point in spec["data"]["values"]}
    assert curves == {(arch, setting) for arch in archs for setting in SETTINGS}


@pytest.mark.xdist_group("tiny_pipeline")
@pytest.mark.timeout(1800)  # the first test of the group pays for the session's two pipeline runs
def test_reliability_plot_has_a_panel_per_setting_with_before_and_after_calibration(tiny_pipeline_run):
    spec = json.loads(_dvc(tiny_pipeline_run, "plots", "show", "--show-vega", "reports/evaluation/reliability.csv"))
    assert (spec["encoding"]["color"]["field"], spec["encoding"]["facet"]["field"]) == ("calibration", "panel")
    archs = yaml.safe_load((tiny_pipeline_run / "params.yaml").read_text())["classifier"]["architectures"]
    values = spec["data"]["values"]
    assert {(p["arch"], p["setting"]) for p in values} == {(arch, s) for arch in archs for s in SETTINGS}
    assert {p["calibration"] for p in values} == {"before", "after"}
    assert all(0 <= float(p["mean_p"]) <= 1 and 0 <= float(p["observed"]) <= 1 for p in values)


@pytest.mark.xdist_group("tiny_pipeline")
@pytest.mark.timeout(1800)  # the first test of the group pays for the session's two pipeline runs
def test_plots_page_renders_offline_with_figures_3_to_5(tiny_pipeline_run, tmp_path):
    template = _offline_template()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium missing; scripts/install_system_deps.sh installs it")
    out = tmp_path / "dvc_plots"
    _dvc(tiny_pipeline_run, "plots", "show", "--html-template", str(template), "-o", str(out))
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "<script src=" not in page  # nothing to fetch: Vega is inlined
    for figure in ("figure3_CC.png", "figure3_MLO.png", "figure4.png", "figure5.png"):
        assert figure in page, figure
    # Network off (a dead proxy, no name resolution): Vega must still draw the canvases of the two
    # data plots, ROC and reliability (before / after calibration).
    dom = subprocess.run(
        [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--proxy-server=http://127.0.0.1:9",
         "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=15000", "--dump-dom",
         (out / "index.html").as_uri()],
        capture_output=True, text=True, timeout=120, check=True).stdout
    assert dom.count('class="marks"') == 2, dom[-2000:]
