"""HTTP pieces both services use: JSON errors, Prometheus exposition, health answers."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

log = structlog.get_logger(__name__)
_encoder = msgspec.json.Encoder()

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ErrorBody(msgspec.Struct, frozen=True):
    code: str
    message: str


class ErrorResponse(msgspec.Struct, frozen=True):
    error: ErrorBody


def json_response(
    value: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """Encode with msgspec (Structs, UUIDs, datetimes, Raw payloads) into a JSON response."""
    return web.Response(
        body=_encoder.encode(value),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_response(status: int, code: str, message: str) -> web.Response:
    return json_response(ErrorResponse(ErrorBody(code, message)), status=status)


class HttpMetrics:
    """Request counts and latencies by route, in a registry of the application's own."""

    def __init__(self, registry: CollectorRegistry, service: str) -> None:
        self.registry = registry
        self.requests = Counter(
            "http_requests",
            "HTTP requests answered",
            ["service", "route", "method", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "Time to answer an HTTP request",
            ["service", "route"],
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )
        self.service = service

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def error_middleware(metrics: HttpMetrics) -> Middleware:
    """Answer every failure as a JSON error, count and time every request.

    A 4xx says what was wrong with the request; anything unexpected is logged with its
    traceback and answered with a 500 that says nothing more.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        route = request.match_info.route.resource
        route_name = route.canonical if route is not None else "unmatched"
        status = 500
        request_id = request_id_of(request)
        # Every log line written while this request is handled carries its id.
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                response = await _answer(request, handler)
                status = response.status
                if not response.prepared:
                    response.headers[REQUEST_ID_HEADER] = request_id
                return response
            except web.HTTPException as exc:  # answered by aiohttp itself (redirects, ...)
                status = exc.status
                exc.headers[REQUEST_ID_HEADER] = request_id
                raise
            finally:
                metrics.requests.labels(
                    metrics.service, route_name, request.method, str(status)
                ).inc()
                metrics.latency.labels(metrics.service, route_name).observe(
                    time.perf_counter() - started
                )

    return middleware


REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID_KEY = web.RequestKey("request_id", str)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id_of(request: web.Request) -> str:
    """The request's id: the caller's X-Request-ID when it is a sane token (so one id can be
    followed across services), else a fresh one. Sent back in the response's X-Request-ID."""
    if _REQUEST_ID_KEY in request:
        return request[_REQUEST_ID_KEY]
    given = request.headers.get(REQUEST_ID_HEADER, "")
    request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
    request[_REQUEST_ID_KEY] = request_id
    return request_id


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The handler's response, with failures turned into JSON errors."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400 and exc.content_type != "application/json":
            response = error_response(exc.status, _code(exc.status), exc.reason)
            for name, value in exc.headers.items():
                # Keep what the handler said beyond the body (Content-Range on a 416,
                # Allow on a 405, WWW-Authenticate on a 401).
                if name.lower() not in ("content-type", "content-length"):
                    response.headers[name] = value
            return response
        raise
    except Exception:
        log.exception("request failed", path=request.path, method=request.method)
        return error_response(500, "internal", "internal error")


def _code(status: int) -> str:
    return {
        400: "bad_request",
        401: "unauthorized",
        403: "forbidden",
        404: "not_found",
        405: "method_not_allowed",
        409: "conflict",
        410: "gone",
        413: "too_large",
        415: "unsupported_media_type",
        416: "range_not_satisfiable",
        422: "invalid",
        429: "too_many_requests",
        503: "unavailable",
    }.get(status, "error")
