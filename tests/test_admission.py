"""Admission sheds arrivals that outrun the server, never a closed loop of clients.

The rule is driven here on an injected clock and a backlog whose estimated wait the test sets, so
each case is exact: a closed loop of clients whose queue is far over the bound, a burst onto an
idle server, an open loop that keeps raising the in-flight count, and the shedding spell after it.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from xbench.errors import ServiceError
from xbench.serve.admission import Admission
from xbench.serve.metrics import Metrics

BOUND_S = 2.0


class FixedWait:
    """A backlog whose estimated wait is whatever the test says."""

    def __init__(self) -> None:
        self.wait = 0.0

    def wait_s(self) -> float:
        return self.wait


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Server:
    """Admission plus the requests it let in, each held open until the test answers it."""

    def __init__(self, max_requests: int = 512) -> None:
        self.clock = Clock()
        self.backlog = FixedWait()
        self.admission = Admission(max_requests, BOUND_S, Metrics(), clock=self.clock)
        self.admission.stretch = 1.0  # the rule on the estimate as it is (the stretch has its own test)
        self.open: list[contextlib.AbstractAsyncContextManager] = []
        self.loop = asyncio.new_event_loop()

    def arrive(self) -> bool:
        """True if admitted (it then stays in flight until `answer`), False if shed."""
        permit = self.admission.permit(self.backlog)
        try:
            self.loop.run_until_complete(permit.__aenter__())
        except ServiceError as exc:
            assert exc.status == 429 and int(exc.headers["Retry-After"]) >= 1
            return False
        self.open.append(permit)
        return True

    def answer(self) -> None:
        self.loop.run_until_complete(self.open.pop(0).__aexit__(None, None, None))


@pytest.fixture
def server():
    s = Server()
    yield s
    s.loop.close()


def test_a_closed_loop_far_over_the_bound_is_never_shed(server):
    clients = 16
    server.backlog.wait = 12.0  # 16 requests of 0.8 s: six times the bound
    assert all(server.arrive() for _ in range(clients))  # they start together onto an idle server
    for _ in range(500):  # then each sends its next request as its last is answered
        server.clock.now += 0.8
        server.answer()
        assert server.arrive()
    assert server.admission.in_flight == clients


def test_an_open_loop_that_outruns_the_server_is_shed_once_it_has_answered(server):
    server.backlog.wait = 0.5
    assert server.arrive() and server.arrive()  # under the bound: admitted
    server.backlog.wait = 3.0
    assert server.arrive()  # arriving with the others onto an idle server: admitted
    server.clock.now += 0.3
    server.answer()
    assert server.arrive()  # takes the place of the request just answered
    assert not server.arrive()  # one more would raise the in-flight count: arrivals outrun it
    assert server.admission.in_flight == 3


def test_after_a_shed_every_request_past_the_bound_is_shed_for_the_bound(server):
    server.backlog.wait = 0.5
    for _ in range(4):
        assert server.arrive()
    server.answer()
    server.backlog.wait = 3.0
    assert server.arrive() and not server.arrive()
    server.clock.now += 0.5
    server.answer()
    assert not server.arrive()  # shedding: the level an open loop reached is not held
    server.backlog.wait = 1.5
    assert server.arrive()  # under the bound is always admitted
    server.backlog.wait = 3.0
    server.clock.now += BOUND_S + 0.1  # the spell ends a bound after the last shed ...
    server.answer()
    assert server.arrive()  # ... and a request taking an answered one's place is admitted again


def test_clients_starting_together_are_admitted_and_arrivals_spread_at_a_rate_are_not(server):
    server.backlog.wait = 3.0
    for _ in range(16):  # a closed loop's clients, milliseconds apart, onto an idle server
        assert server.arrive()
        server.clock.now += 0.005
    server.clock.now += 0.07
    assert not server.arrive()  # nothing answered and this one came on its own: arrivals outrun it


def test_a_burst_is_admitted_for_at_most_the_bound_while_nothing_is_answered(server):
    server.backlog.wait = 3.0
    assert server.arrive()  # onto an idle server
    while server.clock.now < 100.0 + BOUND_S - 0.02:
        server.clock.now += 0.015
        assert server.arrive()  # each close behind the last, nothing answered: still the burst
    server.clock.now += 0.02
    assert not server.arrive()  # a bound after it began, still unanswered: arrivals are outrunning it


def test_an_idle_server_forgets_its_level(server):
    server.backlog.wait = 0.5
    for _ in range(8):
        assert server.arrive()
    for _ in range(8):
        server.answer()
    server.backlog.wait = 3.0
    assert server.arrive() and server.arrive()  # a new burst onto the idle server
    server.answer()
    assert server.arrive() and not server.arrive()  # the level is the new burst's (2), not 8


def test_the_stretch_follows_the_slower_requests(server):
    from xbench.serve.admission import INITIAL_STRETCH

    assert Admission(8, BOUND_S, Metrics()).stretch == INITIAL_STRETCH  # a prior until requests teach it
    server.backlog.wait = 1.0
    assert server.arrive()
    server.clock.now += 3.0  # answered after three times its estimated wait
    server.answer()
    risen = server.admission.stretch
    assert risen > 1.5
    assert server.arrive()
    server.clock.now += 1.0  # answered as estimated
    server.answer()
    assert risen - 0.2 < server.admission.stretch < risen  # falls slowly: the bound is on every request


def test_the_request_limit_and_draining_still_apply():
    s = Server(max_requests=2)
    try:
        assert s.arrive() and s.arrive() and not s.arrive()
        s.admission.draining = True
        with pytest.raises(ServiceError) as err:
            s.admission.check(s.backlog)
        assert err.value.status == 503
    finally:
        s.loop.close()


def test_no_bound_means_no_wait_shedding(server):
    server.admission.max_queue_wait_s = 0.0
    server.backlog.wait = 1000.0
    assert all(server.arrive() for _ in range(50))
