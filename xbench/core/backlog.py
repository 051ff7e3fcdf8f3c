"""How long would a request arriving now wait? The work a pipeline has accepted and not yet
scored, in tokens, over the rate its model pool scores tokens at.

`serve` admits a request by this estimate (admission by work, not by count: a request limit
counts a 1-document request like a 1,000-document one). A job adds its tokens when it is
submitted, estimated from its characters until the tokenizer has counted them, and takes them
away as its rows are scored, or all at once when it fails or is cancelled. The rate is measured
on the batches the model pool runs, seeded from the calibrated cost model: while work is waiting,
the real tokens each batch finishes over the wall time since the batch before it finished (so
tokenizing, batching, the server and whatever else shares the machine count, not the forward
pass alone: on 2 cores, forward time alone promised twice the rate the server delivered), and
after an idle spell a batch's forward time spread over the workers. Both are exponential
averages, so the rate follows the backend, the length mix and the machine's load.
"""

from __future__ import annotations

import threading
import time

from xbench.core.cost_model import CostModel

RATE_SMOOTHING = 0.2  # weight of the newest batch in the rate's average
TOKENS_PER_CHAR = 0.3  # English word pieces per character: the guess before any is tokenized
SEED_BATCH = (32, 128)  # rows, length: the batch whose estimated cost seeds the rate


class Backlog:
    def __init__(self, workers: int = 1, cost: CostModel | None = None):
        self.workers = workers
        self._lock = threading.Lock()
        self._tokens = 0.0
        self._tokens_per_s = 0.0
        self._tokens_per_char = TOKENS_PER_CHAR
        self._last_batch_end: float | None = None
        self._busy = False  # work was waiting when the last batch ended
        if cost is not None:
            self.seed(cost)

    def seed(self, cost: CostModel) -> None:
        """A first rate from the cost model, until batches are measured."""
        rows, length = SEED_BATCH
        with self._lock:
            self._tokens_per_s = rows * length * self.workers / cost.batch_cost([length] * rows)

    # -- what jobs report --------------------------------------------------------------------
    def estimate(self, chars: int) -> float:
        """Tokens of pairs with `chars` characters in all, before they are tokenized."""
        return chars * self._tokens_per_char

    def add(self, tokens: float) -> None:
        with self._lock:
            self._tokens = max(0.0, self._tokens + tokens)

    def tokenized(self, chars: int, tokens: int) -> None:
        """Learn the characters-to-tokens ratio of the traffic (it differs across languages)."""
        if chars > 0:
            with self._lock:
                self._tokens_per_char += RATE_SMOOTHING * (tokens / chars - self._tokens_per_char)

    # -- what the model pool reports ----------------------------------------------------------
    def observe_batch(self, real_tokens: int, seconds: float, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        with self._lock:
            span = now - self._last_batch_end if self._busy and self._last_batch_end is not None else seconds / self.workers
            self._last_batch_end = now
            self._busy = self._tokens > real_tokens
            if span <= 0 or real_tokens <= 0:
                return
            rate = real_tokens / span
            self._tokens_per_s = rate if not self._tokens_per_s else (
                self._tokens_per_s + RATE_SMOOTHING * (rate - self._tokens_per_s))

    # -- what admission reads -----------------------------------------------------------------
    @property
    def tokens(self) -> float:
        return self._tokens

    @property
    def tokens_per_s(self) -> float:
        return self._tokens_per_s

    def wait_s(self) -> float:
        """Seconds until the work accepted so far is scored (0 before any rate is known)."""
        with self._lock:
            return self._tokens / self._tokens_per_s if self._tokens_per_s else 0.0
