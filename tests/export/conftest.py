"""An export service on a real socket and a real database, with a small demo project."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from services.common.auth import issue_token
from services.export.app import create_app
from services.export.config import ExportConfig
from services.export.demo import create_demo_project

SECRET = "test-secret-that-is-long-enough-for-hs256"
Client = TestClient[web.Request, web.Application]


@pytest.fixture(scope="session")
def demo_projects(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Projects shared by the session's tests (they only read them)."""
    root = tmp_path_factory.mktemp("projects")
    create_demo_project(root, "demo", images=12, seed=3)
    create_demo_project(root, "big", images=300, seed=5)
    create_demo_project(root, "other", images=4, seed=9)
    return root


@pytest.fixture
def export_config(database_url: str, demo_projects: Path, tmp_path: Path) -> ExportConfig:
    return ExportConfig(
        database_url=database_url,
        port=0,
        pool_min=1,
        pool_max=8,
        jwt_secret=SECRET,
        data_root=str(demo_projects),
        work_root=str(tmp_path / "work"),
        archive_root=str(tmp_path / "archives"),
        workers=2,
        per_user_limit=4,
        lease_seconds=3.0,
        poll_interval=0.2,
        worker_id="test-worker",
    )


ClientFactory = Callable[..., Awaitable[Client]]


@pytest.fixture
async def make_client(export_config: ExportConfig) -> AsyncIterator[ClientFactory]:
    """Start export services (`make_client(workers=0)` for one that runs no jobs)."""
    clients: list[Client] = []

    async def make(**changes: Any) -> Client:
        config = dataclasses.replace(export_config, **changes)
        client = TestClient(TestServer(create_app(config)))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in reversed(clients):
        try:
            await asyncio.wait_for(client.close(), 15)
        except TimeoutError:
            for task in asyncio.all_tasks():
                task.print_stack(limit=8)
            raise


@pytest.fixture
async def client(make_client: ClientFactory) -> Client:
    return await make_client()


def token(user: str = "alice", projects: tuple[str, ...] = ("demo", "big"), **kw: Any) -> str:
    return issue_token(SECRET, user, projects=projects, **kw)


def auth(
    user: str = "alice", projects: tuple[str, ...] = ("demo", "big"), **kw: Any
) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(user, projects, **kw)}"}
