"""The web folder at /demo/: content types, no listing, no way out of the folder, no token."""

from __future__ import annotations

import asyncio
import os
import tomllib
from pathlib import Path

import pytest

import services
from services.export import webroot
from services.export.app import create_app
from services.export.config import ExportConfig
from tests.conftest import ROOT
from tests.export.conftest import Client, ClientFactory, auth
from tests.export.test_openapi import Conformance

SECRET_TEXT = "this file is outside the web folder"


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A web folder with one file of each kind, and a secret beside it."""
    (tmp_path / "secret.txt").write_text(SECRET_TEXT)
    root = tmp_path / "web"
    (root / "sub").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "index.html").write_text("<!doctype html><title>demo</title>")
    (root / "client.js").write_text("export const answer = 42;\n")
    (root / "client.mjs").write_text("export {};\n")
    (root / "client.d.ts").write_text("export declare const answer: number;\n")
    (root / "style.css").write_text("body { margin: 0 }\n")
    (root / "vectors.json").write_text("[]\n")
    (root / "blob.unknownkind").write_bytes(b"\x00\x01")
    (root / "sub" / "index.html").write_text("<!doctype html><title>sub</title>")
    (root / ".env").write_text(SECRET_TEXT)
    (root / "outside.txt").symlink_to(tmp_path / "secret.txt")
    (root / "inside.js").symlink_to(root / "client.js")
    return root


@pytest.fixture
async def served(make_client: ClientFactory, site: Path) -> Client:
    return await make_client(workers=0, web_root=str(site))


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/demo/", "text/html"),
        ("/demo/index.html", "text/html"),
        ("/demo/client.js", "text/javascript"),
        ("/demo/client.mjs", "text/javascript"),
        ("/demo/client.d.ts", "application/typescript"),
        ("/demo/style.css", "text/css"),
        ("/demo/vectors.json", "application/json"),
        ("/demo/blob.unknownkind", "application/octet-stream"),
        ("/demo/sub/", "text/html"),
        ("/demo/inside.js", "text/javascript"),
    ],
)
async def test_files_are_served_with_their_content_type_and_no_cache(
    served: Client, site: Path, path: str, content_type: str
) -> None:
    response = await served.get(path)  # no token
    assert response.status == 200, await response.text()
    assert response.content_type == content_type
    if content_type.startswith("text/"):
        assert response.charset == "utf-8"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    name = path.removeprefix("/demo/") or "index.html"
    expected = site / (name + "index.html" if name.endswith("/") else name)
    assert await response.read() == expected.read_bytes()
    await Conformance().check(response, "/demo/{path}")


async def test_a_reload_revalidates_and_gets_304(served: Client) -> None:
    first = await served.get("/demo/client.js")
    etag = first.headers["ETag"]
    again = await served.get("/demo/client.js", headers={"If-None-Match": etag})
    assert again.status == 304
    assert again.headers["Cache-Control"] == "no-cache"
    await Conformance().check(again, "/demo/{path}")


async def test_head_answers_and_other_methods_do_not(served: Client) -> None:
    response = await served.head("/demo/client.js")
    assert response.status == 200
    assert response.content_type == "text/javascript"
    response = await served.post("/demo/client.js", headers=auth())
    assert response.status == 405


async def test_folders_are_never_listed(served: Client) -> None:
    response = await served.get("/demo/empty/")
    assert response.status == 404
    await Conformance().check(response, "/demo/{path}")
    response = await served.get("/demo/empty", allow_redirects=False)
    assert response.status == 404
    for missing in ("/demo/nothing.js", "/demo/sub/nothing.html", "/demo/nothing/"):
        response = await served.get(missing)
        assert response.status == 404, missing


async def test_a_folder_without_its_slash_is_redirected(served: Client) -> None:
    response = await served.get("/demo", allow_redirects=False)
    assert response.status == 301
    assert response.headers["Location"] == "/demo/"
    await Conformance().check(response, "/demo")
    response = await served.get("/demo?token=x", allow_redirects=False)
    assert response.headers["Location"] == "/demo/?token=x"
    response = await served.get("/demo/sub", allow_redirects=False)
    assert response.status == 301
    assert response.headers["Location"] == "/demo/sub/"
    await Conformance().check(response, "/demo/{path}")


async def test_hidden_files_and_links_out_of_the_folder_are_not_served(served: Client) -> None:
    for path in ("/demo/.env", "/demo/outside.txt", "/demo/sub/.hidden"):
        response = await served.get(path)
        assert response.status == 404, path
        assert SECRET_TEXT not in await response.text()


async def _raw_get(port: int, target: str) -> tuple[int, bytes]:
    """GET `target` exactly as written (no client normalises it): the status and the body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize(
    "target",
    [
        "/demo/../secret.txt",
        "/demo/../../secret.txt",
        "/demo/sub/../../secret.txt",
        "/demo/%2e%2e/secret.txt",
        "/demo/%2E%2E/secret.txt",
        "/demo/..%2fsecret.txt",
        "/demo/..%2Fsecret.txt",
        "/demo/%2e%2e%2fsecret.txt",
        "/demo/..%5csecret.txt",
        "/demo/..\\secret.txt",
        "/demo//etc/passwd",
        "/demo/%2fetc/passwd",
        "/demo/%2Fetc%2Fpasswd",
        "/demo/sub/..%2f..%2fsecret.txt",
        "/demo/%00/../secret.txt",
        "/demo/C:/secret.txt",
        "/demo/.%2e/secret.txt",
        "/demo/./index.html/../../secret.txt",
    ],
)
async def test_no_path_leads_out_of_the_folder(served: Client, target: str) -> None:
    assert served.port is not None
    status, body = await _raw_get(served.port, target)
    assert status in (400, 401, 404), (target, status, body)
    assert SECRET_TEXT.encode() not in body
    assert b"root:" not in body


