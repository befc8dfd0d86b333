"""What the code offers a deployment, found from the code itself: the environment variables each
program reads, the programs and subcommands that exist, the routes each service answers.

Variables come from two places, both found by reading `services/` and `schemas/` with `ast`:

* every `from_env(SettingsClass, "PREFIX", ...)` call: the class is imported and `from_env` is run
  against an environment that records each name it is asked for, so the list is what the
  settings code really looks up (prefixed names and their fallbacks alike);
* every direct lookup (`os.environ.get("X")`, `os.environ["X"]`, `os.getenv("X")`,
  `"X" in os.environ`).

A lookup whose name is computed (not a string literal) cannot be listed: it is collected in
`Inventory.unlisted`, and a test fails on it. Passing the environment on whole (to a child
process, or `os.environ.items()`) is not a lookup.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import functools
import importlib
import io
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from unittest import mock

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request

from services.common.settings import describe, from_env
from tests.conftest import ROOT

SCANNED = ("services", "schemas")
"""Folders whose Python modules make up the programs."""

EXPORT, GATEWAY, CLI = "export", "gateway", "cli"
PROGRAMS = (EXPORT, GATEWAY, CLI)

PROGRAMS_OF_MODULE: dict[str, frozenset[str]] = {
    "services.export": frozenset({EXPORT}),
    "services.gateway": frozenset({GATEWAY}),
    "services.cli": frozenset({CLI}),
    "services.usercli": frozenset({CLI}),
    "services.sdk": frozenset({CLI}),
    "services.common": frozenset(PROGRAMS),
    "services": frozenset(PROGRAMS),
    "schemas": frozenset(PROGRAMS),
}
"""Which programs run a module's code (the longest matching package wins)."""


def programs_of_module(module: str) -> frozenset[str]:
    best = ""
    for package in PROGRAMS_OF_MODULE:
        if (module == package or module.startswith(package + ".")) and len(package) > len(best):
            best = package
    if not best:
        raise LookupError(f"{module}: no program is known to run this module (PROGRAMS_OF_MODULE)")
    return PROGRAMS_OF_MODULE[best]


