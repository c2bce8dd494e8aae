"""Screenshots of the MLflow UI as a user would use it after `make demo`.

Starts `mlflow ui` on the project's store (loopback, a free port), opens the pages that
`vbiopsy pipeline summary` points to in headless Chromium (Debian's `chromium`), each in a fresh
browser profile, and saves PNGs under reports/ui/:

  runs_all.png                 the experiment's runs with the newest pipeline run and every run
                               under it expanded (pipeline > stage > view/architecture/fold/setting),
                               tall enough to show them all, with their datasets and durations
  runs_setting_<setting>.png   the runs of one fusion setting (tags.setting), flat and ordered by
                               test AUC, with their test metrics and what they were computed from
  compare_settings_<arch>.png  MLflow's run comparison of the settings of one architecture (the
                               newest evaluate run's), the whole page: plot, params, metrics

Every page opens in MLflow's model-training mode (ui_links.UI_MODE). The browser is driven over
the DevTools protocol on a pipe: the script waits until the page shows the runs it names (and no
GenAI navigation), closes the assistant panel, expands rows, widens the run-name column and
ticks metric columns as a user would, then saves the page; a page that never shows what it
should is named in a one-line error (exit 1).

Usage:  .venv/bin/python scripts/mlflow_ui_screenshots.py [--root .] [--setting "F+Ĉ"] [--arch resnet18]
The server and browsers it starts are stopped (by PID) before the script exits.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from virtual_biopsy.mlops import tracking, ui_links

WIDTH, HEIGHT = 1600, 1000
PAGE_TIMEOUT_S = 90.0
# GenAI-mode navigation: present when the UI did not open in model-training mode.
GENAI_MARKERS = ("Training runs", "Judges", "Sessions", "Prompts & versions")
# Clicks every "expand" button of the runs table (its icon is a square with a plus) and says how many.
EXPAND_ROWS_JS = """
(() => {
  const buttons = [...document.querySelectorAll('button[data-component-id$="runnamecellrenderer.tsx_46"]')]
    .filter(b => (b.querySelector('path') || {getAttribute: () => ''}).getAttribute('d').startsWith('M7.25 7.25V4.5'));
  buttons.forEach(b => b.click());
  return buttons.length;
})()
"""
# Closes the "MLflow Assistant" side panel, open by default in a fresh profile.
CLOSE_ASSISTANT_JS = """
(() => {
  const close = document.querySelector('button[data-component-id="mlflow.assistant.chat_panel.close"]');
  if (close) close.click();
  return Boolean(close);
})()
"""
# How many pixels the tallest scrolling panel of the page hides below its visible part.
HIDDEN_HEIGHT_JS = """
(() => {
  let hidden = 0;
  for (const e of document.querySelectorAll('*')) {
    const overflow = getComputedStyle(e).overflowY;
    if ((overflow === 'auto' || overflow === 'scroll') && e.scrollHeight - e.clientHeight > hidden) {
      hidden = e.scrollHeight - e.clientHeight;
    }
  }
  return hidden;
})()
"""
# Ticks (on = true) or unticks one column, by its name, in the open "Columns" selector of the runs table.
TICK_COLUMN_JS = """
((name, on) => {
  const title = document.querySelector(`.du-bois-light-tree-node-content-wrapper[title="${name}"]`);
  const box = title && title.parentElement.querySelector('.du-bois-light-tree-checkbox');
  if (box && box.className.includes('checked') !== on) box.click();
  return Boolean(box);
})
"""
# A point on the resize handle of a column header (its left half: the right half lies under the
# next header, where a press sorts by that column), to drag the column wider; null when none.
RESIZE_HANDLE_JS = """
(name => {
  const header = [...document.querySelectorAll('.ag-header-cell')].find(h => h.textContent.trim() === name);
  const handle = header && header.querySelector('.ag-header-cell-resize');
  if (!handle) return null;
  const box = handle.getBoundingClientRect();
  for (let x = box.x + 1; x < box.x + box.width; x++) {
    if (document.elementFromPoint(x, box.y + box.height / 2) === handle) return [x, box.y + box.height / 2];
  }
  return null;
})
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(process: subprocess.Popen, timeout: float = 20.0) -> None:
    """Stop a process started in its own session: its process group, by its PID."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@contextlib.contextmanager
def mlflow_ui(root: Path, port: int):
    """`mlflow ui` on the project's store at 127.0.0.1:port (one worker), stopped on exit."""
    mlflow = Path(sys.executable).with_name("mlflow")
    uri = tracking.tracking_uri(root)
    process = subprocess.Popen(
        [str(mlflow), "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"mlflow ui exited with code {process.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow ui did not answer on 127.0.0.1:{port} within 180 s") from None
                time.sleep(1)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process, timeout=5.0)  # its job runners do not end on SIGTERM; nothing of theirs is needed


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
    JSON messages separated by NUL bytes, commands on the browser's fd 3, answers on its fd 4), so
    nothing listens on a port and no client library is needed. A fresh profile folder per browser."""

    def __init__(self, chromium: str) -> None:
        self.profile = tempfile.mkdtemp(prefix="vbiopsy-chromium-")
        commands_r, self._commands = os.pipe()
        self._answers, answers_w = os.pipe()
        # Above 9 first, so that moving them to 3 and 4 cannot overwrite one another.
        high_r, high_w = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (commands_r, answers_w))

        def on_fds_3_and_4() -> None:
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self.process = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--remote-debugging-pipe", f"--user-data-dir={self.profile}", f"--window-size={WIDTH},{HEIGHT}",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            pass_fds=(3, 4), preexec_fn=on_fds_3_and_4,  # noqa: PLW1509 - single-threaded here
        )
        for fd in (commands_r, answers_w, high_r, high_w):
            os.close(fd)
        self._next_id, self._buffer = 0, b""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.resize(HEIGHT)

    def resize(self, height: int) -> None:
        """The page's viewport: WIDTH x ``height`` CSS pixels."""
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=WIDTH, height=int(height),
                  deviceScaleFactor=1, mobile=False)

    def call(self, method: str, session: bool = False, timeout: float = 60.0, **params):
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                answer = json.loads(raw)
                if answer.get("id") == self._next_id:
                    if "error" in answer:
                        raise RuntimeError(f"{method}: {answer['error']}")
                    return answer.get("result", {})
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._answers], [], [], left)[0]:
                raise RuntimeError(f"chromium did not answer {method} within {timeout:.0f} s")
            chunk = os.read(self._answers, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buffer += chunk

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def open(self, url: str) -> None:
        self.call("Page.navigate", session=True, url=url)

    def wait_for(self, what: str, condition, timeout: float = PAGE_TIMEOUT_S) -> str:
        """Poll the page's text until ``condition(text)``; raise naming ``what`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.text()
            if condition(text):
                return text
            time.sleep(0.5)
        raise RuntimeError(f"{what}: not shown within {timeout:.0f} s; the page says: {text[:400]!r}")

    def screenshot(self, out: Path, full_page: bool = False) -> None:
        """A PNG of the viewport, or with ``full_page`` of the whole scrollable page."""
        if full_page:  # the UI scrolls inside a panel, not the page: grow the viewport by what it hides
            hidden = self.evaluate(HIDDEN_HEIGHT_JS) or 0
            self.resize(min(HEIGHT + int(hidden) + 20, 4000))
            time.sleep(1.5)
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        out.write_bytes(base64.b64decode(data))
        print(f"wrote {out}")

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            self.call("Browser.close", timeout=10)
        for fd in (self._commands, self._answers):
            with contextlib.suppress(OSError):
                os.close(fd)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            stop(self.process)
        shutil.rmtree(self.profile, ignore_errors=True)


@contextlib.contextmanager
def fresh_browser(chromium: str):
    browser = Browser(chromium)
    try:
        yield browser
    finally:
        browser.close()


def model_training_page(text: str) -> bool:
    return "Model registry" in text and not any(marker in text for marker in GENAI_MARKERS)


def settle(browser: Browser) -> None:
    """Close MLflow's assistant panel (it covers a third of the page) and let the table redraw."""
    browser.evaluate(CLOSE_ASSISTANT_JS)
    time.sleep(1.5)


def click_at(browser: Browser, x: float, y: float, to_x: float | None = None) -> None:
    """A mouse press at (x, y) and its release there, or at (to_x, y) after a drag."""
    browser.call("Input.dispatchMouseEvent", session=True, type="mousePressed", x=x, y=y, button="left", clickCount=1)
    if to_x is not None:
        for step in range(1, 11):
            browser.call("Input.dispatchMouseEvent", session=True, type="mouseMoved", x=x + (to_x - x) * step / 10,
                         y=y, button="left")
        x = to_x
    browser.call("Input.dispatchMouseEvent", session=True, type="mouseReleased", x=x, y=y, button="left", clickCount=1)


def widen_column(browser: Browser, name: str, by: int) -> None:
    """Drag the right edge of a runs-table column ``by`` pixels (long nested run names fit)."""
    at = browser.evaluate(f"({RESIZE_HANDLE_JS})({json.dumps(name)})")
    if at:
        click_at(browser, at[0], at[1], at[0] + by)
        time.sleep(0.5)


def show_columns(browser: Browser, names: list[str], hide: tuple[str, ...] = ()) -> None:
    """Tick ``names`` (metric or param names) in the runs table's Columns selector and untick
    ``hide``, then close it."""
    browser.evaluate("[...document.querySelectorAll('button')].find(b => b.textContent.trim() === 'Columns').click()")
    time.sleep(1.5)
    for name in hide:
        browser.evaluate(f"({TICK_COLUMN_JS})({json.dumps(name)}, false)")
    missing = [name for name in names if not browser.evaluate(f"({TICK_COLUMN_JS})({json.dumps(name)}, true)")]
    if missing:
        raise RuntimeError(f"runs table: no column {missing} to show")
    browser.call("Input.dispatchKeyEvent", session=True, type="keyDown", key="Escape", code="Escape",
                 windowsVirtualKeyCode=27)
    browser.call("Input.dispatchKeyEvent", session=True, type="keyUp", key="Escape", code="Escape",
                 windowsVirtualKeyCode=27)
    time.sleep(1.0)


def runs_all(browser: Browser, url: str, names: list[str], out: Path, rows: int = 30) -> None:
    """The runs table with the newest pipeline run and its stage runs expanded, tall enough for ``rows``."""
    browser.resize(max(HEIGHT, min(330 + 33 * rows, 4000)))
    browser.open(url)
    browser.wait_for("runs table (model training)", lambda t: "Run Name" in t and names[0] in t and
                     model_training_page(t))
    settle(browser)
    for _ in range(4):  # pipeline, then its stages (each expansion reveals the next level)
        if not browser.evaluate(EXPAND_ROWS_JS):
            break
        time.sleep(2.0)
    browser.wait_for("nested runs", lambda t: all(n in t for n in names))
    widen_column(browser, "Run Name", 160)
    browser.screenshot(out)


def runs_of_setting(browser: Browser, url: str, names: list[str], out: Path) -> None:
    """The runs of one setting, flat (ordered by test AUC), with their test metric columns."""
    browser.open(url)
    browser.wait_for("runs of the setting", lambda t: all(n in t for n in names) and model_training_page(t))
    settle(browser)
    widen_column(browser, "Run Name", 60)
    show_columns(browser, ["test_auc", "test_gmean", "test_mcc", "cesm_images", "fusion", "synthetic_share"],
                 hide=("Source", "Models"))
    browser.screenshot(out)


def comparison(browser: Browser, url: str, names: list[str], out: Path) -> None:
    """MLflow's comparison page, whole: the plot, then every param and metric side by side."""
    browser.open(url)
    browser.wait_for("run comparison", lambda t: "Comparing" in t and all(n in t for n in names)
                     and "Model registry" in t)
    settle(browser)
    browser.screenshot(out, full_page=True)


def newest_pipeline(client, experiment_id: str):
    found = client.search_runs([experiment_id], filter_string="tags.stage = 'pipeline'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    return found[0] if found else None


def evaluate_runs(client, experiment_id: str, arch: str) -> list:
    """The evaluate stage's per-setting runs of one architecture, of the newest pipeline run."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"{ui_links.EVALUATE_SETTINGS_FILTER} and tags.arch = '{arch}'",
        order_by=["attributes.start_time DESC"], max_results=50,
    )
    latest: dict[str, object] = {}
    for run in runs:  # newest first: keep one run per setting
        latest.setdefault(run.data.tags.get("setting", ""), run)
    return [run for setting, run in latest.items() if setting]


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
    pipeline = newest_pipeline(client, experiment_id)
    if not runs or pipeline is None:
        print(f"no evaluate runs for {args.arch} in {tracking.tracking_uri(args.root)}: run `make demo` first",
              file=sys.stderr)
        return 1
    stages = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{pipeline.info.run_id}'")
    key = pipeline.data.tags.get(tracking.PIPELINE_KEY_TAG, "")
    pipeline_runs = client.search_runs([experiment_id], filter_string=f"tags.{tracking.PIPELINE_KEY_TAG} = '{key}'",
                                       max_results=1000)
    setting_runs = client.search_runs([experiment_id], filter_string=f"tags.setting = '{args.setting}'")
    out_dir = args.root / "reports" / "ui"
    out_dir.mkdir(parents=True, exist_ok=True)
    safe = args.setting.replace("+", "plus").replace("Ĉ", "Chat")
    try:
        with mlflow_ui(args.root, free_port()) as base:
            pages = [
                (runs_all, ui_links.runs_link(base, experiment_id),
                 [pipeline.info.run_name, *sorted({r.info.run_name for r in stages})[:3]], out_dir / "runs_all.png"),
                (runs_of_setting, ui_links.runs_link(base, experiment_id, f"tags.setting = '{args.setting}'",
                                                     "metrics.`test_auc`"),
                 sorted({r.info.run_name for r in setting_runs})[:3], out_dir / f"runs_setting_{safe}.png"),
                (comparison, ui_links.compare_runs_link(base, experiment_id, [r.info.run_id for r in runs]),
                 [r.info.run_name for r in runs], out_dir / f"compare_settings_{args.arch}.png"),
            ]
            for take, url, names, out in pages:
                with fresh_browser(chromium) as browser:
                    if take is runs_all:
                        runs_all(browser, url, names, out, rows=len(pipeline_runs))
                    else:
                        take(browser, url, names, out)
    except RuntimeError as exc:
        print(f"mlflow_ui_screenshots: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
