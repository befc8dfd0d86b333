"""Browser tests: headless Chromium, driven by Playwright, against a real stack on free ports.

The browser is the system's Chromium (`CHROMIUM`, else /usr/bin/chromium, `chromium` or
`chromium-browser` on PATH), never one Playwright downloads. When there is none, every test here
is skipped with that reason and the end of the run says so; with EXPORTLOG_REQUIRE_BROWSER=1
(set by .ci/run, which installs Chromium first) a missing browser fails the tests instead.

A test asks for `demo` (or `make_demo(workers=...)` for more than one stack): an export service
and a gateway (tests/clients/conftest.py's stack, exports run by two workers) and a page in a
fresh browser context. `demo.url` is the demo page; `await demo.screenshot("label")` saves
test-results/screenshots/<test>-<label>.png, and a failing test saves one of each open page.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from tests.clients.conftest import (  # noqa: F401 - fixtures the stack is built from
    Stack,
    StackFactory,
    make_stack,
)
from tests.conftest import ROOT
from tests.export.conftest import (  # noqa: F401 - fixtures the stack is built from
    demo_projects,
    export_config,
    make_client,
)
from tests.export.conftest import token as issue_test_token

if TYPE_CHECKING:
    from playwright.async_api import Browser, BrowserContext, ConsoleMessage, Page, Playwright

WEB = ROOT / "web"
SCREENSHOTS = ROOT / "test-results" / "screenshots"
CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser")
INSTALL_HINT = ".ci/run installs it (apt-get install chromium)"

_skipped: list[str] = []
"""Why the browser tests were skipped, for the end of the run."""


def find_chromium() -> str | None:
    """The system Chromium's path: `CHROMIUM` when set, else the first candidate found."""
    wanted = os.environ.get("CHROMIUM")
    for name in (wanted,) if wanted else CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _unavailable(reason: str) -> NoReturn:
    """Skip, or fail where the browser tests must run (CI)."""
    if os.environ.get("EXPORTLOG_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason}, and EXPORTLOG_REQUIRE_BROWSER=1 requires the browser tests")
    if reason not in _skipped:
        _skipped.append(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def chromium_path() -> str:
    path = find_chromium()
    if path is None:
        wanted = os.environ.get("CHROMIUM")
        where = f"CHROMIUM={wanted} not found" if wanted else "no Chromium found"
        _unavailable(f"browser tests skipped: {where}; {INSTALL_HINT}")
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        _unavailable("browser tests skipped: playwright is not installed (the dev extra has it)")
    return path


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for reason in _skipped:
        terminalreporter.write_line(reason, yellow=True, bold=True)


@pytest.fixture(scope="session")
async def playwright_driver(chromium_path: str) -> AsyncIterator[Playwright]:
    from playwright.async_api import async_playwright

    driver = await async_playwright().start()
    try:
        yield driver
    finally:
        await driver.stop()


@pytest.fixture(scope="session")
async def browser(playwright_driver: Playwright, chromium_path: str) -> AsyncIterator[Browser]:
    """One headless Chromium for the session; each test gets a context of its own."""
    launched = await playwright_driver.chromium.launch(executable_path=chromium_path, headless=True)
    try:
        yield launched
    finally:
        await launched.close()


_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the test, so that teardown knows whether it failed."""
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    reports = request.node.stash.get(_REPORTS, {})
    return any(report.failed for report in reports.values())


@dataclass
class Demo:
    """A stack and a browser context with one page open on nothing yet."""

    stack: Stack
    context: BrowserContext
    page: Page
    name: str
    errors: list[str] = field(default_factory=list)
    """Uncaught exceptions and console errors of every page of the context."""

    @property
    def url(self) -> str:
        return f"{self.stack.export_url}/demo/"

    @property
    def gateway_url(self) -> str:
        return self.stack.gateway_url

    def token(self, user: str = "alice", projects: tuple[str, ...] = ("demo",)) -> str:
        return issue_test_token(user, projects)

    async def new_page(self) -> Page:
        """Another tab in the same browser context (same storage, same cookies)."""
        page = await self.context.new_page()
        self._watch(page)
        return page

    async def screenshot(self, label: str, page: Page | None = None) -> Path:
        """Save a screenshot of `page` (the first page) for a person to look at."""
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{self.name}-{_slug(label)}.png"
        await (page or self.page).screenshot(path=str(path), full_page=True)
        return path

    def _watch(self, page: Page) -> None:
        def console(message: ConsoleMessage) -> None:
            if message.type == "error":
                self.errors.append(f"console: {message.text}")

        page.on("console", console)
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:120] or "page"


DemoFactory = Callable[..., Awaitable[Demo]]


@pytest.fixture
async def make_demo(
    request: pytest.FixtureRequest,
    browser: Browser,
    make_stack: StackFactory,  # noqa: F811
) -> AsyncIterator[DemoFactory]:
    demos: list[Demo] = []

    async def make(workers: int = 2) -> Demo:
        stack = await make_stack(workers=workers)
        context = await browser.new_context(viewport={"width": 1280, "height": 800})
        context.set_default_timeout(10_000)
        page = await context.new_page()
        name = _slug(request.node.name) + (f"-{len(demos) + 1}" if demos else "")
        demo = Demo(stack, context, page, name)
        demo._watch(page)
        demos.append(demo)
        return demo

    try:
        yield make
    finally:
        failed = _failed(request)
        for demo in demos:
            if failed:
                for number, page in enumerate(demo.context.pages, 1):
                    try:
                        await demo.screenshot(f"failed-{number}", page)
                    except Exception as exc:  # a crashed page: the test's error says more
                        print(f"no screenshot of a failed page: {exc!r}")
            await demo.context.close()


@pytest.fixture
async def demo(make_demo: DemoFactory) -> Demo:
    return await make_demo()
