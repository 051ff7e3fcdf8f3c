"""Admission: which rerank requests may start, decided at once (a request is never parked here).

A request is answered 429 with `Retry-After` when `max_concurrent_requests` are already in flight
(TEI's try_acquire_permit), or when the work already accepted would keep it waiting longer than
`max_queue_wait_ms`: the backlog's estimate (core/backlog.py) of queued tokens over the measured
rate. A count of requests alone lets a queue of large requests grow to a minute of work; the
wait bound sheds the excess instead, so the requests it accepts are answered within the bound
and the server is back to normal latency within about the bound once a burst ends. While the
server drains for shutdown every new request is answered 503 with `Retry-After`.
"""

from __future__ import annotations

import math
from contextlib import asynccontextmanager
from typing import AsyncIterator

from xbench.core.backlog import Backlog
from xbench.errors import ErrorKind, ServiceError
from xbench.serve.metrics import Metrics


class Admission:
    def __init__(self, max_requests: int, max_queue_wait_s: float, metrics: Metrics):
        self.max_requests = max_requests
        self.max_queue_wait_s = max_queue_wait_s  # 0: no bound
        self.metrics = metrics
        self.draining = False
        self.in_flight = 0  # on the event loop only: checking and counting cannot interleave

    @asynccontextmanager
    async def permit(self, backlog: Backlog) -> AsyncIterator[None]:
        self.check(backlog)
        self.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            yield
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()

    def check(self, backlog: Backlog) -> None:
        if self.draining:
            raise ServiceError(ErrorKind.UNAVAILABLE, "the server is shutting down; retry on another replica",
                               headers={"Retry-After": "1"})
        if self.in_flight >= self.max_requests:
            raise ServiceError(ErrorKind.OVERLOADED, f"{self.max_requests} requests in flight: the limit is "
                               f"max_concurrent_requests={self.max_requests}; retry shortly", headers={"Retry-After": "1"})
        wait = backlog.wait_s()
        if self.max_queue_wait_s and wait > self.max_queue_wait_s:
            # Retry once the queue has drained back under the bound.
            retry_after = max(1, math.ceil(wait - self.max_queue_wait_s))
            raise ServiceError(ErrorKind.OVERLOADED, f"the queue holds about {wait:.1f} s of work, over "
                               f"max_queue_wait_ms={self.max_queue_wait_s * 1000:.0f}; retry in {retry_after} s",
                               headers={"Retry-After": str(retry_after)})
