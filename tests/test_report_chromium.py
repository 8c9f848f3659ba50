"""report.html in real headless Chromium (Debian's package, installed by `make system-deps`): it loads
with no console errors and no failed request, every image decodes, and the screenshot is not blank."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import time
import urllib.request

import numpy as np
import pytest
from test_eval_stage import _synthetic_run

from eval import stage

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
    "--remote-allow-origins=*",
    "--window-size=1200,2000",
]


class Page:
    """One page over the Chrome DevTools Protocol (websockets' sync client)."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=None, open_timeout=30)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(e.get("method") == method for e in self.events):
                return
            self.events.append(json.loads(self.ws.recv(timeout=deadline - time.time())))
        raise TimeoutError(method)


@pytest.fixture
def chromium(tmp_path):
    if CHROMIUM is None:
        pytest.fail("chromium is not installed: run `make system-deps` (the test set-up does)")
    proc = subprocess.Popen(
        [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "about:blank"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = None
        deadline = time.time() + 60
        while port is None and time.time() < deadline:
            line = proc.stderr.readline()
            m = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            port = int(m.group(1)) if m else None
            if not line and proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {proc.returncode}")
        assert port, "chromium printed no DevTools address"
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        page = Page(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"])
        yield page
        page.ws.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.integration
def test_report_html_renders_in_headless_chromium(tmp_path, chromium):
    cfg, _ = _synthetic_run(str(tmp_path / "run"))
    stage.run(cfg)
    html = tmp_path / "run" / "report" / "report.html"
    page = chromium
    for domain in ("Runtime", "Log", "Page", "Network"):
        page.call(f"{domain}.enable")
    page.call("Page.navigate", url=html.as_uri())
    page.wait_for("Page.loadEventFired")
    images = page.call(
        "Runtime.evaluate",
        expression="Promise.all([...document.images].map(i => i.decode().then("
        "() => [i.naturalWidth, i.naturalHeight], e => 'failed: ' + e)))",
        awaitPromise=True,
        returnByValue=True,
    )["result"]["value"]
    shot = base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"])
    errors = [
        e
        for e in page.events
        if e.get("method") == "Runtime.exceptionThrown"
        or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")
        or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
        or e.get("method") == "Network.loadingFailed"
    ]
    requests = {
        e["params"]["request"]["url"].split(":")[0]
        for e in page.events
        if e.get("method") == "Network.requestWillBeSent"
    }
    assert errors == []
    assert requests <= {"file", "data"}  # nothing from the network
    assert len(images) >= 6 and all(isinstance(i, list) and i[0] > 100 and i[1] > 100 for i in images), images
    from PIL import Image

    px = np.asarray(Image.open(io.BytesIO(shot)).convert("L"), dtype=np.float64)
    assert px.std() > 10 and (px < 200).mean() > 0.01  # text and figures, not a blank page
