"""Bearer tokens: who is calling, which projects they may see, what they may do.

Both services verify the same JWTs: HS256 with a shared secret, or RS256/ES256 with a public key
(the issuer keeps the private one). Claims:

    sub       the user (or service) id
    projects  the project ids the caller may access; "*" for every project
    roles     e.g. ["user"], ["auditor"], ["service"]
    exp       expiry (required)

An auditor reads every project and may not change anything; a service may subscribe to the
whole log.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import jwt

ALL_PROJECTS = "*"


class AuthError(Exception):
    """The token is missing, malformed, expired, or not signed by us."""


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller, as its token says."""

    user_id: str
    projects: frozenset[str]
    roles: frozenset[str]
    expires_at: float

    @property
    def is_auditor(self) -> bool:
        return "auditor" in self.roles

    @property
    def actor(self) -> str:
        """How events name this caller."""
        kind = "service" if "service" in self.roles else "user"
        return f"{kind}:{self.user_id}"

    def can_read(self, project_id: str) -> bool:
        return self.is_auditor or ALL_PROJECTS in self.projects or project_id in self.projects

    def can_write(self, project_id: str) -> bool:
        """Start and cancel exports: project members, never auditors (they only read)."""
        if self.is_auditor and not (self.roles - {"auditor"}):
            return False
        return ALL_PROJECTS in self.projects or project_id in self.projects


class TokenVerifier:
    """Checks signatures and claims; built once from configuration."""

    def __init__(
        self,
        *,
        secret: str | None = None,
        public_key: str | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 5.0,
    ) -> None:
        if bool(secret) == bool(public_key):
            raise ValueError("configure exactly one of a JWT secret or a public key")
        self._key: str = secret or public_key or ""
        self._algorithms = ["HS256"] if secret else ["RS256", "ES256", "EdDSA"]
        self._audience = audience
        self._issuer = issuer
        self._leeway = leeway

    def verify(self, token: str) -> Principal:
        """The principal of a valid token; AuthError with a reason a client may see otherwise."""
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": ["exp", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        projects = claims.get("projects", [])
        roles = claims.get("roles", ["user"])
        if not isinstance(projects, list) or not all(isinstance(p, str) for p in projects):
            raise AuthError("invalid token: projects must be a list of strings")
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise AuthError("invalid token: roles must be a list of strings")
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject:
            raise AuthError("invalid token: sub must be a non-empty string")
        return Principal(
            user_id=subject,
            projects=frozenset(projects),
            roles=frozenset(roles),
            expires_at=float(claims["exp"]),
        )


def bearer_token(header: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header."""
    if not header:
        raise AuthError("missing Authorization header")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("Authorization must be 'Bearer <token>'")
    return token.strip()


def issue_token(
    secret: str,
    user_id: str,
    *,
    projects: Iterable[str],
    roles: Iterable[str] = ("user",),
    ttl: float = 3600.0,
    audience: str | None = None,
    issuer: str | None = None,
) -> str:
    """An HS256 token, for development (`make run` prints one) and tests."""
    now = time.time()
    claims: dict[str, object] = {
        "sub": user_id,
        "projects": sorted(projects),
        "roles": sorted(roles),
        "iat": int(now),
        "exp": int(now + ttl),
    }
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm="HS256")
