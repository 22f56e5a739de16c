"""The sweep's scaling plots, as a user sees them: the MLflow UI in a real (headless) Chromium.

A sweep parent run gets its analysis through the sweep's own code path (`analyse` + `log_analysis`) on
a synthetic 2×2×2 grid; `mlflow server` serves that store; Chromium opens the parent run's artifact
page and the test reads the rendered DOM over the Chrome DevTools Protocol (a websocket; aiohttp comes
with mlflow): the artifact tree lists the plots and the selected plot is an <img> that loaded from the
server. The screenshot is kept under `test-artifacts/` for a human to look at.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_PACKAGE = "chromium"  # Debian's package name (`make sysdeps` installs it as root)
METRIC = "eval/zeroshot/test/top1"
PLOTS = ("error_vs_compute.png", "error_vs_data.png", "error_vs_params.png", "error_vs_batch.png",
         "loss_curves.png")
SELECTED = "plots/error_vs_compute.png"
MODELS = {"micro": 190_000, "tiny": 800_000}
WINDOW = (1400, 1000)
# Texts of the parent run's description (Markdown) the overview page must show.
DESCRIBED = ("trials finished", "d4000-tiny-b128", "frontier")
UI_WAIT_S = 120.0  # upper bound (a loaded CI box) for the app to render; polling returns once it has

# Run in the page: what the artifact view shows right now: its texts (the tree's entry names among
# them), its images, and the artifact URLs the app fetched (the image is shown from a blob: URL).
_PAGE_STATE_JS = """
(() => {
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const texts = new Set();
  while (walker.nextNode()) {
    const text = walker.currentNode.nodeValue.trim();
    if (text && text.length < 4000) texts.add(text);
  }
  const imgs = [...document.images].map(i => ({src: i.currentSrc || i.src, complete: i.complete,
                                                width: i.naturalWidth, height: i.naturalHeight}));
  const fetched = performance.getEntriesByType('resource').map(e => e.name)
    .filter(n => n.includes('artifact'));
  return JSON.stringify({texts: [...texts], imgs: imgs, fetched: fetched, href: location.href});
})()
"""


def _chromium() -> str:
    path = CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")
    if path is None:
        message = (f"the MLflow UI browser test needs Chromium: apt-get install {CHROMIUM_PACKAGE} "
                   "(Debian package), or `make sysdeps` as root")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def _synthetic_results() -> list[Any]:
    """2 data × 2 models × 2 batches, error = a power law in each axis, one loss curve per trial."""
    from scalelab.scaling import TrialResult

    results = []
    for data in (1000, 4000):
        for model, params in MODELS.items():
            for batch in (32, 128):
                error = 3.0 * data**-0.2 * params**-0.1 * batch**-0.05
                seen = 4 * data
                macs = 20 * params
                curve = [(s, 6.0 * (1 + s) ** -0.15 + error) for s in range(0, seen + 1, seen // 8)]
                results.append(TrialResult(
                    trial_id=f"d{data}-{model}-b{batch}", data=data, model=model, batch=batch, params=params,
                    macs_per_sample=macs, samples_seen=seen, compute=4.0 * macs * seen, wall_s=1.0,
                    metrics={METRIC: 1.0 - error}, state="TERMINATED", curve=curve,
                ))
    return results


def _log_sweep(storage: Path) -> tuple[str, str, str, Path]:
    """A sweep parent run carrying the analysis; returns (tracking uri, experiment id, run id, artifacts)."""
    from scalelab.sweep.analysis import analyse, log_analysis
    from scalelab.sweep.results import SweepState
    from scalelab.tracking import default_artifact_root, get_or_create_experiment, start_or_resume_run

    uri = f"sqlite:///{storage / 'mlflow.db'}"
    artifact_root = default_artifact_root(uri, storage)
    assert artifact_root is not None
    experiment_id = get_or_create_experiment("browser-sweep", uri, artifact_root)
    parent = start_or_resume_run(uri, experiment_id, run_name="sweep-browser", tags={"sweep": "browser"})
    results = _synthetic_results()
    trials = [{"name": r.trial_id, "data": r.data, "model": r.model, "batch": r.batch, "extra": {}}
              for r in results]
    state = SweepState("browser", uri, experiment_id, parent.run_id, metric=METRIC, robustness_metric=None,
                       predict_compute=None, trials=trials)
    analysis = analyse(state, results)
    assert {f"plots/{p}" for p in PLOTS} <= set(analysis.figures), sorted(analysis.figures)
    log_analysis(state, results, analysis, storage / "scratch")
    from mlflow import MlflowClient

    tags = MlflowClient(uri).get_experiment(experiment_id).tags
    assert tags.get("mlflow.experimentKind") == "custom_model_development", tags
    logged = {f.path for f in MlflowClient(uri).list_artifacts(parent.run_id, "plots")}
    assert logged == set(analysis.figures)  # each figure once, rendered once (as written under scratch)
    parent.finish()
    return uri, experiment_id, parent.run_id, Path(artifact_root)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.read()


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


@contextlib.contextmanager
def _process(cmd: list[str], log: Path, env: dict[str, str] | None = None):
    """Start `cmd` in its own process group; on exit end the whole group (servers and browsers fork)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield proc
    finally:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue


