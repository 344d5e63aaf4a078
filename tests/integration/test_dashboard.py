"""Issue 7: the live dashboard in a real browser, fed by real calls through the dev PBX.

Calls with known far-end behaviours go through the API; headless Chromium then shows
/dashboard, and the figures it displays must be the ones placed. The browser is driven
from a worker thread: its page polls the gateway, which runs on this test's event loop.
"""

from __future__ import annotations

import asyncio
import collections
import os
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from gateway.api.typedefs import DIALER, NODES
from gateway.outcomes import DELIVERED_OUTCOMES
from tests.conftest import phone_number
from tests.farend import FarEnd
from tests.integration.conftest import POOL_PREFIX, REPO, Gateway, GatewayFactory

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

# Debian's packages (make deps); Selenium Manager must never download a browser.
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOT = REPO / "var" / "artifacts" / "dashboard.png"
# The page polls every 2 s: a few polls, plus the browser's start.
PAGE_WAIT_S = 15.0
CALL_END_WAIT_S = 20.0
# Long enough for several polls to see the call in flight.
LONG_RING_S = 8
# A real screenshot of the page is tens of kilobytes; a blank one is far smaller.
MIN_SCREENSHOT_BYTES = 20_000

# (mobile prefix, far-end behaviour): 0 rings (delivered), 3 is 486 busy, 4 is 404.
PLACED = [("812", 0), ("812", 0), ("817", 0), ("812", 3), ("815", 4)]


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    """Headless Chromium through Debian's chromedriver; never a downloaded one."""
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not os.access(binary, os.X_OK):
            pytest.fail(f"{binary} is missing: `make deps` installs chromium", pytrace=False)
    options = Options()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # the tests run as root
        "--disable-dev-shm-usage",
        "--window-size=1280,1300",
        "--lang=en-US",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "SEVERE"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


# Every figure in one script: the page's 2 s redraw can never land half-way through.
SNAPSHOT_JS = """
const text = (root, selector) => root.querySelector(selector).textContent.trim();
const shown = {};
for (const element of document.querySelectorAll("[data-figure]")) {
  if (!element.matches("svg, table")) shown[element.dataset.figure] = element.textContent.trim();
}
shown["ami-state"] = document.getElementById("ami-status").dataset.state;
shown.bars = [...document.querySelectorAll("#calls-chart rect.bar")].map(
  (bar) => Number(bar.dataset.calls));
const cells = (row, fields) => fields.map((f) => text(row, `[data-field="${f}"]`));
shown.carriers = [...document.querySelectorAll("#carriers tbody tr[data-carrier]")].map(
  (row) => [row.dataset.carrier, ...cells(row, ["calls", "delivered", "delivery-rate"])]);
shown.channels = [...document.querySelectorAll("#channels tbody tr[data-channel]")].map(
  (row) => [row.dataset.channel, ...cells(row, ["calls", "delivered", "approved"])]);
shown.causes = [...document.querySelectorAll("#causes tbody tr[data-outcome]")].map(
  (row) => [row.dataset.outcome, row.dataset.cause, ...cells(row, ["calls"])]);
shown.nodes = [...document.querySelectorAll("#nodes tbody tr[data-node]")].map(
  (row) => [...cells(row, ["name", "state", "calls-live", "ringing", "channels", "calls-placed"])]);
shown.instances = [...document.querySelectorAll("#instances tbody tr[data-instance]")].map(
  (row) => [...cells(row, ["name", "state", "live-calls"])]);
return shown;
"""


