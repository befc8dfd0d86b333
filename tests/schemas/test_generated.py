"""The generated documents (AsyncAPI, OpenAPI): checked in up to date, and `--check` mode."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from schemas import asyncapi
from schemas.jsonschema import render
from services.export import openapi

Main = Callable[[Sequence[str] | None], int]

DOCUMENTS = [
    pytest.param(
        asyncapi.ASYNCAPI_FILE,
        asyncapi.build_asyncapi(),
        asyncapi.main,
        "python -m schemas.asyncapi",
        id="asyncapi",
    ),
    pytest.param(
        openapi.OPENAPI_FILE,
        openapi.build_openapi(),
        openapi.main,
        "python -m services.export.openapi",
        id="openapi",
    ),
]


@pytest.mark.parametrize(("path", "doc", "main", "command"), DOCUMENTS)
def test_the_checked_in_document_is_up_to_date(
    path: Path, doc: dict[str, Any], main: Main, command: str
) -> None:
    assert path.is_file(), f"{path} is missing: run `make schemas`"
    text = path.read_text(encoding="utf-8")
    stale = f"{path} is out of date: run `make schemas` ({command}) and commit the result"
    assert json.loads(text) == doc, stale
    assert text == render(doc), stale


@pytest.mark.parametrize(("path", "doc", "main", "command"), DOCUMENTS)
def test_check_mode_reports_a_stale_or_missing_file(
    path: Path,
    doc: dict[str, Any],
    main: Main,
    command: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / path.name
    assert main(["--check", "--out", str(out)]) == 1
    assert not out.exists(), "--check must write nothing"
    assert f"missing: {out}" in capsys.readouterr().err

    assert main(["--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == render(doc)
    assert main(["--check", "--out", str(out)]) == 0

    out.write_text("{}\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["--check", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"stale: {out}" in err
    assert "make schemas" in err
    assert command in err
    assert out.read_text(encoding="utf-8") == "{}\n"
