"""Services under fuzzing, each on a real socket, with a database of their own for the module.

The fuzz tests are plain (blocking) functions driven by hypothesis and schemathesis, so the
services they attack run on an event loop of their own, in a thread: they keep serving (and a
well-behaved client keeps being served) while the test thread generates input.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator, MutableMapping
from concurrent.futures import Future
from types import TracebackType
from typing import Any, TypeVar

import pytest
import structlog
from aiohttp import web

from services.export.app import create_app
from services.export.config import ExportConfig
from tests.conftest import cloned_database

T = TypeVar("T")


@pytest.fixture(scope="module")
async def module_database_url(pg_server: str, template_db: str) -> AsyncIterator[str]:
    """A fresh, migrated database shared by the tests of one module."""
    async with cloned_database(pg_server, template_db, "exportlog_fuzz") as url:
        yield url


class LoopThread:
    """An event loop running in a thread of its own until `close()`."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.loop.is_running()

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> Future[T]:
        """Start `coroutine` on the loop; its future, for the calling thread."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run `coroutine` on the loop and wait for its result."""
        return self.submit(coroutine).result(timeout)

    def close(self) -> None:
        async def cancel_the_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_the_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class ErrorLog:
    """Every error logged while it is installed, through structlog or the standard library's
    logging: an exception a service did not handle (websockets' "connection handler failed",
    asyncio's "Task exception was never retrieved", a service's own `log.exception`) shows up
    here. Warnings do not: refusing bad input may be worth a warning."""

    def __init__(self) -> None:
        self.records: list[str] = []
        self._previous: dict[str, Any] | None = None
        errors = self

        class Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                errors.records.append(f"{record.name}: {self.format(record)}")

        self._handler = Handler(logging.ERROR)
        self._handler.setFormatter(logging.Formatter("%(message)s"))

    def take(self) -> list[str]:
        """What was logged since the last call."""
        taken, self.records[:] = list(self.records), []
        return taken

    def __call__(
        self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        """A structlog processor: note errors, pass everything on unchanged."""
        if method_name in ("error", "critical", "exception") or event_dict.get("exc_info"):
            self.records.append(f"{event_dict.get('event')}: {dict(event_dict)}")
        return event_dict

    def __enter__(self) -> ErrorLog:
        self._previous = structlog.get_config()
        structlog.configure(processors=[self, *self._previous["processors"]])
        logging.getLogger().addHandler(self._handler)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        logging.getLogger().removeHandler(self._handler)
        if self._previous is not None:
            structlog.configure(processors=self._previous["processors"])


@pytest.fixture(scope="module")
def error_log() -> Iterator[ErrorLog]:
    with ErrorLog() as errors:
        yield errors


class ThreadedExportService:
    """The export service on 127.0.0.1 and a free port, served from a loop thread."""

    def __init__(self, config: ExportConfig) -> None:
        self.config = config
        self.url = ""
        self._thread: LoopThread | None = None
        self._runner: web.AppRunner | None = None

    async def _start(self) -> None:
        self._runner = web.AppRunner(create_app(self.config), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        (address, *_) = self._runner.addresses
        self.url = f"http://127.0.0.1:{address[1]}"

    def __enter__(self) -> ThreadedExportService:
        self._thread = LoopThread("export-service")
        self._thread.run(self._start())
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._thread is not None
        if self._runner is not None:
            self._thread.run(self._runner.cleanup())
        self._thread.close()
