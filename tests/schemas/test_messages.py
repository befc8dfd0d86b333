"""The message catalogue: every key documented, rendering total, messages that survive the wire."""

from __future__ import annotations

import re
from typing import get_args

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import schemas
from schemas.events import Message, ParamValue, Stage
from schemas.messages import CATALOGUE, message, render

# The parameters each key takes, written out independently of the templates: a template that
# gains, loses or misspells a placeholder fails `test_placeholders_are_the_documented_params`.
PARAMS: dict[str, set[str]] = {
    "export.queued": {"position"},
    "export.started": set(),
    "export.resumed": {"attempt"},
    **{f"export.stage.{stage}": {"current", "total", "item"} for stage in get_args(Stage)},
    **{f"export.stage.{stage}.counts": {"current", "total"} for stage in get_args(Stage)},
    "export.heartbeat": {"percent"},
    "export.cancel-requested": set(),
    "export.cancelled": {"progress"},
    "export.completed": {"file", "bytes"},
    "export.failed": set(),
    "export.failed.unreadable_file": {"detail"},
    "export.failed.malformed_annotation": {"detail"},
    "export.failed.disk_full": set(),
    "export.failed.missing_project": set(),
    "export.failed.unsupported_format": {"detail"},
    "export.failed.io_error": set(),
    "export.failed.worker_lost": {"attempts"},
    "export.failed.internal": set(),
    "export.download.started": {"total_bytes"},
    "export.download.progress": {"percent", "bytes_sent", "total_bytes"},
    "export.download.completed": set(),
    "export.archive-expired": set(),
}
FAILURE_CODES = (
    "unreadable_file",
    "malformed_annotation",
    "disk_full",
    "missing_project",
    "unsupported_format",
    "io_error",
    "worker_lost",
    "internal",
)
PLACEHOLDER = re.compile(r"\{(\w+)\}")

TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)
VALUES: st.SearchStrategy[ParamValue] = (
    TEXT | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
)
KEYS = st.sampled_from(sorted(CATALOGUE)) | TEXT


def test_the_catalogue_covers_every_stage_and_failure_code() -> None:
    for stage in get_args(Stage):
        assert f"export.stage.{stage}" in CATALOGUE
        assert f"export.stage.{stage}.counts" in CATALOGUE
    for code in FAILURE_CODES:
        assert f"export.failed.{code}" in CATALOGUE
    assert set(CATALOGUE) == set(PARAMS)


@pytest.mark.parametrize("key", sorted(CATALOGUE))
def test_placeholders_are_the_documented_params(key: str) -> None:
    assert set(PLACEHOLDER.findall(CATALOGUE[key])) == PARAMS[key]


@pytest.mark.parametrize("key", sorted(CATALOGUE))
def test_a_fully_parametrised_message_has_no_placeholder_left(key: str) -> None:
    text = render(key, dict.fromkeys(PARAMS[key], 7))
    assert "{" not in text
    assert text.strip() == text
    assert text


def test_the_example_from_the_issue() -> None:
    text = render(
        "export.stage.visualizations", {"current": 5, "total": 50, "item": "img_0005.png"}
    )
    assert text == "Rendering visualizations (5/50): img_0005.png"
    assert render("export.stage.visualizations.counts", {"current": 50, "total": 50}) == (
        "Rendering visualizations (50/50)"
    )


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1234567, "1,234,567"),
        (-5, "-5"),
        (42.0, "42"),
        (42.25, "42.2"),
        (99.96, "100"),
        (0.04, "0"),
        (-0.04, "0"),
        (-0.5, "-0.5"),
        (1e6, "1,000,000"),
        (float("nan"), "nan"),
        (float("inf"), "inf"),
        ("img_{0}.png", "img_{0}.png"),
    ],
)
def test_numbers_read_as_english_and_strings_are_left_alone(value: ParamValue, text: str) -> None:
    assert render("export.heartbeat", {"percent": value}) == f"Still working ({text}% done)"


def test_an_unknown_key_renders_as_itself() -> None:
    assert render("export.failed.no_such_code", {"detail": "x"}) == "export.failed.no_such_code"


def test_a_missing_param_leaves_its_placeholder() -> None:
    assert render("export.download.progress", {"percent": 50}) == (
        "Downloading (50%): {bytes_sent} of {total_bytes} bytes"
    )


def test_a_param_value_is_never_expanded_as_a_template() -> None:
    text = render("export.completed", {"file": "{bytes}", "bytes": 10})
    assert text == "Export ready: {bytes} (10 bytes)"


def test_message_carries_key_params_and_text_and_survives_the_wire() -> None:
    built = message("export.completed", file="export.zip", bytes=2048)
    assert built == Message(
        key="export.completed",
        params={"file": "export.zip", "bytes": 2048},
        text="Export ready: export.zip (2,048 bytes)",
    )
    decoded = msgspec.json.decode(msgspec.json.encode(built), type=Message)
    assert decoded == built


def test_message_refuses_a_number_json_cannot_carry() -> None:
    with pytest.raises(ValueError, match="percent"):
        message("export.heartbeat", percent=float("nan"))


def test_the_package_exports_the_catalogue() -> None:
    assert schemas.CATALOGUE is CATALOGUE
    assert schemas.render is render
    assert schemas.message is message


@settings(max_examples=300, deadline=None)
@given(key=KEYS, params=st.dictionaries(TEXT, VALUES, max_size=5))
def test_render_never_raises(key: str, params: dict[str, ParamValue]) -> None:
    text = render(key, params)
    assert isinstance(text, str)
    if key not in CATALOGUE:
        assert text == key


@settings(max_examples=200, deadline=None)
@given(
    key=st.sampled_from(sorted(CATALOGUE)),
    values=st.lists(
        st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(st.characters(exclude_categories=["Cs"], exclude_characters="{}"), max_size=20),
        min_size=3,
    ),
)
def test_message_renders_every_documented_param(key: str, values: list[ParamValue]) -> None:
    params = dict(zip(sorted(PARAMS[key]), values, strict=False))
    built = message(key, **params)
    assert built.key == key
    assert built.params == params
    assert built.text == render(key, params)
    assert "{" not in built.text
