"""The playground page in a real browser: headless Chromium driven over the DevTools protocol.

The test types a prompt, clicks Generate and watches the completion grow while it streams.
Chromium comes from Debian (``apt-get install chromium``; ``.ci/run`` installs it); without it
the test is skipped and says so. The protocol is spoken over ``websockets`` (already installed
with Prefect), so no browser-automation package is needed.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import live_server, save_text_checkpoint

from infinito.serve.app import create_app
from infinito.serve.server import ServeConfig, load_service

pytestmark = pytest.mark.timeout(120)

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",  # the browser picks a free port and writes it to a file
    "--remote-allow-origins=*",
]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class DevTools:
    """A minimal Chrome DevTools protocol client for one page."""

    def __init__(self, ws_url: str) -> None:
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=None, open_timeout=10)
        self.ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:  # events arrive in between; skip them
            reply = json.loads(self.ws.recv(timeout=30))
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def click(self, selector: str) -> None:
        """A real mouse click at the centre of the element."""
        box = self.js(
            f"(() => {{ const r = document.querySelector({selector!r})"
            ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.call(
                "Input.dispatchMouseEvent",
                type=kind,
                x=box[0],
                y=box[1],
                button="left",
                clickCount=1,
            )

    def close(self) -> None:
        self.ws.close()


@contextlib.contextmanager
def browser(url: str) -> Iterator[DevTools]:
    exe = find_chromium()
    if exe is None:
        pytest.skip("no Chromium on PATH: apt-get install -y chromium (as .ci/run does)")
    profile = Path(tempfile.mkdtemp(prefix="infinito-chromium-"))
    proc = subprocess.Popen(
        [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{exe} did not start its DevTools endpoint")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            pages = [t for t in json.load(r) if t["type"] == "page"]
        tools = DevTools(pages[0]["webSocketDebuggerUrl"])
        try:
            yield tools
        finally:
            tools.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(profile, ignore_errors=True)


def wait_until(tools: DevTools, expression: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not tools.js(expression):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {expression}")
        time.sleep(0.05)


@pytest.fixture
def slow_server(tmp_path: Path) -> Iterator[str]:
    """A tiny model whose decode steps take at least 30 ms, so streaming is visible."""
    service = load_service(ServeConfig(save_text_checkpoint(tmp_path / "ckpt")))
    engine = service.batcher.engine
    step = engine.step

    def slow_step(seqs: Any) -> None:
        time.sleep(0.03)
        step(seqs)

    engine.step = slow_step  # type: ignore[method-assign]
    with live_server(create_app(service)) as url:
        yield url


def test_playground_streams_a_completion_into_the_page(slow_server: str) -> None:
    with browser(f"{slow_server}/") as page:
        wait_until(
            page, "document.readyState === 'complete' && !!document.getElementById('generate')"
        )
        wait_until(page, "document.getElementById('model').textContent.includes('infinito')")
        page.js("const p = document.getElementById('prompt'); p.value = ''; p.focus()")
        page.call("Input.insertText", text="The history of")
        page.js("document.getElementById('max_tokens').value = '40'")
        page.click("#generate")
        seen: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = page.js("(document.getElementById('completion') || {}).textContent || ''")
            if text and (not seen or text != seen[-1]):
                seen.append(text)
            if page.js("document.getElementById('stats').textContent.includes('finished')"):
                break
            time.sleep(0.02)
        final = page.js("document.getElementById('completion').textContent")
        stats = page.js("document.getElementById('stats').textContent")
        prompt = page.js("document.querySelector('#output .prompt').textContent")
        error = page.js("document.getElementById('error').textContent")
        if os.environ.get("INFINITO_SCREENSHOT"):  # for a person to look at the page
            shot = page.call("Page.captureScreenshot", format="png")["data"]
            Path(os.environ["INFINITO_SCREENSHOT"]).write_bytes(base64.b64decode(shot))
    assert error == "" and prompt == "The history of"
    assert final and len(seen) >= 5, f"the text did not stream in pieces: {seen}"
    assert all(final.startswith(part) for part in seen)  # it grew, never rewrote
    assert "40 tokens" in stats and "tokens/s" in stats and "finished: length" in stats