class RecordingEnvironment(Mapping[str, str]):
    """An empty environment that remembers every name looked up in it."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def __getitem__(self, key: str) -> str:
        self.asked.append(key)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


@dataclass(frozen=True)
class SettingsClass:
    cls: type[Any]
    prefix: str
    module: str

    @property
    def programs(self) -> frozenset[str]:
        return programs_of_module(self.module)


@dataclass
class Variable:
    name: str
    programs: set[str] = field(default_factory=set)
    default: str | None = None
    """The code's default as `describe()` gives it; None for a name read only as a fallback or
    directly (it has no default of its own)."""


@dataclass
class Inventory:
    variables: dict[str, Variable] = field(default_factory=dict)
    settings: list[SettingsClass] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)
    """Places that read the environment in a way that cannot be listed."""

    def read_by(self, program: str) -> set[str]:
        return {name for name, v in self.variables.items() if program in v.programs}

    def settings_of(self, program: str) -> SettingsClass:
        found = [s for s in self.settings if s.programs == {program}]
        assert len(found) == 1, f"expected one settings class for {program}, found {found}"
        return found[0]

    def _add(self, name: str, programs: frozenset[str], default: str | None = None) -> None:
        variable = self.variables.setdefault(name, Variable(name))
        variable.programs |= programs
        if default is not None:
            variable.default = default


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def python_files() -> list[Path]:
    return sorted(p for folder in SCANNED for p in (ROOT / folder).rglob("*.py"))


class _Scanner(ast.NodeVisitor):
    def __init__(self, path: Path, inventory: Inventory) -> None:
        self.path = path
        self.module = module_name(path)
        self.inventory = inventory
        self.environ_names: set[str] = set()
        self.getenv_names: set[str] = set()

    def where(self, node: ast.AST) -> str:
        return f"{self.path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module == "os":
            for alias in node.names:
                if alias.name == "environ":
                    self.environ_names.add(alias.asname or alias.name)
                if alias.name == "getenv":
                    self.getenv_names.add(alias.asname or alias.name)
        self.generic_visit(node)

    def is_environ(self, node: ast.AST) -> bool:
        if isinstance(node, ast.Attribute) and node.attr == "environ":
            return isinstance(node.value, ast.Name) and node.value.id == "os"
        return isinstance(node, ast.Name) and node.id in self.environ_names

    def is_getenv(self, node: ast.AST) -> bool:
        if isinstance(node, ast.Attribute) and node.attr == "getenv":
            return isinstance(node.value, ast.Name) and node.value.id == "os"
        return isinstance(node, ast.Name) and node.id in self.getenv_names

    def lookup(self, key: ast.AST | None, node: ast.AST) -> None:
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            self.inventory._add(key.value, programs_of_module(self.module))
        else:
            self.inventory.unlisted.append(f"{self.where(node)}: a computed variable name")

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name == "from_env":
            self.settings_call(node)
        elif isinstance(func, ast.Attribute) and self.is_environ(func.value):
            if func.attr in ("get", "pop", "setdefault", "__getitem__", "__contains__"):
                self.lookup(node.args[0] if node.args else None, node)
        elif self.is_getenv(func):
            self.lookup(node.args[0] if node.args else None, node)
        self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        if self.is_environ(node.value) and isinstance(node.ctx, ast.Load):
            self.lookup(node.slice, node)
        self.generic_visit(node)

    def visit_Compare(self, node: ast.Compare) -> None:
        for op, right in zip(node.ops, node.comparators, strict=True):
            if isinstance(op, ast.In | ast.NotIn) and self.is_environ(right):
                self.lookup(node.left, node)
        self.generic_visit(node)

    def settings_call(self, node: ast.Call) -> None:
        if len(node.args) < 2:
            self.inventory.unlisted.append(f"{self.where(node)}: from_env without its arguments")
            return
        cls_node, prefix_node = node.args[0], node.args[1]
        if not (
            isinstance(cls_node, ast.Name)
            and isinstance(prefix_node, ast.Constant)
            and isinstance(prefix_node.value, str)
        ):
            self.inventory.unlisted.append(
                f"{self.where(node)}: from_env with a computed settings class or prefix"
            )
            return
        cls = getattr(importlib.import_module(self.module), cls_node.id)
        self.inventory.settings.append(SettingsClass(cls, prefix_node.value, self.module))


@functools.cache
def inventory() -> Inventory:
    """Every environment variable the programs read, and which program reads it."""
    found = Inventory()
    for path in python_files():
        _Scanner(path, found).visit(ast.parse(path.read_text(), filename=str(path)))
    for settings in found.settings:
        recorder = RecordingEnvironment()
        from_env(settings.cls, settings.prefix, recorder)
        defaults = {
            name: default for name, default, _help in describe(settings.cls, settings.prefix)
        }
        for name in recorder.asked:
            found._add(name, settings.programs, defaults.get(name))
    return found


# ---- programs and subcommands ------------------------------------------------------------------


@functools.cache
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@functools.cache
def scripts() -> dict[str, str]:
    """[project.scripts]: command name -> the program it runs (export, gateway or cli)."""
    programs = {}
    for name, target in pyproject()["project"]["scripts"].items():
        module, _, attribute = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attribute)), target
        (program,) = programs_of_module(module)
        programs[name] = program
    return programs


PYTHON = "python"


def program_of(argv: list[str]) -> str:
    """The program a container command runs: a [project.scripts] entry, or `python -c`."""
    assert argv, "an empty command"
    if argv[0] in (PYTHON, "python3") and argv[1:2] == ["-c"]:
        return PYTHON
    assert argv[0] in scripts(), f"{argv[0]!r} is not in [project.scripts] of pyproject.toml"
    return scripts()[argv[0]]


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace) -> None:
        super().__init__()
        self.namespace = namespace


def check_cli_arguments(argv: list[str]) -> argparse.Namespace:
    """Parse an `exportlog` command line with the CLI's own parser, and stop there: fail unless
    the subcommand exists and takes these arguments."""
    from services.cli import main

    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        raise _Parsed(parse(self, *args, **kwargs))

    with (
        mock.patch.object(argparse.ArgumentParser, "parse_args", parse_then_stop),
        contextlib.redirect_stderr(io.StringIO()) as errors,
        pytest.raises((_Parsed, SystemExit)) as stopped,
    ):
        main(argv)
    assert isinstance(stopped.value, _Parsed), (
        f"exportlog {' '.join(argv)}: {errors.getvalue().strip()}"
    )
    return stopped.value.namespace


def check_python_code(code: str) -> None:
    """Fail unless every `from X import Y` of a `python -c` program names something real."""
    tree = ast.parse(code)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)


# ---- routes ------------------------------------------------------------------------------------


def export_config(env: Mapping[str, str]) -> Any:
    settings = inventory().settings_of(EXPORT)
    return from_env(settings.cls, settings.prefix, env)


def gateway_config(env: Mapping[str, str]) -> Any:
    settings = inventory().settings_of(GATEWAY)
    return from_env(settings.cls, settings.prefix, env)


def cli_config(env: Mapping[str, str]) -> Any:
    settings = inventory().settings_of(CLI)
    return from_env(settings.cls, settings.prefix, env)


def config_of(program: str, env: Mapping[str, str]) -> Any:
    return {EXPORT: export_config, GATEWAY: gateway_config, CLI: cli_config}[program](env)


SIGNING_SECRET = "a-secret-long-enough-for-hs256-tokens"


@functools.cache
def _export_app() -> web.Application:
    from services.export.app import create_app

    config = dataclasses.replace(export_config({}), jwt_secret=SIGNING_SECRET)
    return create_app(config)


async def export_route(path: str) -> bool:
    """Whether the export service has a GET route for `path` (no database needed: routing only)."""
    app = _export_app()
    match = await app.router.resolve(make_mocked_request("GET", path, app=app))
    return match.http_exception is None


class _NoDatabase:
    """A pool whose connections never come: readiness answers 503 rather than 404."""

    def acquire(self, *, timeout: float | None = None) -> Any:
        raise OSError("no database in this test")


async def gateway_route(path: str) -> bool:
    """Whether the gateway answers `path` with anything but its 404 (the WebSocket endpoint lets
    the handshake go on, health answers, readiness says the database is missing)."""
    from services.gateway.server import Gateway

    gateway = Gateway(dataclasses.replace(gateway_config({}), jwt_secret=SIGNING_SECRET))
    gateway._pool = cast(asyncpg.Pool, _NoDatabase())
    response = await gateway._process_request(
        cast(ServerConnection, None), Request(path, Headers())
    )
    return response is None or response.status_code != 404


async def route(program: str, path: str) -> bool:
    return await {EXPORT: export_route, GATEWAY: gateway_route}[program](path)


# ---- shutdown timings in the code --------------------------------------------------------------


def _module_tree(relative: str) -> ast.Module:
    return ast.parse((ROOT / relative).read_text())


def _number(node: ast.expr) -> float:
    assert isinstance(node, ast.Constant), ast.dump(node)
    assert isinstance(node.value, int | float), ast.dump(node)
    return float(node.value)


@functools.cache
def export_shutdown_seconds() -> float:
    """Longest the export service may take after SIGTERM: aiohttp's `shutdown_timeout` for open
    requests (services/export/__main__.py), then the bounded pool close (services/export/app.py,
    `within(pool.close(), N)`)."""
    total = 0.0
    found = []
    for node in ast.walk(_module_tree("services/export/__main__.py")):
        if isinstance(node, ast.keyword) and node.arg == "shutdown_timeout":
            found.append("shutdown_timeout")
            total += _number(node.value)
    for node in ast.walk(_module_tree("services/export/app.py")):
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", None) == "within"
            and isinstance(node.args[0], ast.Call)
            and getattr(node.args[0].func, "attr", None) == "close"
        ):
            found.append("pool close")
            total += _number(node.args[1])
    assert found == ["shutdown_timeout", "pool close"], f"shutdown steps found: {found}"
    return total


def gateway_shutdown_seconds(close_timeout: float) -> float:
    """Longest the gateway's `close()` may take (services/gateway/server.py): every client's
    closing handshake at once, bounded by the close timeout, then `wait_closed` bounded by the
    close timeout plus a second, after which the rest are cut."""
    tree = _module_tree("services/gateway/server.py")
    extra = [
        _number(node.right)
        for node in ast.walk(tree)
        if isinstance(node, ast.BinOp)
        and isinstance(node.op, ast.Add)
        and getattr(node.left, "id", None) == "timeout"
        and isinstance(node.right, ast.Constant)
    ]
    assert len(extra) == 1, "Gateway.close() no longer waits `timeout + N` for wait_closed"
    return 2 * close_timeout + extra[0]