def _wait_until(check, timeout: float, what: str, log: Path, proc: subprocess.Popen) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what}: process exited with {proc.returncode}\n{_tail(log)}")
        with contextlib.suppress(OSError, ValueError):
            value = check()
            if value:
                return value
        time.sleep(0.2)
    pytest.fail(f"{what}: not ready after {timeout:.0f} s\n{_tail(log)}")


class _Cdp:
    """Just enough of the Chrome DevTools Protocol: a command and its reply on a page's websocket."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.last_id = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.last_id += 1
        await self.ws.send_json({"id": self.last_id, "method": method, "params": params})
        while True:  # skip events until our reply
            message = await self.ws.receive_json(timeout=30)
            if message.get("id") == self.last_id:
                if "error" in message:
                    raise RuntimeError(f"CDP {method}: {message['error']}")
                return message["result"]

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page JS failed: {result['exceptionDetails']}")
        return result["result"].get("value")


def _rendered(state: dict[str, Any], base: str) -> dict[str, Any] | None:
    """Once the tree lists every plot and the selected plot was fetched from the server and shown by a
    loaded <img>: that image and the URL it came from; else None."""
    if not set(PLOTS) <= set(state["texts"]):
        return None
    quoted = urllib.parse.quote(SELECTED, safe="")
    urls = [u for u in state["fetched"] if u.startswith(base) and (SELECTED in u or quoted in u)
            and ("get-artifact" in u or "mlflow-artifacts" in u)]
    # MLflow fetches the file itself and shows it through an object URL of the same origin.
    imgs = [i for i in state["imgs"] if i["complete"] and i["width"] > 0
            and (i["src"] in urls or i["src"].startswith(f"blob:{base}"))]
    return {"url": urls[0], **imgs[0]} if urls and imgs else None


async def _drive(devtools_port: int, visits: list[tuple[str, Any]]
                 ) -> list[tuple[dict[str, Any], Any, bytes]]:
    """Open each (url, ready) in turn; wait until `ready(page state)` returns something (or the time is
    up); per visit: the last page state, what `ready` returned (None: never ready) and a screenshot."""
    import aiohttp

    out = []
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{devtools_port}/json/list") as response:
            targets = await response.json()
        page = next(t for t in targets if t.get("type") == "page")
        async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            cdp = _Cdp(ws)
            await cdp.call("Emulation.setDeviceMetricsOverride", width=WINDOW[0], height=WINDOW[1],
                           deviceScaleFactor=1, mobile=False)
            for url, ready in visits:
                await cdp.call("Page.navigate", url=url)
                await asyncio.sleep(0.5)  # the previous page's DOM must not count as this one's
                deadline = time.monotonic() + UI_WAIT_S
                state: dict[str, Any] = {}
                found = None
                while time.monotonic() < deadline:
                    with contextlib.suppress(RuntimeError):  # mid-navigation: no context yet
                        state = json.loads(await cdp.evaluate(_PAGE_STATE_JS) or "{}")
                    if state and (found := ready(state)):
                        break
                    await asyncio.sleep(0.25)
                await asyncio.sleep(0.5)  # let the page paint before the screenshot
                shot = await cdp.call("Page.captureScreenshot", format="png")
                out.append((state, found, base64.b64decode(shot["data"])))
    return out


def _check_screenshot(png: bytes) -> None:
    from PIL import Image

    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(png)).convert("RGB")
    assert image.size == WINDOW
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200, f"screenshot looks blank: {colours and len(colours)}"
    assert len(png) > 20_000


def test_mlflow_ui_shows_sweep_plots(tmp_path):
    from scalelab.tracking import ui_url

    chromium = _chromium()
    storage = tmp_path / "storage"
    uri, experiment_id, run_id, artifact_root = _log_sweep(storage)
    assert (artifact_root / run_id / "artifacts" / SELECTED).is_file()

    port = _free_port()
    base = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    server_cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", uri,
                  "--default-artifact-root", artifact_root.as_uri(), "--host", "127.0.0.1",
                  "--port", str(port), "--workers", "1"]
    server_log = tmp_path / "mlflow-server.log"
    with _process(server_cmd, server_log, env) as server:
        _wait_until(lambda: _get(base + "health")[0] == 200, 150, "mlflow server /health", server_log, server)

        profile = tmp_path / "chromium-profile"
        browser_cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                       "--no-first-run", "--disable-background-networking", "--disable-component-update",
                       "--disable-sync", f"--user-data-dir={profile}", "--remote-debugging-port=0",
                       f"--window-size={WINDOW[0]},{WINDOW[1]}", "about:blank"]
        browser_log = tmp_path / "chromium.log"
        with _process(browser_cmd, browser_log) as browser:
            active = profile / "DevToolsActivePort"  # Chromium writes the port it picked here
            devtools_port = _wait_until(lambda: int(active.read_text().split()[0]), 60,
                                        "chromium DevTools port", browser_log, browser)
            artifacts = f"{base}#/experiments/{experiment_id}/runs/{run_id}/artifacts/{SELECTED}"
            overview = ui_url(experiment_id, run_id, base.rstrip("/"))  # the link `scalelab sweep` prints
            experiment = ui_url(experiment_id, base=base.rstrip("/"))
            visits = asyncio.run(_drive(devtools_port, [
                (artifacts, lambda state: _rendered(state, base)),
                (overview, lambda state: _has(state, DESCRIBED)),
                (experiment, lambda state: _has(state, ("sweep-browser",))),
            ]))
        (seen, img, png), (described, _, overview_png), (listed, runs_table, list_png) = visits
        fetched = _get(img["url"]) if img is not None else None  # the server still runs

    for folder in (tmp_path, REPO / "test-artifacts"):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "mlflow_ui_sweep_plots.png").write_bytes(png)
        (folder / "mlflow_ui_sweep_description.png").write_bytes(overview_png)
        (folder / "mlflow_ui_sweep_experiment.png").write_bytes(list_png)

    texts = set(seen.get("texts", []))
    assert set(PLOTS) <= texts, f"artifact tree lacks {sorted(set(PLOTS) - texts)}; page: {seen}"
    assert img is not None, f"no loaded <img> of {SELECTED} fetched from {base}: {seen}"
    assert fetched is not None
    status, body = fetched
    assert status == 200 and body[:8] == b"\x89PNG\r\n\x1a\n"
    assert body == (artifact_root / run_id / "artifacts" / SELECTED).read_bytes()
    assert (img["width"], img["height"]) == _png_size(body)
    _check_screenshot(png)
    # The parent run's page opens on the sweep's answer: its description (results table and fits).
    missing = [t for t in DESCRIBED if not _has(described, (t,))]
    assert not missing, f"run overview lacks {missing}: {described.get('texts')}"
    # The experiment is a model-training one: the UI lists the sweep's runs (MLflow 3's GenAI view of an
    # untyped experiment shows traces and judges instead).
    assert runs_table, f"the experiment page does not list the run: {listed.get('texts')}"
    assert not _has(listed, ("Evaluation runs",)), listed.get("texts")


def _has(state: dict[str, Any], needles: tuple[str, ...]) -> bool:
    """Every needle is (part of) one of the page's texts."""
    texts = state.get("texts", [])
    return all(any(n in t for t in texts) for n in needles)


def _png_size(png: bytes) -> tuple[int, int]:
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
