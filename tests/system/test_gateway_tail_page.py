"""examples/http/live-tail.html in a real headless Chromium (Debian's chromium and
chromedriver, as tests/system/test_dashboard.py): served by a plain http.server on
127.0.0.1 (another origin than the gateway's), it subscribes with the `bearer.<token>`
subprotocol, shows journaled events as text, and after the gateway is SIGKILLed (events
journaled meanwhile through ZeroMQ) resumes from the last seq it showed: every event once,
in journal order."""

from __future__ import annotations

import functools
import http.server
import os
import signal
import threading
from pathlib import Path

import pytest
from gateway_support import READER, gateway_config, wait_up
from test_dashboard import browser  # noqa: F401  (the fixture: a headless Chromium)

from nexus import Producer
from nexus.testing import LaunchedPipeline, free_port, wait_for

pytestmark = pytest.mark.system

PAGE_DIR = Path(__file__).parent.parent.parent / "examples" / "http"
DEADLINE = 30  # seconds any one thing may take to show on the page
XSS = "<img src=x onerror=document.title='pwned'>"


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # (no request lines in the test output)
        pass


@pytest.fixture
def page_server():
    """The example's folder over HTTP on 127.0.0.1 (a file:// page works too; a server is
    what a user would put it behind)."""
    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), functools.partial(Quiet, directory=str(PAGE_DIR)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}/live-tail.html"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_live_tail_page_in_chromium(tmp_path, browser, page_server):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def until(condition, message: str):
        return WebDriverWait(browser, DEADLINE, 0.1).until(lambda _: condition(), message)

    def css(selector: str):
        return browser.find_elements(By.CSS_SELECTOR, selector)

    def opens() -> int:  # connections the page opened
        return int(browser.execute_script("return document.body.dataset.opens"))

    def seqs() -> list[int]:
        return [int(li.get_attribute("data-seq")) for li in css("#events li[data-seq]")]

    path, base = gateway_config(tmp_path)
    with LaunchedPipeline(path) as p, Producer(p.cfg.confirm, source="tailpage") as producer:
        wait_up(base)
        first = [producer.send("test.page", {"n": i}) for i in range(3)]
        first.append(producer.send("test.page", {"note": XSS}))
        producer.flush(10)

        browser.get(page_server)
        for field, value in (("gateway", base), ("token", READER), ("types", "test.*"), ("from", "0")):
            css(f"#{field}")[0].clear()
            css(f"#{field}")[0].send_keys(value)
        css("#start")[0].click()
        until(lambda: opens() == 1, "connected")
        until(lambda: len(seqs()) == 4, "the 4 journaled events shown")
        xss = css(f'#events li[data-id="{first[3]}"] .payload')[0].text
        assert xss == '{"note":"' + XSS.replace('"', '\\"') + '"}'  # shown as text ...
        assert not css("#events img") and browser.title != "pwned"  # ... never as markup

        # the gateway killed: the page reconnects (the launcher restarts it) from seq 4;
        # events journaled meanwhile (through ZeroMQ) and after all show, each once
        gateway = next(x["pid"] for x in p.processes() if x["name"] == "gateway")
        os.kill(gateway, signal.SIGKILL)
        during = [producer.send("test.page", {"during": i}) for i in range(5)]
        producer.flush(10)
        wait_for(lambda: _pid(p) not in (0, gateway), 30, 0.1, "gateway restarted")
        until(lambda: opens() == 2, "reconnected to the new gateway")
        after = [producer.send("test.page", {"after": i}) for i in range(3)]
        producer.flush(10)
        until(lambda: len(seqs()) >= 12, "every event shown")
        shown = seqs()
        ids = [li.get_attribute("data-id") for li in css("#events li[data-seq]")]
        print(f"tail page: shown {len(shown)} events, seqs {sorted(shown)}; resumed after a gateway SIGKILL")
        assert sorted(shown) == list(range(1, 13)) and shown == sorted(shown, reverse=True)  # once, in order
        assert list(reversed(ids)) == first + during + after
        assert browser.execute_script("return document.body.dataset.last") == "12"


def _pid(p: LaunchedPipeline) -> int:
    return next(x["pid"] for x in p.processes() if x["name"] == "gateway")
