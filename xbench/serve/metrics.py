"""Prometheus metrics, `xbench_` prefix, units in the names. Each is recorded where its fact is true:
requests at the route, batches at the model worker, stages when a request completes."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

disable_created_metrics()  # the *_created series double every counter for no use on a dashboard

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
BATCH_TOKENS_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
SEQUENCE_BUCKETS = (16, 32, 64, 96, 128, 192, 256, 384, 512, 1024)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("xbench_requests", "HTTP requests by route and status.", ["route", "status"], registry=r)
        self.request_duration = Histogram("xbench_request_duration_seconds", "Time from request received to response, "
                                          "by route and status (a 429 is a decision: it should take no time).",
                                          ["route", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage_duration = Histogram("xbench_stage_duration_seconds", "Per-request time in each pipeline stage.",
                                        ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.pairs = Counter("xbench_pairs", "Query-document pairs scored.", registry=r)
        self.tokens = Counter("xbench_tokens", "Tokens scored (after truncation, before padding).", registry=r)
        self.batch_size = Histogram("xbench_batch_size_pairs", "Rows per model batch.", buckets=BATCH_ROWS_BUCKETS, registry=r)
        self.batch_tokens = Histogram("xbench_batch_tokens", "Padded tokens per model batch.", buckets=BATCH_TOKENS_BUCKETS,
                                      registry=r)
        self.batch_longest = Histogram("xbench_batch_longest_tokens", "Longest pair per model batch.",
                                       buckets=SEQUENCE_BUCKETS, registry=r)
        self.real_tokens = Counter("xbench_batch_real_tokens", "Real (unpadded) tokens through the model.", registry=r)
        self.padded_tokens = Counter("xbench_batch_padded_tokens", "Padded tokens (rows x padded width) through the model.",
                                     registry=r)
        self.padding_efficiency = Gauge("xbench_padding_efficiency", "Real tokens / tokens the dense layers computed, "
                                        "since start (1 = no compute spent on padding; packed backends compute real "
                                        "tokens only).", registry=r)
        self.batch_duration = Histogram("xbench_batch_duration_seconds", "Forward pass time per model batch.",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.queue_size = Gauge("xbench_queue_size_pairs", "Pairs waiting in the batcher.", registry=r)
        self.queue_wait = Gauge("xbench_queue_wait_estimate_seconds", "Estimated wait of a request arriving now: "
                                "queued tokens / measured tokens per second (admission answers 429 past "
                                "max_queue_wait_ms when arrivals outrun the server).", registry=r)
        self.in_flight = Gauge("xbench_requests_in_flight", "Rerank requests being served.", registry=r)
        self.model_info = Gauge("xbench_model_info", "The served model (value 1).",
                                ["model", "backend", "device", "precision"], registry=r)

    def watch_queue(self, size: Callable[[], int]) -> None:
        self.queue_size.set_function(size)

    def watch_queue_wait(self, seconds: Callable[[], float]) -> None:
        self.queue_wait.set_function(seconds)

    def watch_efficiency(self, efficiency: Callable[[], float]) -> None:
        self.padding_efficiency.set_function(efficiency)
