"""Run the gateway: `python -m services.gateway` or `exportlog-gateway`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys

import structlog

from services.common.gcpacer import GcPacer
from services.common.logs import configure_logging
from services.common.settings import SettingsError, from_env

from .config import GatewayConfig
from .server import Gateway


async def serve(config: GatewayConfig) -> None:
    pacer = GcPacer() if config.gc_pacing else None
    try:
        gateway = Gateway(config, gc_pacer=pacer)
    except ValueError as exc:
        sys.exit(f"exportlog-gateway: {exc}")
    if pacer is not None:
        pacer.install()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await gateway.start()
    try:
        await stop.wait()
    finally:
        structlog.get_logger("services.gateway").info("gateway stopping")
        await gateway.close()


def main() -> None:
    try:
        config = from_env(GatewayConfig, "GATEWAY", os.environ)
    except SettingsError as exc:
        sys.exit(f"exportlog-gateway: {exc}")
    configure_logging(config.log_level, json=config.log_json)
    if not config.database_url:
        sys.exit("exportlog-gateway: set DATABASE_URL (or GATEWAY_DATABASE_URL), or use `make run`")
    runner: contextlib.AbstractContextManager[asyncio.Runner]
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        runner = asyncio.Runner()
    else:
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    with runner as r:
        r.run(serve(config))


if __name__ == "__main__":
    main()
