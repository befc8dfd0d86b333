"""The demo page in headless Chromium against a real stack: start, follow, restart the gateway,
cancel, download, and a second tab.

The page's progress bar is watched from the DOM (a MutationObserver on its `aria-valuenow`), so
a backward jump anywhere in a run is seen, not only at the moments a test looks. Every wait is on
a condition, with a timeout.
"""

from __future__ import annotations

import itertools
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pytest

from services.export.pipeline import ExportPipeline
from tests.browser.conftest import Demo

if TYPE_CHECKING:
    from playwright.async_api import Download, Page, Request

PROJECTS = ("demo", "big")
LONG = 40_000
"""Milliseconds an export of the big project (300 images) may take in a slow run."""
VISUALIZATION_DELAY = 0.015
"""Seconds added to each visualization by `slow_exports`: the big project then takes some 5 s,
long enough to act in the middle of it, short enough to keep the suite quick."""

WATCH = """() => {
    window.__bar = [];
    window.__status = [];
    window.__connection = [];
    const bar = document.getElementById("bar");
    const job = document.getElementById("job");
    const connection = document.getElementById("connection");
    const record = () => window.__bar.push(Number(bar.getAttribute("aria-valuenow")));
    new MutationObserver(record).observe(bar, { attributeFilter: ["aria-valuenow"] });
    new MutationObserver(() => window.__status.push([job.dataset.status, Date.now()]))
        .observe(job, { attributeFilter: ["data-status"] });
    new MutationObserver(() => window.__connection.push(connection.dataset.status))
        .observe(connection, { attributeFilter: ["data-status"] });
    record();
}"""


