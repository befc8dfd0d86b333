"""The catalogue of human messages: stable keys, their English templates, and rendering.

A message travels as its key, its parameters and the English text rendered from them
(`schemas.events.Message`), so a client can show the text as it is or render the key in its own
language from the parameters. Keys are part of the contract like event types: a key is never
reused for a different meaning, and a template may gain wording but never lose a parameter.

Rendering is total. Text is shown to people, and a typo in a parameter name must not turn a
progress report or a failure event into an exception on the way into the log, so an unknown key
renders as itself and a missing parameter leaves its `{placeholder}` visible.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from types import MappingProxyType

from schemas.events import Message, ParamValue

CATALOGUE: Mapping[str, str] = MappingProxyType(
    {
        "export.queued": "Waiting in the queue (position {position})",
        "export.started": "Export started",
        "export.resumed": "Export resumed (attempt {attempt})",
        "export.stage.images": "Copying images ({current}/{total}): {item}",
        "export.stage.visualizations": "Rendering visualizations ({current}/{total}): {item}",
        "export.stage.annotations": "Writing annotations ({current}/{total}): {item}",
        "export.stage.metrics": "Computing metrics ({current}/{total}): {item}",
        "export.stage.compression": "Compressing the archive ({current}/{total}): {item}",
        # A stage also reports with no item in hand (at its start and its end). A separate
        # `.counts` key for that form keeps every template a plain sentence in any language,
        # rather than teaching the renderer optional segments.
        "export.stage.images.counts": "Copying images ({current}/{total})",
        "export.stage.visualizations.counts": "Rendering visualizations ({current}/{total})",
        "export.stage.annotations.counts": "Writing annotations ({current}/{total})",
        "export.stage.metrics.counts": "Computing metrics ({current}/{total})",
        "export.stage.compression.counts": "Compressing the archive ({current}/{total})",
        "export.heartbeat": "Still working ({percent}% done)",
        "export.cancel-requested": "Cancelling the export",
        "export.cancelled": "Export cancelled at {progress}%",
        "export.completed": "Export ready: {file} ({bytes} bytes)",
        "export.failed": "Export failed",
        "export.failed.unreadable_file": "A file could not be read: {detail}",
        "export.failed.malformed_annotation": "An annotation is malformed: {detail}",
        "export.failed.disk_full": "The export ran out of disk space",
        "export.failed.missing_project": "The project no longer exists",
        "export.failed.unsupported_format": "This export format is not supported: {detail}",
        "export.failed.io_error": "A storage error stopped the export",
        "export.failed.worker_lost": "The export stopped after its worker was lost "
        "({attempts} attempts)",
        "export.failed.internal": "The export failed because of an internal error",
        "export.download.started": "Download started ({total_bytes} bytes)",
        "export.download.progress": "Downloading ({percent}%): {bytes_sent} of {total_bytes} bytes",
        "export.download.completed": "Download completed",
        "export.archive-expired": "The archive has expired; export again to download it",
    }
)
"""Every message key and its English template; `{name}` marks a parameter."""

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _format(value: object) -> str:
    # English display: thousands separators, and at most one decimal, because parameters are
    # counts, byte sizes and percentages, where more digits are noise.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        rounded = round(value, 1)
        # -0.04 would otherwise read "-0".
        return f"{rounded if rounded else 0.0:,.1f}".removesuffix(".0")
    return f"{value:,}"


def render(key: str, params: Mapping[str, ParamValue]) -> str:
    """The English text of `key` with `params` filled in. Never raises.

    An unknown key renders as the key itself and a missing parameter leaves its placeholder, so
    a mistake shows up in the text rather than failing the event that carries it. Substitution
    is a single pass, so braces inside a parameter's value are never expanded.
    """
    template = CATALOGUE.get(key)
    if template is None:
        return key

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        return _format(params[name]) if name in params else match.group(0)

    return _PLACEHOLDER.sub(fill, template)


def message(key: str, /, **params: ParamValue) -> Message:
    """A `Message` with its key, its parameters and their English rendering.

    Raises ValueError for a NaN or infinite parameter: JSON cannot carry one, so an event holding
    it would be stored and then refused by every reader. Refusing it here names the culprit.
    """
    for name, value in params.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"message parameter {name!r} of {key!r} must be a finite number")
    return Message(key=key, params=dict(params), text=render(key, params))
