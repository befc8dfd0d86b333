"""structlog set-up shared by every process: JSON lines in production, readable on a terminal."""

from __future__ import annotations

import logging
import sys

import structlog
from aiohttp.http_exceptions import HttpProcessingError


def configure_logging(level: str = "info", *, json: bool | None = None) -> None:
    """Route structlog and the standard library's logging through one renderer.

    `json=None` picks JSON when stderr is not a terminal (containers, CI, files).
    """
    if json is None:
        json = not sys.stderr.isatty()
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: structlog.types.Processor
    if json:
        shared.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    if level.lower() != "debug":
        # websockets logs every health probe's response at info; keep only its warnings.
        logging.getLogger("websockets").setLevel(logging.WARNING)
    quiet_unparsable_requests()


class _UnparsableRequests(logging.Filter):
    """aiohttp logs a request it cannot parse (a request line or a header too long, a bad chunk)
    at ERROR with a traceback, although it answers the client with a 400 and nothing on the
    server went wrong: anyone could fill the error log, and page whoever watches it, by sending
    such requests. Those records become one INFO line with the parser's reason."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            record.levelno, record.levelname = logging.INFO, "INFO"
            if isinstance(record.args, tuple):
                record.msg = f"{record.msg} (refused with {error.code}: %s)"
                record.args = (*record.args, error.message)
            record.exc_info, record.exc_text = None, None
        return True


def quiet_unparsable_requests() -> None:
    """Install the filter above on aiohttp's server logger (once, however often called)."""
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _UnparsableRequests) for f in logger.filters):
        logger.addFilter(_UnparsableRequests())
