"""Headless Chromium opens the demo page from the export service, and imports the client."""

from __future__ import annotations

import pytest

from tests.browser.conftest import WEB, Demo

CLIENT = WEB / "exportlog-client.js"


async def test_the_demo_page_loads_without_a_token(demo: Demo) -> None:
    response = await demo.page.goto(demo.url)
    assert response is not None
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["cache-control"] == "no-cache"
    await demo.page.locator("h1").wait_for()
    assert await demo.page.title()
    await demo.screenshot("loaded")
    assert demo.errors == []


async def test_the_page_imports_the_client_module(demo: Demo) -> None:
    if not CLIENT.is_file():
        pytest.skip(f"{CLIENT.relative_to(WEB.parent)} is not written yet")
    await demo.page.goto(demo.url)
    exported = await demo.page.evaluate(
        """async (url) => {
            const module = await import(url);
            return Object.keys(module).sort();
        }""",
        "/demo/" + CLIENT.name,
    )
    assert exported, "the client module exports nothing"
    await demo.page.evaluate(
        """(names) => {
            const shown = document.createElement("pre");
            shown.textContent = "imported /demo/exportlog-client.js: " + names.join(", ");
            document.body.append(shown);
        }""",
        exported,
    )
    await demo.screenshot("client-imported")
    assert demo.errors == []
