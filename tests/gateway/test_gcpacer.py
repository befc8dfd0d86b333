"""The gateway's schedule of full garbage collections: after connections close, paced, and the
cycles closed connections leave are freed."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from services.common.gcpacer import NEVER, GcPacer
from services.gateway.config import GatewayConfig
from services.gateway.server import Gateway
from tests.gateway.conftest import SECRET, connect
from tests.support import wait_for


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def restore_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


def test_a_collection_is_due_after_a_quarter_of_the_connections_closed() -> None:
    clock = Clock()
    pacer = GcPacer(churn=0.25, duty=0.5, max_period=600, clock=clock)
    clock.now += 1
    assert not pacer.due(open_connections=100)  # nothing closed: nothing to collect
    for _ in range(24):
        pacer.connection_closed()
    assert not pacer.due(open_connections=100)
    pacer.connection_closed()
    assert pacer.due(open_connections=100)
    pacer.collect()
    assert pacer.closed == 0
    assert pacer.collections == 1
    # However few are open, a single close is enough once they are all gone.
    pacer.connection_closed()
    clock.now += 1
    assert pacer.due(open_connections=0)


def test_a_collection_waits_its_share_of_time_and_comes_at_the_latest_after_the_period() -> None:
    clock = Clock()
    pacer = GcPacer(duty=0.02, max_period=600, clock=clock)
    pacer.last_seconds = 0.5  # the last one took half a second: the next not within 25 s
    for _ in range(100):
        pacer.connection_closed()
    clock.now += 24.9
    assert not pacer.due(open_connections=10)
    clock.now += 0.2
    assert pacer.due(open_connections=10)
    # Without closes, the period bounds what other cycles may pile up.
    pacer.closed = 0
    assert not pacer.due(open_connections=10)
    clock.now += 600
    assert pacer.due(open_connections=10)


def test_install_takes_full_collections_over_and_uninstall_gives_them_back(
    restore_gc: None,
) -> None:
    before = gc.get_threshold()
    pacer = GcPacer()
    pacer.install()
    assert gc.get_threshold() == (before[0], before[1], NEVER)
    assert gc.get_freeze_count() > 0  # what start-up made is never walked again
    pacer.uninstall()
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_a_pacer_can_space_young_collections_out_while_installed(restore_gc: None) -> None:
    before = gc.get_threshold()
    pacer = GcPacer(young=10_000)
    pacer.install()
    assert gc.get_threshold() == (10_000, before[1], NEVER)
    pacer.uninstall()
    assert gc.get_threshold() == before
    with pytest.raises(ValueError, match="young"):
        GcPacer(young=0)


async def test_the_cycles_of_closed_connections_are_freed_by_the_pacer(
    database_url: str, restore_gc: None
) -> None:
    pacer = GcPacer(check_every=0.05)
    config = GatewayConfig(database_url=database_url, port=0, jwt_secret=SECRET)
    gateway = Gateway(config, gc_pacer=pacer)
    pacer.install()
    await gateway.start()
    try:
        clients = [await connect(gateway) for _ in range(8)]
        await wait_for(lambda: len(gateway._clients) == 8)
        # The server side of each connection, which ends in a cycle once it is closed.
        ends = [weakref.ref(client.connection) for client in gateway._clients]
        gc.collect()  # they are old now: only a full collection can free their cycles
        for ws in clients:
            await ws.close()
        await wait_for(lambda: not gateway._clients)
        await wait_for(lambda: pacer.collections >= 1, timeout=10)
        await wait_for(lambda: all(end() is None for end in ends), timeout=10)
        samples = await gateway_metrics(gateway)
        assert samples["gateway_gc_full_collections"] >= 1
        assert samples["gateway_gc_full_seconds"] > 0
    finally:
        await gateway.close()
        pacer.uninstall()


async def gateway_metrics(gateway: Gateway) -> dict[str, float]:
    return {
        sample.name: sample.value
        for family in gateway.registry.collect()
        for sample in family.samples
        if sample.name.startswith("gateway_gc_")
    }
