"""Run the export service: `python -m services.export` or `exportlog-export`."""

from __future__ import annotations

import os
import sys

import structlog
from aiohttp import web

from services.common.logs import configure_logging
from services.common.settings import SettingsError, from_env

from .app import create_app, gc_pacer
from .config import ExportConfig


def main() -> None:
    try:
        config = from_env(ExportConfig, "EXPORT", os.environ)
    except SettingsError as exc:
        sys.exit(f"exportlog-export: {exc}")
    configure_logging(config.log_level, json=config.log_json)
    if not config.database_url:
        sys.exit("exportlog-export: set DATABASE_URL (or EXPORT_DATABASE_URL), or use `make run`")
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is not built for every platform
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    log = structlog.get_logger("services.export")
    log.info("export service starting", host=config.host, port=config.port)
    pacer = gc_pacer() if config.gc_pacing else None
    try:
        app = create_app(config, gc_pacer=pacer)
    except ValueError as exc:
        sys.exit(f"exportlog-export: {exc}")
    if pacer is not None:
        pacer.install()  # after start-up: what it made is frozen, never walked again
    web.run_app(
        app,
        host=config.host,
        port=config.port,
        print=None,
        access_log=None,
        shutdown_timeout=10,
        loop=loop_factory() if loop_factory else None,
    )


if __name__ == "__main__":
    main()
