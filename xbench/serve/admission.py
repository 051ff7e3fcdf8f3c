"""Admission: how many rerank requests may be in flight at once."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import AsyncIterator

from xbench.errors import ErrorKind, ServiceError
from xbench.serve.metrics import Metrics


class Admission:
    """At most `limit` rerank requests in flight; the next is answered 429 at once, never queued
    (TEI's try_acquire_permit)."""

    def __init__(self, limit: int, metrics: Metrics):
        self.limit = limit
        self.metrics = metrics
        self._permits = asyncio.Semaphore(limit)

    @asynccontextmanager
    async def permit(self) -> AsyncIterator[None]:
        if self._permits.locked():
            raise ServiceError(ErrorKind.OVERLOADED, f"{self.limit} requests in flight: the limit is "
                               f"max_concurrent_requests={self.limit}; retry shortly", headers={"Retry-After": "1"})
        await self._permits.acquire()  # free: does not wait
        self.metrics.in_flight.inc()
        try:
            yield
        finally:
            self.metrics.in_flight.dec()
            self._permits.release()
