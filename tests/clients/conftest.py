"""A running stack for the client tools: an export service and a gateway on real ports."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from services.common.eventlog import EventLog
from services.export.keys import EVENTLOG
from services.gateway.config import GatewayConfig
from services.gateway.server import Gateway
from tests.export.conftest import (  # noqa: F401 - fixtures used through the stack
    SECRET,
    Client,
    ClientFactory,
    demo_projects,
    export_config,
    make_client,
    token,
)

__all__ = ["SECRET", "Stack", "StackFactory", "free_port", "token"]
from tests.support import wait_for


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Stack:
    api: Client
    gateway: Gateway
    gateway_config: GatewayConfig

    @property
    def export_url(self) -> str:
        return f"http://127.0.0.1:{self.api.port}"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.gateway.port}/ws"

    @property
    def eventlog(self) -> EventLog:
        return self.api.app[EVENTLOG]

    async def restart_gateway(self) -> None:
        """Close the gateway (clients get 1012) and start another on the same port."""
        await self.gateway.close()
        self.gateway = Gateway(self.gateway_config)
        await self.gateway.start()


StackFactory = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def make_stack(
    make_client: ClientFactory,  # noqa: F811
    database_url: str,
) -> AsyncIterator[StackFactory]:
    """Start an export service (`workers` of them run exports; none by default, so that events
    a test writes by hand are not picked up as work) and a gateway in front of it."""
    stacks: list[Stack] = []

    async def make(workers: int = 0) -> Stack:
        port = free_port()
        api = await make_client(workers=workers, gateway_url=f"ws://127.0.0.1:{port}/ws")
        config = GatewayConfig(
            database_url=database_url,
            port=port,
            jwt_secret=SECRET,
            export_url=f"http://127.0.0.1:{api.port}",
            poll_interval=0.2,
        )
        gateway = Gateway(config)
        await gateway.start()
        stacks.append(Stack(api, gateway, config))
        await wait_for(lambda: stacks[-1].gateway.tailer.listening)
        return stacks[-1]

    try:
        yield make
    finally:
        for running in stacks:
            await running.gateway.close()


@pytest.fixture
async def stack(make_stack: StackFactory) -> Stack:
    return await make_stack()
