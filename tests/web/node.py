"""Finding Node.js for the JavaScript tests, or skipping them with the reason."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

MIN_NODE = 20
"""Node's test runner with describe/test and `--test-reporter` (and ES modules) since 20."""


def node_or_skip() -> str:
    """The path of `node`, or a pytest skip that says why the JavaScript tests did not run."""
    node = shutil.which("node")
    if node is None:
        pytest.skip(
            "Node.js is not installed (no `node` on PATH): the client's JS tests did not run"
        )
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
    found = version.stdout.strip()
    match = re.match(r"v(\d+)", found)
    if match is None or int(match.group(1)) < MIN_NODE:
        pytest.skip(f"Node.js {found} is older than {MIN_NODE}: the client's JS tests did not run")
    return node
