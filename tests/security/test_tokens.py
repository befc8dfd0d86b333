"""Bad tokens are refused by both services alike: 401 from the export service, close 4001 from the
gateway (by an `auth` message and by the subprotocol a browser offers). Both are configured with
a required audience and issuer, as a deployment that shares its token issuer with other
services would be."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import jwt
import pytest

from services.common.auth import TokenVerifier
from services.gateway.clients import CLOSE_AUTH_FAILED
from tests.export.conftest import SECRET, Client, ClientFactory
from tests.security.conftest import Refused, open_socket, running_gateway

AUDIENCE = "exportlog-api"
ISSUER = "exportlog-test-issuer"


def claims(**changes: Any) -> dict[str, Any]:
    """The claims of a valid token for Alice on project demo; a change of None drops a claim."""
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": "alice",
        "projects": ["demo"],
        "roles": ["user"],
        "iat": now,
        "exp": now + 600,
        "aud": AUDIENCE,
        "iss": ISSUER,
    }
    base.update(changes)
    return {key: value for key, value in base.items() if value is not None}


def signed(**changes: Any) -> str:
    return jwt.encode(claims(**changes), SECRET, algorithm="HS256")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def tampered() -> str:
    """A valid token whose payload was edited afterwards (every project) and not re-signed."""
    header, _payload, signature = signed().split(".")
    payload = _b64(json.dumps(claims(projects=["*"], roles=["service"])).encode())
    return f"{header}.{payload}.{signature}"


def _hs384() -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)
        return jwt.encode(claims(), SECRET, algorithm="HS384")


def unsigned() -> str:
    """`alg: none`: claims without a signature."""
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{_b64(json.dumps(claims()).encode())}."


BAD_TOKENS = {
    "expired": signed(exp=int(time.time()) - 60),
    "signed with another secret": jwt.encode(claims(), "x" * 40, algorithm="HS256"),
    "payload changed after signing": tampered(),
    "alg none": unsigned(),
    "HS384 instead of HS256": _hs384(),
    "another audience": signed(aud="another-api"),
    "no audience": signed(aud=None),
    "another issuer": signed(iss="someone-else"),
    "no issuer": signed(iss=None),
    "no expiry": signed(exp=None),
    "no subject": signed(sub=None),
    "projects not a list": signed(projects="demo"),
    "not a JWT": "not.a.token",
}


@pytest.fixture
async def api(make_client: ClientFactory) -> Client:
    return await make_client(workers=0, jwt_audience=AUDIENCE, jwt_issuer=ISSUER)


async def test_a_good_token_is_accepted_by_both(api: Client, database_url: str) -> None:
    """The control: with audience and issuer right, both services take the token."""
    good = signed()
    response = await api.get(
        "/projects/demo/export/history", headers={"Authorization": f"Bearer {good}"}
    )
    assert response.status == 200, await response.text()
    async with running_gateway(
        database_url, api, jwt_audience=AUDIENCE, jwt_issuer=ISSUER
    ) as gateway:
        for subprotocol in (False, True):
            ws = await open_socket(gateway, good, subprotocol=subprotocol)
            await ws.close()


async def test_bad_tokens_are_refused_by_both_services(api: Client, database_url: str) -> None:
    async with running_gateway(
        database_url, api, jwt_audience=AUDIENCE, jwt_issuer=ISSUER
    ) as gateway:
        for why, token in BAD_TOKENS.items():
            response = await api.get(
                "/projects/demo/export/history", headers={"Authorization": f"Bearer {token}"}
            )
            assert response.status == 401, (why, await response.text())
            assert (await response.json())["error"]["code"] == "unauthorized", why
            for subprotocol in (False, True):
                with pytest.raises(Refused) as refused:
                    await open_socket(gateway, token, subprotocol=subprotocol)
                assert refused.value.code == CLOSE_AUTH_FAILED, (why, subprotocol)


async def test_without_an_audience_configured_the_gateway_ignores_it(
    api: Client, database_url: str
) -> None:
    """`GATEWAY_JWT_AUDIENCE` and `GATEWAY_JWT_ISSUER` unset, as the export service's: any
    issuer or none passes, and so does a token without an audience; one that names an audience
    is refused, since no audience is this service's."""
    async with running_gateway(database_url, api) as gateway:
        for token in (signed(aud=None, iss=None), signed(aud=None, iss="someone-else")):
            ws = await open_socket(gateway, token)
            await ws.close()
        with pytest.raises(Refused) as refused:
            await open_socket(gateway, signed())
        assert refused.value.code == CLOSE_AUTH_FAILED


@pytest.mark.parametrize(
    ("environ", "signed_with"),
    [
        ({"EXPORT_JWT_SECRET": "e" * 32, "JWT_SECRET": "s" * 32}, "e" * 32),
        ({"JWT_SECRET": "s" * 32}, "s" * 32),
    ],
)
def test_the_token_command_signs_with_the_export_services_secret(
    environ: dict[str, str], signed_with: str, tmp_path: Path
) -> None:
    """`exportlog token` reads the secret as the export service does: its own variable first.
    Reading only JWT_SECRET, it signed with another secret than a deployment configured with
    EXPORT_JWT_SECRET, and every token it printed was refused."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("EXPORT_JWT_SECRET", "JWT_SECRET")
    }
    env.update(environ, EXPORTLOG_DATA_DIR=str(tmp_path))
    printed = subprocess.run(
        [sys.executable, "-m", "services.cli", "token", "--user", "carol", "--project", "p1"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    principal = TokenVerifier(secret=signed_with).verify(printed)
    assert principal.user_id == "carol"
    assert principal.projects == frozenset({"p1"})