@pytest.fixture
def slow_exports(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exports run in this process (the stack's workers): make each visualization take a little
    longer, so that a test can restart the gateway or cancel while one is running."""
    draw = ExportPipeline._draw_visualization

    def slower(self: ExportPipeline, *args: Any) -> None:
        time.sleep(VISUALIZATION_DELAY)
        draw(self, *args)

    monkeypatch.setattr(ExportPipeline, "_draw_visualization", slower)


def progress_at_least(value: float) -> str:
    return f"Number(document.getElementById('bar').getAttribute('aria-valuenow')) >= {value}"


def job_status_is(status: str) -> str:
    return f"document.getElementById('job').dataset.status === {status!r}"


async def open_page(demo: Demo, page: Page, project: str = "demo") -> None:
    """Load the page, give it a token and a project, and start watching it."""
    await page.goto(demo.url)
    await page.locator('body[data-ready="true"]').wait_for()
    assert await page.evaluate("document.body.dataset.gateway") == demo.gateway_url
    await page.fill("#token", demo.token(projects=PROJECTS))
    await page.dispatch_event("#token", "change")
    await page.fill("#project", project)
    await page.dispatch_event("#project", "change")
    await page.locator('#connection[data-status="open"]').wait_for()
    await page.evaluate(WATCH)


async def start(page: Page) -> str:
    await page.click("#start")
    job_id = page.locator("#job-id")
    await page.wait_for_function("document.getElementById('job-id').textContent.length > 0")
    return await job_id.inner_text()


async def bar_values(page: Page) -> list[float]:
    values: list[float] = await page.evaluate("window.__bar")
    return values


def assert_never_backward(values: list[float]) -> None:
    for before, after in itertools.pairwise(values):
        assert after >= before, f"the bar went back from {before} to {after}: {values}"


async def server_events(demo: Demo, project: str, job_id: str) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {demo.token(projects=PROJECTS)}"}
    events: list[dict[str, Any]] = []
    after = 0
    while True:
        response = await demo.stack.api.get(
            f"/projects/{project}/export/{job_id}/events",
            params={"afterSeq": after},
            headers=headers,
        )
        assert response.status == 200, await response.text()
        page = await response.json()
        events += page["events"]
        if not page["hasMore"]:
            return events
        after = page["nextCursor"]


def page_errors(demo: Demo) -> list[str]:
    """Errors other than the browser's own notes about a socket that could not connect (the
    gateway restarting)."""
    return [error for error in demo.errors if "WebSocket" not in error]


async def test_an_export_completes_and_downloads_by_itself(demo: Demo) -> None:
    page = demo.page
    await open_page(demo, page)
    await demo.screenshot("ready")
    async with page.expect_download(timeout=LONG) as download_info:
        job_id = await start(page)
    download: Download = await download_info.value
    assert download.suggested_filename.endswith(".zip")
    await page.wait_for_function(progress_at_least(100), timeout=LONG)
    await page.wait_for_function(job_status_is("completed"))
    await page.locator("#download-note", has_text="Downloaded").wait_for()
    await demo.screenshot("completed")
    values = await bar_values(page)
    assert values[-1] == 100
    assert len(values) > 2, "the bar should move in steps"
    assert_never_backward(values)
    assert await page.locator("#percent").inner_text() == "100 %"
    assert await page.locator("#phase").inner_text() == "downloading"
    types = [event["type"] for event in await server_events(demo, "demo", job_id)]
    assert "export:completed" in types
    assert "export:download-completed" in types
    # The history lists the job; its timeline shows the events.
    item = page.locator(f'#history details[data-job="{job_id}"]')
    await item.locator("summary").click()
    await item.locator('.timeline li[data-type="export:completed"]').wait_for()
    await demo.screenshot("timeline")
    assert page_errors(demo) == []


@pytest.mark.usefixtures("slow_exports")
async def test_the_page_survives_a_gateway_restart_mid_export(demo: Demo) -> None:
    page = demo.page
    await open_page(demo, page, "big")
    await start(page)
    await page.wait_for_function(progress_at_least(5), timeout=LONG)
    await demo.screenshot("before-restart")
    before = max(await bar_values(page))
    assert before < 90, "the export finished before the gateway could be restarted"
    await demo.stack.restart_gateway()
    # The page notices, reconnects and shows the server's state again, live, within seconds.
    await page.wait_for_function(
        "window.__connection.includes('reconnecting')"
        " && document.getElementById('connection').dataset.status === 'open'"
        " && document.getElementById('job').dataset.live === 'true'",
        timeout=10_000,
    )
    await page.wait_for_function(progress_at_least(before + 1), timeout=10_000)
    await demo.screenshot("after-restart")
    await page.wait_for_function(progress_at_least(100), timeout=LONG)
    await page.wait_for_function(job_status_is("completed"))
    await demo.screenshot("completed")
    assert_never_backward(await bar_values(page))
    assert page_errors(demo) == []


@pytest.mark.usefixtures("slow_exports")
async def test_cancel_shows_cancelling_until_the_server_confirms(demo: Demo) -> None:
    page = demo.page
    downloads: list[Download] = []
    download_requests: list[str] = []

    def on_download(download: Download) -> None:
        downloads.append(download)

    page.on("download", on_download)

    def on_request(request: Request) -> None:
        if request.url.endswith("/download"):
            download_requests.append(request.url)

    page.on("request", on_request)
    await open_page(demo, page, "big")
    job_id = await start(page)
    await page.wait_for_function(progress_at_least(3), timeout=LONG)
    assert max(await bar_values(page)) < 80, "the export ended before it could be cancelled"
    await page.click("#cancel")
    await page.wait_for_function(
        "window.__status.some(([status]) => status === 'cancelling')", timeout=5_000
    )
    await demo.screenshot("cancelling")
    await page.wait_for_function(job_status_is("cancelled"), timeout=LONG)
    await demo.screenshot("cancelled")

    statuses: list[list[Any]] = await page.evaluate("window.__status")
    names = [status for status, _ in statuses]
    assert names.index("cancelling") < names.index("cancelled"), names
    shown_at = next(at for status, at in statuses if status == "cancelled") / 1000
    events = await server_events(demo, "big", job_id)
    cancelled = [event for event in events if event["type"] == "export:cancelled"]
    assert len(cancelled) == 1, [event["type"] for event in events]
    confirmed_at = datetime.fromisoformat(cancelled[0]["occurredAt"]).timestamp()
    assert shown_at >= confirmed_at - 0.5, "the page said cancelled before the server did"
    assert await page.locator("#status").inner_text() == "cancelled"
    assert_never_backward(await bar_values(page))
    assert downloads == []
    assert download_requests == []
    assert page_errors(demo) == []


async def test_a_second_tab_shows_the_same_state(demo: Demo) -> None:
    first = demo.page
    await open_page(demo, first)
    job_id = await start(first)
    # The second tab shares the token and project (localStorage) and follows the newest job.
    second = await demo.new_page()
    await second.goto(demo.url)
    await second.locator('body[data-ready="true"]').wait_for()
    await second.wait_for_function(f"document.getElementById('job-id').textContent === {job_id!r}")
    await demo.screenshot("second-tab-following", second)
    for page in (first, second):
        await page.wait_for_function(progress_at_least(100), timeout=LONG)
        await page.wait_for_function(job_status_is("completed"))
    await demo.screenshot("first-tab-done", first)
    await demo.screenshot("second-tab-done", second)
    fields = ("#status", "#percent", "#phase", "#stage", "#message", "#download-note")
    for selector in fields:
        assert (
            await first.locator(selector).inner_text()
            == await second.locator(selector).inner_text()
        ), selector
    assert page_errors(demo) == []