async def test_the_default_folder_is_the_repositorys_web_folder(make_client: ClientFactory) -> None:
    client = await make_client(workers=0)
    response = await client.get("/demo/")
    assert response.status == 200
    assert response.content_type == "text/html"
    assert await response.read() == (ROOT / "web" / "index.html").read_bytes()


def test_an_installed_package_serves_its_own_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "site-packages" / "services"
    package.mkdir(parents=True)
    monkeypatch.setattr(services, "__file__", str(package / "__init__.py"))
    assert webroot.default_web_root() == tmp_path / "site-packages" / "web"  # a checkout
    (package / "web").mkdir()
    assert webroot.default_web_root() == package / "web"  # installed package data
    assert webroot.web_root(str(tmp_path)) == tmp_path  # EXPORT_WEB_ROOT wins


def test_a_web_root_that_is_not_a_folder_is_refused(tmp_path: Path) -> None:
    config = ExportConfig(
        database_url="postgresql://unused", jwt_secret="x" * 32, web_root=str(tmp_path / "none")
    )
    with pytest.raises(ValueError, match="EXPORT_WEB_ROOT"):
        create_app(config)


def test_the_package_list_names_every_package_and_ships_the_web_folder() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"][
        "setuptools"
    ]
    on_disk = {
        os.path.relpath(folder, ROOT).replace(os.sep, ".")
        for top in ("schemas", "services")
        for folder, _, files in os.walk(ROOT / top)
        if "__init__.py" in files
    }
    assert set(setuptools["packages"]) == on_disk | {"services.web"}
    assert setuptools["package-dir"] == {"services.web": "web"}
    assert setuptools["package-data"]["services.web"] == ["**/*"]
    assert (ROOT / "web" / "index.html").is_file()


async def test_the_page_learns_the_gateway_url_without_a_token(make_client: ClientFactory) -> None:
    api = await make_client(workers=0, gateway_url="ws://gateway.test:9000/ws")
    response = await api.get("/demo/config.json")
    assert response.status == 200
    assert response.headers["Cache-Control"] == "no-store"
    assert await response.json() == {"gatewayUrl": "ws://gateway.test:9000/ws"}
    assert ExportConfig().gateway_url == "ws://127.0.0.1:8081/ws"
