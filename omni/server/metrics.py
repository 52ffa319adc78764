"""Prometheus metrics of the API server, every name under the `omni:` prefix.

Each server gets its own registry (tests run several servers in one process, and the global
registry would refuse the second set of names). Stage restarts and router counters are read
at scrape time from the objects that already count them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from omni.supervision.routing import RouterCounters

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Latency buckets from a few milliseconds (a cached prefill on a GPU) to minutes (long answers).
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _StageCollector(Collector):
    """Stage restarts (from the supervisor) and replica churn (from the router), at scrape."""

    def __init__(self, counters: Callable[[], RouterCounters], restarts: Callable[[], int]) -> None:
        self._counters = counters
        self._restarts = restarts

    def collect(self) -> Iterator[CounterMetricFamily]:
        counters = self._counters()
        yield CounterMetricFamily(
            "omni:stage_restarts", "Stage replicas restarted after dying", value=self._restarts()
        )
        yield CounterMetricFamily(
            "omni:stage_replicas_lost", "Stage replicas dropped from routing",
            value=counters.replicas_lost,
        )  # fmt: skip
        yield CounterMetricFamily(
            "omni:stage_requests_failed", "Stage requests failed by the router",
            value=counters.requests_failed,
        )  # fmt: skip


class ServerMetrics:
    def __init__(
        self,
        router_counters: Callable[[], RouterCounters],
        stage_restarts: Callable[[], int],
    ) -> None:
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
        self.registry.register(_StageCollector(router_counters, stage_restarts))

    def render(self) -> bytes:
        return generate_latest(self.registry)
