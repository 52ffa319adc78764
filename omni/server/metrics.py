"""Prometheus metrics of the API server, every name under the `omni:` prefix.

Each server gets its own registry (tests run several servers in one process, and the global
registry would refuse the second set of names). Request-level numbers are observed here as
requests stream; stage-side ones (`stage_metrics.StageCollector`) are read at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Latency buckets from a few milliseconds (a cached prefill on a GPU) to minutes (long answers).
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# One decode step: a millisecond on a GPU to a second on a loaded CPU (vLLM's range).
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServerMetrics:
    def __init__(self, collectors: Iterable[Collector] = ()) -> None:
        self.registry = CollectorRegistry()
        self.requests_running = Gauge(
            "omni:num_requests_running", "Requests being generated now", registry=self.registry
        )
        self.requests_finished = Counter(
            "omni:request_finished",
            "Requests finished, by finish reason (stop, length, abort, error)",
            ["finish_reason"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "omni:prompt_tokens", "Prompt tokens of finished requests", registry=self.registry
        )
        self.generation_tokens = Counter(
            "omni:generation_tokens", "Tokens generated", registry=self.registry
        )
        self.time_to_first_token = Histogram(
            "omni:time_to_first_token_seconds",
            "Seconds from admission to the first generated token",
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.e2e_latency = Histogram(
            "omni:e2e_request_latency_seconds",
            "Seconds from admission to the last generated token",
            buckets=_E2E_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "omni:inter_token_latency_seconds",
            "Seconds between two streamed replies of a request, per generated token",
            buckets=_ITL_BUCKETS,
            registry=self.registry,
        )
        self.queue_time = Histogram(
            "omni:request_queue_time_seconds",
            "Seconds a request waited in the LLM engine's queue before its first step",
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        for collector in collectors:
            self.registry.register(collector)

    def render(self) -> bytes:
        return generate_latest(self.registry)
