"""Writing a generated document, or checking that the checked-in copy is up to date.

The JSON Schemas, the AsyncAPI document and the OpenAPI document are generated from the types
and checked in; `make schemas` rewrites them and the tests (and `--check`) refuse stale ones.
"""

from __future__ import annotations

import sys
from pathlib import Path


def write_or_check(out: Path, text: str, *, check: bool, what: str, command: str) -> int:
    """Write `text` to `out` when it differs (0), or with `check` write nothing and answer 1
    with a hint when the file is missing or stale."""
    current = out.read_text(encoding="utf-8") if out.is_file() else None
    if check:
        if current == text:
            return 0
        print(f"{'missing' if current is None else 'stale'}: {out}", file=sys.stderr)
        print(
            f"the {what} is out of date: run `make schemas` ({command}) and commit the result",
            file=sys.stderr,
        )
        return 1
    if current != text:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        print(f"wrote {out}")
    return 0