class Page:
    """The dashboard as the browser shows it; every method blocks (run it in a thread)."""

    def __init__(self, driver: WebDriver) -> None:
        self.driver = driver

    def open(self, url: str) -> None:
        self.driver.get(url)

    def snapshot(self) -> dict[str, Any]:
        """Every figure as displayed; carriers and causes as dicts of their rows."""
        shown: dict[str, Any] = self.driver.execute_script(SNAPSHOT_JS)
        shown["carriers"] = {c: (n, d, r) for c, n, d, r in shown["carriers"]}
        shown["causes"] = {(o, c): n for o, c, n in shown["causes"]}
        shown["channels"] = {c: (n, d, a) for c, n, d, a in shown["channels"]}
        return shown

    def wait(self, what: str, condition: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Wait, without reloading, until the figures satisfy `condition`; return them."""
        try:
            WebDriverWait(self.driver, PAGE_WAIT_S, poll_frequency=0.2).until(
                lambda _: condition(self.snapshot())
            )
        except Exception as exc:
            raise AssertionError(f"dashboard never showed {what}: {self.snapshot()}") from exc
        return self.snapshot()

    def errors(self) -> list[str]:
        """What the page logged as errors (a script error, a CSP violation, a 404)."""
        logged = self.driver.get_log("browser")  # type: ignore[no-untyped-call]
        return [str(entry["message"]) for entry in logged]

    def run(self, script: str) -> Any:
        return self.driver.execute_script(script)

    def screenshot(self) -> bool:
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        return bool(self.driver.save_screenshot(str(SCREENSHOT)))


async def in_browser(function: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking browser call off the event loop, which must keep serving the page."""
    return await asyncio.to_thread(function, *args)


async def create(gateway: Gateway, number: str, **fields: Any) -> str:
    status, created = await gateway.post("/v1/verifications", {"phone": f"+{number}", **fields})
    assert status == 201, created
    return str(created["id"])


async def ended(gateway: Gateway, verification_id: str) -> dict[str, Any]:
    """The verification's call once it has an outcome."""
    async with asyncio.timeout(CALL_END_WAIT_S):
        while True:
            status, body = await gateway.get(f"/v1/verifications/{verification_id}")
            assert status == 200, body
            if body["call"]["outcome"] is not None:
                return dict(body["call"])
            await asyncio.sleep(0.1)


async def carrier_of(gateway: Gateway, number: str) -> str:
    status, body = await gateway.get(f"/v1/numbers/{quote('+' + number)}")
    assert status == 200, body
    return str(body["carrier"] or "unknown")


def rate(delivered: int, calls: int) -> str:
    """A delivery rate the way the page formats it."""
    return f"{delivered / calls:.1%}"


async def test_dashboard_shows_the_calls_placed_and_updates_live(
    start_gateway: GatewayFactory, far_end: FarEnd, browser: WebDriver
) -> None:
    gateway = await start_gateway()
    numbers = [phone_number(behaviour, network) for network, behaviour in PLACED]
    ids = [await create(gateway, number) for number in numbers]
    calls = [await ended(gateway, vid) for vid in ids]
    outcomes = [call["outcome"] for call in calls]
    assert outcomes == ["delivered", "delivered", "delivered", "busy", "invalid_number"], calls

    # What the page must show, from what the API says of each call.
    placed, delivered = len(calls), sum(o in DELIVERED_OUTCOMES for o in outcomes)
    by_carrier: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for number, outcome in zip(numbers, outcomes, strict=True):
        tally = by_carrier[await carrier_of(gateway, number)]
        tally[0] += 1
        tally[1] += outcome in DELIVERED_OUTCOMES
    expected_carriers = {c: (str(n), str(d), rate(d, n)) for c, (n, d) in by_carrier.items()}
    expected_causes = {
        (outcome, str(cause)): str(n)
        for (outcome, cause), n in collections.Counter(
            (call["outcome"], call["hangup_cause"]) for call in calls
        ).items()
    }
    assert set(expected_carriers) == {"Telkomsel", "XL", "Indosat Ooredoo Hutchison"}

    page = Page(browser)
    await in_browser(page.open, gateway.operator_url + "/dashboard")
    shown = await in_browser(
        page.wait, f"{placed} calls", lambda shown: shown["calls-window"] == str(placed)
    )

    assert (shown["ami"], shown["ami-state"]) == ("AMI connected", "connected"), shown
    assert shown["calls-last-minute"] == str(placed), shown
    assert sum(shown["bars"]) == placed, shown  # all of them in the last 60 minutes
    assert len(shown["bars"]) == 60
    assert shown["calls-this-minute"] == str(shown["bars"][-1]), shown
    assert (shown["in-flight"], shown["queued"]) == ("0", "0"), shown
    # The gateways sharing the database: this one alone, running, its calls all ended.
    name = gateway.server.app[DIALER].owner
    assert shown["instances"] == [[f"{name} (this one)", "running", "0"]], shown
    # The Asterisk nodes: the dev PBX alone, logged in, every call placed on it.
    (node,) = gateway.server.app[NODES].all
    assert node.name == "asterisk"
    channels = f"0 / {node.max_concurrent:,}"
    assert shown["nodes"] == [["asterisk", "logged in", "0", "0", channels, str(placed)]], shown
    assert shown["delivery-rate"] == rate(delivered, placed) == "60.0%", shown
    assert (shown["delivered"], shown["calls-window"]) == (str(delivered), str(placed)), shown
    assert shown["carriers"] == expected_carriers, shown
    # Every call a flash call, none approved (no code was checked); no voice call.
    assert shown["channels"] == {
        "flashcall": (str(placed), str(delivered), "0"),
        "voice": ("0", "0", "0"),
    }, shown
    assert shown["causes"] == expected_causes, shown
    assert shown["causes"][("busy", "17")] == "1"
    assert shown["causes"][("invalid_number", "1")] == "1"

    # Served without an API key, and aggregates only: no number, caller ID or code.
    async with gateway.http.get(gateway.operator_url + "/dashboard/data") as response:
        assert response.status == 200
        data = await response.text()
    caller_ids = [record.from_user for n in numbers for record in far_end.calls_to(n)]
    assert len(caller_ids) == placed
    for secret in [*numbers, *(n[2:] for n in numbers), *caller_ids, POOL_PREFIX[1:]]:
        assert secret not in data
        assert secret[-7:] not in data

    # Live: with the page still open (never reloaded), a long ring shows up in flight,
    # then ends and joins the totals.
    await in_browser(page.run, "window.notReloaded = true;")
    long_ring = await create(gateway, phone_number(0), ring_seconds=LONG_RING_S)
    await in_browser(
        page.wait,
        "the new call in flight",
        lambda shown: (
            shown["in-flight"] == "1"
            and shown["calls-last-minute"] == str(placed + 1)
            and shown["nodes"][0][2] == "1"  # live on the node
        ),
    )
    assert (await ended(gateway, long_ring))["outcome"] == "delivered"
    shown = await in_browser(
        page.wait,
        "the new call ended",
        lambda shown: shown["in-flight"] == "0" and shown["calls-window"] == str(placed + 1),
    )
    assert shown["delivery-rate"] == rate(delivered + 1, placed + 1) == "66.7%", shown
    assert shown["carriers"]["Telkomsel"][0] == str(by_carrier["Telkomsel"][0] + 1), shown
    assert sum(shown["bars"]) == placed + 1, shown
    assert shown["nodes"][0][2:] == ["0", "0", channels, str(placed + 1)], shown
    assert await in_browser(page.run, "return window.notReloaded === true;") is True
    assert await in_browser(page.errors) == []

    assert await in_browser(page.screenshot)
    png = SCREENSHOT.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) > MIN_SCREENSHOT_BYTES, len(png)
