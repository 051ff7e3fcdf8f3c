"""Admission: which rerank requests may start, decided at once (a request is never parked here).

A request is answered 429 with `Retry-After` when `max_concurrent_requests` are already in flight
(TEI's try_acquire_permit), or when arrivals outrun the server: the work already accepted would
keep it waiting longer than `max_queue_wait_ms` (the backlog's estimate, core/backlog.py: queued
tokens over the measured rate) **and** admitting it would raise the number of requests in flight
above the level the server has been carrying. So:

- a closed loop of clients is never shed, however long its queue: each client sends its next
  request when its last is answered, so every arrival takes the place of a finished request and
  the queue never grows past the clients' own concurrency. Shedding them would not lower the
  load (they come back), it would only idle the server between their retries;
- clients that start together onto an idle server are admitted whole: arrivals each within
  `BURST_GAP_S` of the one before, while nothing has been answered yet, for at most
  `max_queue_wait_ms`. A closed loop's clients arrive within milliseconds of each other; an open
  loop's arrivals are spread at its rate, so its start is held to the bound like the rest of it;
- an open loop that outruns the server (arrivals at a rate, whatever the answers) raises the
  in-flight count past its level once the wait is over the bound, and is shed. From that first
  shed on, for `max_queue_wait_ms` (at least a second) after the last one, every request past
  the bound is shed, so the level an open loop reached cannot be held by arrivals that happen to
  follow an answer: the requests it accepts wait about the bound and the server is back to
  normal latency within about the bound once the excess ends.

The wait the bound is held to is the time a request will spend in the server, not only the work
queued ahead of it: the batcher mixes the pairs of several requests by length, so a request
finishes after more than the work ahead of it (on 2 cores, with 32 long-tailed documents a
request, about twice the backlog's estimate). Admission learns that stretch from the requests it
answers (their time in the server over the estimate when they were admitted), starting from that
factor of two, rising fast and falling slowly, and holds the stretched estimate to the bound, so
the requests an open loop gets accepted are answered within about the bound.

While the server drains for shutdown every new request is answered 503 with `Retry-After`.
"""

from __future__ import annotations

import math
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

from xbench.core.backlog import Backlog
from xbench.errors import ErrorKind, ServiceError
from xbench.serve.metrics import Metrics

MIN_SHEDDING_S = 1.0  # shedding lasts at least this long after the last shed request
# The stretch follows the slower requests: it rises fast and falls slowly, so it sits near the
# upper end of what requests take rather than at their mean (the bound is on every request).
STRETCH_RISE, STRETCH_FALL = 0.3, 0.05
INITIAL_STRETCH = 2.0
# Clients started together arrive within a few milliseconds (tens on a loaded 2-core machine);
# Poisson arrivals at a rate that outruns the server are rarely this close.
BURST_GAP_S = 0.02
MIN_LEARNING_WAIT = 0.25  # a request teaches the stretch when its estimate was this share of the bound


class Admission:
    def __init__(self, max_requests: int, max_queue_wait_s: float, metrics: Metrics,
                 clock: Callable[[], float] = time.monotonic):
        self.max_requests = max_requests
        self.max_queue_wait_s = max_queue_wait_s  # 0: no bound
        self.metrics = metrics
        self.clock = clock
        self.draining = False
        # All on the event loop only: checking and counting cannot interleave.
        self.in_flight = 0
        self.level = 0  # the most requests in flight since the server was last idle
        self.answered_since_idle = False
        self.busy_since = 0.0  # when the server last went from idle to busy
        self.last_admitted = 0.0
        self.shedding_until = 0.0
        # Time in the server / estimated wait at admission (never below 1). Until answered requests
        # teach it, assume what 2 cores measured with 32 long-tailed documents a request.
        self.stretch = INITIAL_STRETCH

    @asynccontextmanager
    async def permit(self, backlog: Backlog) -> AsyncIterator[None]:
        self.check(backlog)
        estimate, admitted = backlog.wait_s(), self.clock()
        if not self.in_flight:
            self.busy_since = admitted
        self.last_admitted = admitted
        self.in_flight += 1
        self.level = max(self.level, self.in_flight)
        self.metrics.in_flight.inc()
        try:
            yield
            self._learn(estimate, self.clock() - admitted)
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()
            self.answered_since_idle = self.in_flight > 0
            if not self.in_flight:
                self.level = 0

    def check(self, backlog: Backlog) -> None:
        if self.draining:
            raise ServiceError(ErrorKind.UNAVAILABLE, "the server is shutting down; retry on another replica",
                               headers={"Retry-After": "1"})
        if self.in_flight >= self.max_requests:
            raise ServiceError(ErrorKind.OVERLOADED, f"{self.max_requests} requests in flight: the limit is "
                               f"max_concurrent_requests={self.max_requests}; retry shortly", headers={"Retry-After": "1"})
        wait = backlog.wait_s() * self.stretch
        if not self.max_queue_wait_s or wait <= self.max_queue_wait_s or self._keeps_pace():
            return
        self.shedding_until = self.clock() + max(self.max_queue_wait_s, MIN_SHEDDING_S)
        retry_after = max(1, math.ceil(wait - self.max_queue_wait_s))  # once the queue is back under the bound
        raise ServiceError(ErrorKind.OVERLOADED, f"arrivals outrun the server: a request arriving now would spend "
                           f"about {wait:.1f} s in it, over max_queue_wait_ms={self.max_queue_wait_s * 1000:.0f}; retry in {retry_after} s",
                           headers={"Retry-After": str(retry_after)})

    def _learn(self, estimate: float, in_server: float) -> None:
        if self.max_queue_wait_s and estimate >= MIN_LEARNING_WAIT * self.max_queue_wait_s:
            sample = in_server / estimate
            weight = STRETCH_RISE if sample > self.stretch else STRETCH_FALL
            self.stretch = max(1.0, self.stretch + weight * (sample - self.stretch))

    def _keeps_pace(self) -> bool:
        """Would admitting one more keep the in-flight count where the server's clients hold it?"""
        now = self.clock()
        if now < self.shedding_until:
            return False
        starting = not self.in_flight or (not self.answered_since_idle and now - self.last_admitted <= BURST_GAP_S
                                          and now - self.busy_since < self.max_queue_wait_s)
        return starting or self.in_flight < self.level
