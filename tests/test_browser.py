"""A real JupyterLab in a real (headless) Chromium: the dashboard, tqdm bars and %%infer render.

The suite starts JupyterLab on loopback in a temporary root directory holding a test notebook,
opens it with Playwright driving Debian's Chromium, runs every cell and asserts on the rendered
output areas (never on page text, which includes the cells' source). A screenshot goes to
test-artifacts/.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import nbformat
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.browser]

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}
SERVER_START_S = 120
MS = 1000

# The cells of the test notebook, in order; the test addresses them by these indexes.
CELLS = [
    "%load_ext kernel_ext",                                                        # 0
    "%dashboard --interval 0.5",                                                   # 1
    "from tqdm.auto import tqdm\nfor _ in tqdm(range(7), desc='items'):\n    pass",  # 2
    # 3: a long cell that holds the shell busy (and takes some memory) for a few seconds
    "import time\nprint('BUSY-START', flush=True)\nblob = bytearray(200 * 1024 * 1024)\n"
    "end = time.monotonic() + 6\nwhile time.monotonic() < end:\n    sum(range(10_000))\n"
    "del blob\nprint('BUSY-END')",
    "%model load",                                                                 # 4
    "%%infer --max-new-tokens 24\nThe capital of France is",                       # 5
]
DASH, TQDM, BUSY, LOAD, INFER = 1, 2, 3, 4, 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_notebook(path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = KERNELSPEC
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = [nbformat.v4.new_code_cell(src) for src in CELLS]
    nbformat.write(nb, path)


@pytest.fixture
def lab(tmp_path: Path, cache_dir: Path) -> Iterator[str]:
    """A JupyterLab server on a free loopback port; yields its base URL."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (make browser-deps)")
    root = tmp_path / "lab"
    root.mkdir()
    _write_notebook(root / "dashboard.ipynb")
    port = _free_port()
    home = tmp_path / "home"
    env = dict(
        os.environ,
        KERNEL_EXT_CACHE=str(cache_dir),
        JUPYTER_CONFIG_DIR=str(home / "config"),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(home / "settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
    )
    # No "official Jupyter news?" toast over the outputs in the screenshot.
    news = home / "settings" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)
    (news / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    cmd = [
        sys.executable, "-m", "jupyter", "lab", "--allow-root", "--no-browser",
        "--ip", "127.0.0.1", f"--port={port}", "--IdentityProvider.token=",
        "--ServerApp.password=", f"--ServerApp.root_dir={root}",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    log_path = tmp_path / "jupyterlab.log"
    proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        with open(log_path, "w") as log:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    try:
        while True:  # wait for the server to say it is up (no sleeping: block on its log)
            try:
                line = lines.get(timeout=SERVER_START_S)
            except queue.Empty:
                pytest.fail(f"JupyterLab did not start in {SERVER_START_S} s; see {log_path}")
            if f"127.0.0.1:{port}/lab" in line:
                break
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with {proc.returncode}: {log_path.read_text()}")
        assert httpx.get(f"{base}/lab", timeout=30).status_code == 200
        yield base
    finally:
        proc.terminate()  # by its own process id; the server shuts its kernels down
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        ARTIFACTS.mkdir(exist_ok=True)
        if log_path.exists():
            shutil.copy(log_path, ARTIFACTS / "browser-jupyterlab.log")


def test_dashboard_tqdm_and_infer_render_in_jupyterlab(lab: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=120 * MS)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "browser-dashboard.png"
    shot.unlink(missing_ok=True)  # never mistake an old run's picture for this one's
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 2200})
            page.set_default_timeout(120 * MS)
            page.goto(f"{lab}/lab/tree/dashboard.ipynb")
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']")
            # The kernel is connected (not merely "idle" before it exists) when the status
            # bar names it: only then are Shift+Enter presses executed rather than dropped.
            page.wait_for_selector(".jp-StatusBar-Widget:has-text('Python 3 (ipykernel) | Idle')")
            cells = page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell")
            expect(cells).to_have_count(len(CELLS))

            def out(i: int, selector: str = "") -> object:
                return cells.nth(i).locator(f".jp-OutputArea-output {selector}".strip())

            # Run everything: the cells queue in the kernel and run in order.
            cells.nth(0).locator(".jp-InputArea-editor").click()
            page.keyboard.press("Escape")
            for _ in CELLS:
                page.keyboard.press("Shift+Enter")
            expect(cells.nth(0).locator(".jp-InputPrompt")).to_have_text("[1]:")

            # The dashboard renders: breaker panel, memory panel with its meter and sparkline.
            breakers = out(DASH, ".kernel-ext-breakers")
            expect(breakers).to_be_visible()
            expect(breakers.locator(".widget-html-content").first).to_have_text(
                "Circuit breakers")
            memory = out(DASH, ".kernel-ext-memory")
            expect(memory.locator("tr[data-device='cpu']")).to_contain_text(re.compile(
                r"RAM.*GiB / .*GiB"))
            expect(memory.locator("svg.kernel-ext-sparkline").first).to_be_visible()
            expect(out(DASH, ".kernel-ext-checkpoints")).to_be_visible()

            # tqdm.auto picks the notebook bar (an ipywidgets HBox with a progress bar).
            expect(out(TQDM, ".widget-hprogress")).to_be_visible()
            expect(out(TQDM, ".widget-html-content").first).to_contain_text("items")
            expect(out(TQDM, ".widget-html-content").last).to_contain_text("7/7")

            # Live: while the long cell keeps the shell busy, the dashboard keeps updating.
            expect(out(BUSY).first).to_contain_text("BUSY-START")
            ticks = int(out(DASH, ".kernel-ext-footer").get_attribute("data-ticks") or 0)
            page.wait_for_function(
                """([t0]) => {
                    const f = document.querySelector('.kernel-ext-footer');
                    return f && Number(f.dataset.ticks) >= t0 + 3;
                }""",
                arg=[ticks],
            )
            assert "BUSY-END" not in (cells.nth(BUSY).locator(".jp-OutputArea").inner_text()), \
                "the dashboard only updated after the long cell had finished"
            expect(out(BUSY).last).to_contain_text("BUSY-END")

            # %%infer streams: text appears before the footer does, then the one-line footer.
            infer_out = cells.nth(INFER).locator(".jp-OutputArea")
            page.wait_for_function(
                """(el) => el.innerText.trim().length > 0 && !el.innerText.includes('tok/s')""",
                arg=infer_out.element_handle(), timeout=600 * MS,
            )
            expect(infer_out).to_contain_text("tok/s", timeout=600 * MS)
            text = infer_out.inner_text()
            answer, _, footer = text.strip().rpartition("\n")
            assert answer.strip(), text  # a non-empty streamed answer above the footer
            assert re.search(r"gemma3-270m · \d+\+\d+ tokens · [\d.]+ tok/s", footer), text
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']")
            errors = page.locator(".jp-NotebookPanel .jp-OutputArea-output[data-mime-type="
                                  "'application/vnd.jupyter.stderr'] .jp-RenderedText")
            tracebacks = [e for e in errors.all_inner_texts() if "Traceback" in e]
            assert not tracebacks, tracebacks

            # The provider's breaker appeared with the first call, closed (green).
            row = breakers.locator("tr[data-breaker='gemma3-270m']")
            expect(row).to_have_attribute("data-state", "closed")
            expect(row.locator(".kernel-ext-state")).to_have_text("closed")
            # After the load the memory panel lists the model's footprint.
            expect(memory.locator(".kernel-ext-models")).to_contain_text("gemma3-270m")
            # ... and the progress panel the finished load (a stock progress bar per job).
            load_row = out(DASH, ".kernel-ext-progress .kernel-ext-progress-row")
            expect(load_row.first).to_contain_text("gemma3-270m")
            expect(load_row.first).to_contain_text("done")
            expect(load_row.first.locator(".widget-hprogress")).to_be_visible()
            cells.nth(DASH).scroll_into_view_if_needed()
            page.screenshot(path=str(shot), full_page=True)
        finally:
            if not shot.exists():  # a failure: the picture shows where it stopped
                try:
                    page.screenshot(path=str(shot), full_page=True)
                except Exception as e:  # the screenshot is evidence, not the assertion
                    print(f"could not save a screenshot: {e}")
            browser.close()
