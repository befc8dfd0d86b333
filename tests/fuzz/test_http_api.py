"""The export service's HTTP API fuzzed against its own OpenAPI document with schemathesis.

Every documented operation gets generated requests (valid ones and, from the negative mode,
invalid ones) against a running service on a real socket, with a valid token whose roles reach
every route, so the authorized paths run and not only the 401s. Path parameters are sometimes
replaced by things that exist (the demo project, a completed and a queued export, a consumer),
so the handlers behind the 404s run too. Each answer must not be a 5xx, and must be one the
document describes: status code, content type, headers and body schema.

`GET /v1/stream` is left out: an event stream never ends, so no answer would ever be complete
(its refusals are covered by tests/export/test_streams.py).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.config import SchemathesisConfig
from schemathesis.schemas import BaseSchema
from schemathesis.specs.openapi import checks as openapi_checks

from services.common.auth import issue_token
from services.export.config import ExportConfig
from services.export.demo import create_demo_project
from services.export.openapi import build_openapi
from tests.fuzz.conftest import ThreadedExportService

SECRET = "fuzz-secret-that-is-long-enough-for-hs256"
TOKEN = issue_token(
    SECRET, "fuzzer", projects=["demo"], roles=["user", "auditor", "service"], ttl=3600
)
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES = 15
"""Generated requests per operation and mode (and schemathesis's own boundary cases besides):
the module runs in about 20 s."""

KNOWN: dict[str, list[str]] = {}
"""What exists in the service under test, by path parameter name (filled by the fixture)."""
ANSWERED: dict[str, set[int]] = {}
"""The statuses each operation answered valid requests with."""

CHECKS = [
    schemathesis.checks.not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_headers_conformance,
    openapi_checks.response_schema_conformance,
]
"""No 5xx, and every answer as documented. Schema-valid requests are not required to succeed:
an opaque history cursor, an unknown event type or a verify range wider than the limit pass the
document's schemas and are still refused with a documented 4xx."""


Test = Callable[..., None]


def _cases(mode: str) -> tuple[Callable[[Test], Test], BaseSchema]:
    """The decorator that runs a test once per operation with cases of `mode`, and its schema."""
    config = SchemathesisConfig.from_dict(
        # The token is sent by the test as it is: generated Authorization headers would only
        # ever reach the 401 path, which the access-control tests cover.
        {"generation": {"mode": mode, "with-security-parameters": False}}
    )
    document = schemathesis.openapi.from_dict(build_openapi(), config=config)
    schema = document.exclude(path="/v1/stream")
    parametrize: Callable[[Test], Test] = schema.parametrize()
    return parametrize, schema


valid_cases, valid_schema = _cases("positive")
invalid_cases, _ = _cases("negative")


def flatmap_path_parameters(context: Any, path_parameters: dict[str, Any] | None) -> Any:
    """The generated parameters, or the same with some replaced by things that exist."""
    known = [name for name in path_parameters or {} if KNOWN.get(name)]
    if not path_parameters or not known:
        return st.just(path_parameters)
    existing = st.fixed_dictionaries({name: st.sampled_from(KNOWN[name]) for name in known})
    return st.one_of(st.just(path_parameters), existing.map(lambda v: {**path_parameters, **v}))


valid_schema.hook(flatmap_path_parameters)


def _wait_until_ended(url: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state: dict[str, Any] = requests.get(url, headers=HEADERS, timeout=10).json()["state"]
        if state["status"] in ("completed", "failed", "cancelled"):
            return state
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not end within 30 s")


@pytest.fixture(scope="module")
def export_service(
    module_database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ThreadedExportService]:
    root = tmp_path_factory.mktemp("fuzz-http")
    create_demo_project(root / "projects", "demo", images=2, seed=11)
    config = ExportConfig(
        database_url=module_database_url,
        port=0,
        pool_min=1,
        pool_max=8,
        jwt_secret=SECRET,
        data_root=str(root / "projects"),
        work_root=str(root / "work"),
        archive_root=str(root / "archives"),
        workers=1,
        poll_interval=0.2,
        worker_id="fuzz-worker",
    )
    # A completed export first (its archive downloadable), with a worker …
    with ThreadedExportService(config) as seeding:
        started = requests.post(f"{seeding.url}/projects/demo/export", headers=HEADERS, timeout=10)
        completed = started.json()["jobId"]
        assert _wait_until_ended(seeding.url + started.json()["statusUrl"])["status"] == (
            "completed"
        )
    # … then the service under test, with none: what it queues stays queued.
    with ThreadedExportService(dataclasses.replace(config, workers=0)) as service:
        started = requests.post(f"{service.url}/projects/demo/export", headers=HEADERS, timeout=10)
        queued = started.json()["jobId"]
        consumer = requests.put(
            f"{service.url}/v1/consumers/fuzz-consumer",
            headers=HEADERS,
            json={"projectId": "demo"},
            timeout=10,
        )
        assert consumer.status_code == 201, consumer.text
        KNOWN.update(
            project_id=["demo"],
            job_id=[completed, queued],
            name=["fuzz-consumer"],
            path=["index.html"],
        )
        yield service
        KNOWN.clear()


FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@valid_cases
@FUZZ_SETTINGS
def test_valid_requests_get_documented_answers_and_no_server_error(
    case: schemathesis.Case[Any], export_service: ThreadedExportService
) -> None:
    response = case.call_and_validate(
        base_url=export_service.url, headers=HEADERS, checks=CHECKS, timeout=10
    )
    ANSWERED.setdefault(case.operation.label, set()).add(response.status_code)


@invalid_cases
@FUZZ_SETTINGS
def test_invalid_requests_are_refused_as_documented(
    case: schemathesis.Case[Any], export_service: ThreadedExportService
) -> None:
    case.call_and_validate(
        base_url=export_service.url,
        headers=HEADERS,
        checks=[*CHECKS, openapi_checks.negative_data_rejection],
        timeout=10,
    )


def test_the_valid_requests_reached_the_handlers_behind_the_token() -> None:
    """A token the service refused, or parameters that never name anything that exists,
    would leave the fuzzing at the 401s and 404s: each of these answered a success too."""
    if not ANSWERED:
        pytest.skip("runs after the fuzzing of valid requests, in the same session")
    succeeded = {label for label, statuses in ANSWERED.items() if min(statuses) < 300}
    job = "/projects/{project_id}/export/{job_id}"
    assert {
        "POST /projects/{project_id}/export",
        "GET /projects/{project_id}/export/history",
        f"GET {job}/status",
        f"GET {job}/events",
        f"GET {job}/download",
        f"GET {job}/timeline",
        f"GET {job}/verify",
        f"POST {job}/cancel",
        "GET /v1/events",
        "GET /v1/audit/events",
        "GET /v1/verify",
        "PUT /v1/consumers/{name}",
        "GET /v1/consumers/{name}",
    } <= succeeded, ANSWERED
