"""The dashboard in a real headless Chromium (Debian's chromium and chromedriver through
Selenium) against a launched pipeline: the token link, the live tail and its type
filter (with a payload that is markup), lag rising while a handler waits on a gate
file and falling once it opens, and a dead letter shown and replayed from the page."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import recorder_group, write_config
from recorder import read_handled

from nexus import Producer
from nexus.testing import LaunchedPipeline, free_port, wait_for

pytestmark = pytest.mark.system

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TOKEN = "dash-token-51c9"
DEADLINE = 30  # seconds any one thing may take to show on the page
XSS = "<img src=x onerror=document.title='pwned'>"


@pytest.fixture
def browser(tmp_path):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(f"needs Debian's chromium and chromedriver ({CHROMIUM}, {CHROMEDRIVER}); CI installs them")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1800",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_dashboard_in_chromium(tmp_path, browser):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def until(condition, message: str):
        # the page redraws its tables every second: an element found may be replaced
        # before it is read, then the condition is simply asked again
        wait = WebDriverWait(browser, DEADLINE, 0.1, ignored_exceptions=(StaleElementReferenceException,))
        return wait.until(lambda _: condition(), message)

    def css(selector: str):
        return browser.find_elements(By.CSS_SELECTOR, selector)

    def click(selector: str) -> None:
        def clicked() -> bool:
            css(selector)[0].click()
            return True

        until(clicked, f"clicked {selector}")

    out, gate, fixed = tmp_path / "out", tmp_path / "gate", tmp_path / "fixed"
    port = free_port()
    path = write_config(
        tmp_path,
        http={"listen": f"127.0.0.1:{port}", "token": TOKEN},
        workers={
            "slow": recorder_group(
                out, handler="recorder:gated", subscribe=["test.slow"], partitions=2, options={"gate": str(gate)}
            ),
            "fragile": recorder_group(
                out,
                handler="recorder:poisonable",
                subscribe=["test.fragile"],
                retry={"attempts": 1, "backoff": ["0.1s"]},
                options={"fixed": str(fixed)},
            ),
        },
    )
    with LaunchedPipeline(path) as p, Producer(p.cfg.confirm, source="dashboard-test") as producer:
        # the token link: the page takes it once, sets its cookie, and drops it from the address
        def loaded():
            browser.get(f"http://127.0.0.1:{port}/?token={TOKEN}")
            return bool(css("#health"))

        wait_for(loaded, 20, 0.2, "the dashboard served (http child listening)")
        until(lambda: browser.execute_script("return document.body.dataset.stream") == "open", "stream open")
        assert "token" not in browser.current_url
        until(lambda: css("#health")[0].text == "ready", "health badge: ready")
        until(lambda: css('#processes tr[data-name="http"] .state-running'), "http process listed")

        # live tail: the page's subscription reached the router, then an event shows up, as text
        def subscribed() -> bool:
            return (p.router_status() or {}).get("router", {}).get("tail_subscribers", 0) >= 1

        wait_for(subscribed, 10, 0.05, "tail subscribed")
        alpha = producer.send("test.tail.alpha", {"note": XSS})
        producer.flush(10)
        until(lambda: css(f'#tail-list li[data-id="{alpha}"]'), "the sent event in the tail")
        assert until(lambda: css(f'#tail-list li[data-id="{alpha}"] .payload')[0].text, "payload") == json.dumps(
            {"note": XSS}
        )  # shown as text ...
        assert not css("#tail-list img") and browser.title != "pwned"  # ... never as markup

        # filter by type: the server sends only matching events from now on
        field = css("#tail-filter")[0]
        field.clear()
        field.send_keys("test.tail.b*")
        click("#tail-apply")
        until(lambda: browser.execute_script("return document.body.dataset.filter") == "test.tail.b*", "filter on")
        until(lambda: browser.execute_script("return document.body.dataset.stream") == "open", "stream open")
        hidden = producer.send("test.tail.alpha", {"n": 2})
        beta = producer.send("test.tail.beta", {"n": 3})
        producer.flush(10)
        until(lambda: css(f'#tail-list li[data-id="{beta}"]'), "the matching event")
        assert not css(f'#tail-list li[data-id="{hidden}"]') and not css('#tail-list li[data-type="test.tail.alpha"]')

        # lag rises while the handler waits on its gate, and falls once it opens
        slow = [producer.send("test.slow", {"i": i}, key="one-key") for i in range(20)]
        producer.flush(10)

        def lag() -> int:
            cell = css('#groups tr[data-group="slow"] .lag')
            return int(cell[0].text) if cell and cell[0].text.isdigit() else -1

        until(lambda: lag() == 20, "lag 20 on the page")
        peak = len(css("#chart-lag polyline"))
        gate.touch()
        until(lambda: lag() == 0, "lag back to 0 on the page")
        assert peak >= 1 and css("#chart-rate polyline")
        # the members' latency histograms reach the page: p50 and p99 drawn, a p99 figure shown
        until(lambda: len(css("#chart-latency polyline")) >= 2, "the latency chart drawn")
        until(lambda: css("#latency-now")[0].text.startswith("p99 "), "the latest p99 shown")
        wait_for(lambda: {r[1] for r in read_handled(str(out))} >= set(slow), 10, message="slow events handled")

        # a dead letter: listed, shown, fixed, replayed from the page, handled
        poison = producer.send("test.fragile", {"poison": True})
        producer.flush(10)
        until(lambda: css("#dlq tbody tr[data-id]"), "the dead letter listed")
        row_id = until(lambda: css("#dlq tbody tr[data-id]")[0].get_attribute("data-id"), "its id")
        click(f'#dlq tr[data-id="{row_id}"] button.show')
        until(lambda: poison in css("#dlq-show")[0].text, "the dead letter shown")
        screenshot(browser, tmp_path / "dashboard.png")  # the fullest view: charts, a dead letter, the tail
        first_seq = int(p.router_status()["router"]["seq"])
        fixed.touch()
        click(f'#dlq tr[data-id="{row_id}"] button.replay')
        until(lambda: "replayed 1 dead letter" in css("#dlq-result")[0].text, "replay confirmed")
        until(lambda: not css(f'#dlq tr[data-id="{row_id}"]'), "row gone from the list")
        handled = wait_for(
            lambda: [r for r in read_handled(str(out)) if r[1] == poison], 10, message="replayed event handled"
        )
        assert len(handled) == 1 and handled[0][2] > first_seq  # journaled again, under a new seq


def screenshot(browser, shot) -> None:
    """Saved in the test's directory (printed); also copied to $NEXUS_SCREENSHOT_DIR if set."""
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    print(f"\ndashboard screenshot: {shot}")
    keep = os.environ.get("NEXUS_SCREENSHOT_DIR")
    if keep:
        shutil.copy(shot, keep)
