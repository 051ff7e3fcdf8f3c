"""Optional bearer-token auth for every route but /health."""

from __future__ import annotations

import secrets

from starlette.requests import Request

from xbench.errors import ErrorKind, ServiceError

SERVER_API_KEY_ENV = "XBENCH_SERVER_API_KEY"  # the key the server requires (the client's is XBENCH_API_KEY)


class Auth:
    """Optional bearer-token auth, compared in constant time."""

    def __init__(self, key: str | None):
        self.key = key

    def check(self, request: Request) -> None:
        if not self.key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.key.encode()):
            raise ServiceError(ErrorKind.UNAUTHORIZED, "missing or wrong API key: send `Authorization: Bearer <key>`",
                               headers={"WWW-Authenticate": "Bearer"})
