"""Reading typed settings from environment variables: one prefix per service, read once."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class SettingsError(ValueError):
    """An environment variable has a value its setting cannot take."""


def _convert(name: str, raw: str, kind: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        if raw == "":
            return None
        return _convert(name, raw, inner[0])
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{name}={raw!r}: expected true or false")
    if kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r}: expected a number") from None
    return raw


def from_env(cls: type[T], prefix: str, environ: Mapping[str, str]) -> T:
    """Build the dataclass `cls` from `PREFIX_FIELD` variables, keeping defaults for the rest.

    A field's metadata may name a fallback variable (`fallback="DATABASE_URL"`), read when the
    prefixed one is absent, so that one DATABASE_URL configures every service.
    """
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = f"{prefix}_{field.name.upper()}"
        raw = environ.get(name)
        fallback = field.metadata.get("fallback")
        if raw is None and fallback:
            raw = environ.get(fallback)
            name = fallback
        if raw is not None:
            values[field.name] = _convert(name, raw, hints[field.name])
    return cls(**values)


def describe(cls: type[Any], prefix: str) -> list[tuple[str, str, str]]:
    """(variable, default, help) for every setting, for the docs and `--help`."""
    rows = []
    for field in dataclasses.fields(cls):
        default = field.default if field.default is not dataclasses.MISSING else ""
        rows.append(
            (f"{prefix}_{field.name.upper()}", str(default), field.metadata.get("help", ""))
        )
    return rows
