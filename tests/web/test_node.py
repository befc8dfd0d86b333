"""Runs the JavaScript client's tests (`tests/web/*.test.mjs`, node's own test runner) when Node.js
is installed, so that `make test` covers the browser client too."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.web.node import node_or_skip

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def test_javascript_client_tests_pass() -> None:
    node = node_or_skip()
    files = sorted(str(path.relative_to(ROOT)) for path in HERE.glob("*.test.mjs"))
    assert files, "no JavaScript tests found"
    result = subprocess.run(
        [node, "--test", "--test-reporter=spec", *files],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert result.returncode == 0, f"node --test failed:\n{result.stdout}\n{result.stderr}"
