"""The dashboard in a real browser: headless Chromium driven by Selenium, with Debian's
chromedriver (never a downloaded one), against the app served on 127.0.0.1.

Two live buses publish their status; the test filters the events, replays a dead letter by
clicking its button and confirming, and checks that a ``<script>`` stored in a document
never runs. ``pytest --screenshots tests/test_dashboard_browser.py`` also saves the
screenshots README.rst shows (docs/dashboard-*.png).
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pymongo
import pytest

import mongo_events as me
from mongo_events.monitor import MemoryMonitorStore, MongoConsumerStatusStore, StatusPublisher, wsgi_app

from .conftest import wait_for
from .helpers import FAST, QUICK, Recorder

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
DOCS = Path(__file__).resolve().parent.parent / "docs"
EVIL = "<script>window.__pwned = 1</script>"

webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium (the test extra)")
if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):  # .ci/run installs both
    pytest.skip(
        f"no {CHROMIUM} / {CHROMEDRIVER}: apt-get install chromium chromium-driver", allow_module_level=True
    )

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,860",
    ):
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager never runs, so nothing is downloaded.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


class Fleet:
    """Two live buses publishing their status, a monitor, dead letters, and the app serving them."""

    def __init__(self, client: pymongo.MongoClient[Any]) -> None:
        self.client = client
        self.statuses = MongoConsumerStatusStore(client.internal)
        self.monitor = MemoryMonitorStore()
        self.letters = me.MemoryDeadLetterStore()
        self.fixed = threading.Event()
        self.handled = Recorder()
        self.orders = me.Bus(
            client.shop.orders,
            name="orders",
            monitor=self.monitor,
            dead_letters=self.letters,
            status=StatusPublisher(self.statuses, interval=0.2),
            **FAST,
        )
        self.payments = me.Bus(
            client.shop.payments, name="payments", status=StatusPublisher(self.statuses, interval=0.2), **FAST
        )

        @self.orders.subscribe(name="orders", max_retries=1, retry_backoff=QUICK)
        def handle_order(ev: me.ChangeEvent) -> None:
            doc = ev.full_document or {}
            if doc.get("bad") and not self.fixed.is_set():
                raise ValueError(f"cannot ship order {ev.document_id}: note {doc.get('note', '')}")
            self.handled.add(ev.document_id)

        self.payments.subscribe(lambda ev: None, name="payments")
        self.app = wsgi_app(self.monitor, status=self.statuses, replay=self.orders)
        self.server = make_server(
            "127.0.0.1", 0, self.app, server_class=_ThreadingServer, handler_class=_Quiet
        )
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="dashboard-http", daemon=True)

    def start(self) -> None:
        self.orders.start()
        self.payments.start()
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        for bus in (self.orders, self.payments):
            bus.stop(timeout=5)


@pytest.fixture
def fleet(client: pymongo.MongoClient[Any]) -> Iterator[Fleet]:
    fleet = Fleet(client)
    fleet.start()
    try:
        yield fleet
    finally:
        fleet.stop()


def _rows(driver: Any, css: str) -> list[Any]:
    return list(driver.find_elements(By.CSS_SELECTOR, css))


def _not_pwned(driver: Any) -> None:
    assert driver.execute_script("return window.__pwned === undefined"), "an injected <script> ran"


def test_an_operator_sees_the_fleet_filters_events_and_replays_a_dead_letter(
    browser: Any, fleet: Fleet, request: pytest.FixtureRequest
) -> None:
    screenshots = bool(request.config.getoption("--screenshots"))
    wait = WebDriverWait(browser, 15)
    client = fleet.client
    # Given deliveries on both buses: 6 orders handled, 2 failing for good (one carries a <script>).
    client.shop.orders.insert_many([{"_id": i, "total": i * 10} for i in range(1, 7)])
    client.shop.orders.insert_one({"_id": 7, "bad": True, "note": "damaged"})
    client.shop.orders.insert_one({"_id": 8, "bad": True, "note": EVIL})
    client.shop.payments.insert_many([{"_id": i} for i in range(5)])
    fleet.handled.wait(6)
    assert wait_for(lambda: fleet.letters.count() == 2, timeout=10)
    assert fleet.orders.flush()  # the monitor entries

    # The overview: one row per live consumer, with the counts of the last minute.
    # (a status with every success may be written before the failed attempts: wait for both)
    assert wait_for(
        lambda: (
            sum(s.processed for s in fleet.statuses.list()) >= 6 + 5
            and sum(s.failed for s in fleet.statuses.list()) >= 2
        ),
        timeout=10,
    ), fleet.statuses.list()
    browser.get(fleet.url + "/")
    rows = wait.until(lambda d: (r := _rows(d, "tr.consumer")) and len(r) == 2 and r)
    assert [r.get_attribute("data-bus") for r in rows] == ["orders", "payments"]
    assert "running" in rows[0].text and "running" in rows[1].text
    assert _rows(browser, "svg rect.ok") and _rows(browser, "svg rect.bad")
    _not_pwned(browser)
    if screenshots:
        browser.save_screenshot(str(DOCS / "dashboard-overview.png"))

    # Events: filter the failed ones through the form.
    browser.find_element(By.LINK_TEXT, "Events").click()
    Select(wait.until(lambda d: d.find_element(By.NAME, "status"))).select_by_value("failed")
    browser.find_element(By.NAME, "subscription_id").send_keys("orders")
    browser.find_element(By.CSS_SELECTOR, "form.filters button").click()
    failed = wait.until(lambda d: "status=failed" in d.current_url and _rows(d, "tr.entry"))
    assert len(failed) == 2 and all(" failed " in f" {r.text} " for r in failed)
    assert any(EVIL in r.text for r in failed)  # shown as text, escaped
    _not_pwned(browser)

    # Dead letters: the one with the <script> is shown as text, and did not run.
    browser.find_element(By.LINK_TEXT, "Dead letters").click()
    letters = wait.until(lambda d: _rows(d, "tr.dead-letter"))
    assert len(letters) == 2 and any(EVIL in r.text for r in letters)
    _not_pwned(browser)
    if screenshots:
        browser.save_screenshot(str(DOCS / "dashboard-dead-letters.png"))

    # Replay the "damaged" order: click Replay, then confirm.
    fleet.fixed.set()
    damaged = next(r for r in letters if "damaged" in r.text)
    letter_id = damaged.get_attribute("data-id")
    damaged.find_element(By.CSS_SELECTOR, "a.replay").click()
    wait.until(lambda d: d.find_elements(By.ID, "confirm")).pop().click()
    done = wait.until(lambda d: d.find_elements(By.ID, "done"))
    assert "Replayed" in done[0].text
    # It left the list of those waiting, and the callback ran.
    remaining = _rows(browser, "tr.dead-letter")
    assert [r.get_attribute("data-id") for r in remaining] != [] and letter_id not in [
        r.get_attribute("data-id") for r in remaining
    ]
    assert 7 in fleet.handled.wait(7)
    assert fleet.letters.get(letter_id).retried_at is not None  # type: ignore[union-attr]
    _not_pwned(browser)

    # The <script> letter's own page shows the payload as text.
    browser.find_element(By.CSS_SELECTOR, "tr.dead-letter td a").click()
    payload = wait.until(lambda d: d.find_elements(By.ID, "payload"))
    assert "<script>" in payload[0].text
    _not_pwned(browser)
