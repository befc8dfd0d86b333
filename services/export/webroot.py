"""The repository's `web/` folder (the demo page and the browser client) served at /demo/.

Which folder: `EXPORT_WEB_ROOT` when set; otherwise the copy installed with the package
(`services/web/`, package data that pyproject.toml maps from the repository's `web/`); otherwise,
in a checkout or an editable install, the repository's `web/` itself, so that an edit shows on the
next reload.

What is served: files only, for GET and HEAD, without a token (the page asks for one). A path
ending in `/` answers that folder's `index.html`; a folder named without the `/` is redirected
to it; nothing ever lists a folder. A path with a `..`, `.` or empty segment, a hidden name
(`.git`, `.env`), a backslash, a colon or a NUL, or one that leads out of the folder through a
symbolic link, answers 404 like a missing file. Answers carry `Cache-Control: no-cache` (the
browser revalidates with the ETag or Last-Modified on every load, so an edited file is never
stale) and `X-Content-Type-Options: nosniff`, with a content type from the file's extension.

`/demo/config.json` is not a file: it tells the page the gateway's WebSocket URL
(`EXPORT_GATEWAY_URL`), which only the deployment knows.
"""

from __future__ import annotations

import os
from pathlib import Path

import structlog
from aiohttp import web

import services

from .keys import CONFIG

log = structlog.get_logger(__name__)

PREFIX = "/demo"
INDEX = "index.html"

CONTENT_TYPES: dict[str, str] = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".d.ts": "application/typescript; charset=utf-8",
    ".ts": "application/typescript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".txt": "text/plain; charset=utf-8",
    ".md": "text/markdown; charset=utf-8",
}
"""By the end of the file's name (the longest match wins: `.d.ts` before `.ts`)."""
FALLBACK_CONTENT_TYPE = "application/octet-stream"

HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


def default_web_root() -> Path:
    """The package's copy of `web/` when installed, else the checkout's `web/`."""
    package = Path(services.__file__).resolve().parent
    installed = package / "web"
    if installed.is_dir():
        return installed
    return package.parent / "web"


def web_root(setting: str) -> Path:
    """The folder to serve: `setting` (EXPORT_WEB_ROOT) when not empty, else the default."""
    return Path(setting).expanduser() if setting else default_web_root()


def content_type(name: str) -> str:
    lowered = name.lower()
    for suffix in sorted(CONTENT_TYPES, key=len, reverse=True):
        if lowered.endswith(suffix):
            return CONTENT_TYPES[suffix]
    return FALLBACK_CONTENT_TYPE


def _inside(root: Path, tail: str) -> Path | None:
    """What `tail` (the URL path after /demo/, decoded) names under `root`, resolved, if it
    names something there that may be served; None for anything else."""
    if any(bad in tail for bad in ("\\", ":", "\x00")):
        return None
    parts = tail.split("/")
    if parts[-1] == "":
        parts[-1] = INDEX
    if any(part == "" or part.startswith(".") for part in parts):
        return None
    try:
        base = root.resolve(strict=True)
        found = root.joinpath(*parts).resolve(strict=True)
    except (OSError, RuntimeError):  # missing, a symbolic link loop, too long a name
        return None
    if not found.is_relative_to(base):
        return None
    return found


def _redirect(request: web.Request, path: str) -> web.HTTPException:
    location = path + ("?" + request.query_string if request.query_string else "")
    return web.HTTPMovedPermanently(location, headers=HEADERS, text="")


async def demo_redirect(request: web.Request) -> web.StreamResponse:
    """GET /demo: the page lives at /demo/ (relative links resolve against the slash)."""
    raise _redirect(request, PREFIX + "/")


async def demo_file(request: web.Request) -> web.StreamResponse:
    """GET /demo/{path}: a file of the web folder; a folder's index.html; no listing."""
    root = web_root(request.app[CONFIG].web_root)
    tail = request.match_info["path"]
    found = _inside(root, tail)
    if found is not None and found.is_dir():
        if (found / INDEX).is_file() and not tail.endswith("/"):
            raise _redirect(request, f"{PREFIX}/{tail}/")
        found = None
    if found is None or not found.is_file():
        raise web.HTTPNotFound(reason=f"no file {PREFIX}/{tail} here", headers=HEADERS)
    headers = HEADERS | {"Content-Type": content_type(found.name)}
    return web.FileResponse(found, headers=headers)


async def demo_config(request: web.Request) -> web.Response:
    """GET /demo/config.json: what the page needs to know that only the deployment knows."""
    config = request.app[CONFIG]
    return web.json_response(
        {"gatewayUrl": config.gateway_url}, headers=HEADERS | {"Cache-Control": "no-store"}
    )


def check_web_root(setting: str) -> None:
    """At start-up: refuse an EXPORT_WEB_ROOT that is not a folder; say so when the default
    folder is missing (the service still runs, and /demo/ answers 404)."""
    root = web_root(setting)
    if setting and not root.is_dir():
        raise ValueError(f"EXPORT_WEB_ROOT={setting!r} is not a folder")
    if not (root / INDEX).is_file():
        log.warning("no demo page to serve at /demo/", web_root=os.fspath(root))


def routes() -> list[web.RouteDef]:
    return [
        web.get(PREFIX, demo_redirect),
        web.get(PREFIX + "/config.json", demo_config),
        web.get(PREFIX + "/{path:.*}", demo_file),
    ]
