"""Stage-side Prometheus metrics, read at scrape time from the objects that already count them.

* the router: requests running (sent, not finished) per replica, waiting for a replica per
  stage, and sent per replica; replicas lost and requests failed;
* the supervisor: stage restarts;
* each replica's latest heartbeat (`StageWorker.stats`): the LLM engine's own running and
  waiting queues, KV cache usage and prefix-cache token counters; each encoder replica's
  queue, requests encoded and forward passes; each image replica's queue, images generated
  and pipeline calls;
* the API process's encoder-output cache: queries, hits and bytes held.

Names follow vLLM's (`vllm:num_requests_waiting` -> `omni:num_requests_waiting`,
`vllm:kv_cache_usage_perc`, `vllm:prefix_cache_queries`), with `stage` and `replica` labels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from omni.cache.encoder_cache import EncoderCache
from omni.supervision.replicas import ReplicaInfo
from omni.supervision.router import StageRouter

LLM_ROLE = "llm"
# Heartbeat stat -> (metric name, help, counter?) for LLM replicas.
_LLM_STATS = {
    "requests_running": (
        "omni:llm_requests_running", "Requests in the LLM engine's running batch", False
    ),
    "requests_waiting": (
        "omni:llm_requests_waiting", "Requests in the LLM engine's waiting queue", False
    ),
    "kv_cache_usage": ("omni:kv_cache_usage_perc", "Fraction of KV blocks in use (0 to 1)", False),
    "kv_blocks_used": ("omni:kv_cache_blocks_used", "KV blocks held by requests", False),
    "prefix_cache_queries": (
        "omni:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", True
    ),
    "prefix_cache_hits": (
        "omni:prefix_cache_hits", "Prompt tokens served from the prefix cache", True
    ),
}  # fmt: skip
# The same for encoder stage replicas (vision, audio), labelled by stage too.
_ENCODER_STATS = {
    "encoder_requests_queued": (
        "omni:encoder_requests_queued", "Requests queued in an encoder stage replica", False
    ),
    "encoder_requests_encoded": (
        "omni:encoder_requests_encoded", "Requests an encoder stage replica has encoded", True
    ),
    "encoder_forwards": (
        "omni:encoder_forwards", "Batched forward passes of an encoder stage replica", True
    ),
}  # fmt: skip
# The same for image stage replicas.
_IMAGE_STATS = {
    "image_requests_queued": (
        "omni:image_requests_queued", "Requests queued in an image stage replica", False
    ),
    "images_generated": (
        "omni:images_generated", "Images an image stage replica has generated", True
    ),
    "image_pipeline_calls": (
        "omni:image_pipeline_calls", "Batched pipeline calls of an image stage replica", True
    ),
}  # fmt: skip
# The same for speech stage replicas.
_SPEECH_STATS = {
    "speech_requests_active": (
        "omni:speech_requests_active", "Requests a speech stage replica is speaking", False
    ),
    "speech_sentences": (
        "omni:speech_sentences", "Sentences a speech stage replica has synthesized", True
    ),
    "speech_audio_seconds": (
        "omni:speech_audio_seconds", "Seconds of audio a speech stage replica has made", True
    ),
    "speech_synthesis_seconds": (
        "omni:speech_synthesis_seconds", "Seconds a speech stage replica spent synthesizing",
        True,
    ),
}  # fmt: skip


def _stat_families(
    table: dict[str, tuple[str, str, bool]], replicas: list[ReplicaInfo], by_stage: bool
) -> Iterator[Metric]:
    """One metric family per heartbeat stat in `table`, a sample per replica reporting it."""
    labels = ["stage", "replica"] if by_stage else ["replica"]
    for stat, (name, documentation, is_counter) in table.items():
        kind = CounterMetricFamily if is_counter else GaugeMetricFamily
        family = kind(name, documentation, labels=labels)
        for replica in replicas:
            if stat in replica.stats:
                values = [replica.role, replica.replica_id] if by_stage else [replica.replica_id]
                family.add_metric(values, replica.stats[stat])
        yield family


class StageCollector(Collector):
    """See the module docstring; one per server."""

    def __init__(
        self,
        router: StageRouter,
        restarts: Callable[[], int],
        encoder_cache: EncoderCache | None = None,
    ) -> None:
        self._router = router
        self._restarts = restarts
        self._encoder_cache = encoder_cache

    def collect(self) -> Iterator[Metric]:
        yield from self._router_metrics()
        yield from self._llm_metrics()
        yield from self._worker_stage_metrics()
        if self._encoder_cache is not None:
            yield from self._encoder_cache_metrics(self._encoder_cache)

    def _router_metrics(self) -> Iterator[Metric]:
        counters = self._router.counters
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
        waiting, sent = self._router.load_snapshot()
        running = GaugeMetricFamily(
            "omni:stage_requests_running",
            "Requests sent to a stage replica and not finished",
            labels=["stage", "replica"],
        )
        for replica in self._router.replicas():
            running.add_metric([replica.role, replica.replica_id], replica.load)
        yield running
        queued = GaugeMetricFamily(
            "omni:stage_requests_waiting",
            "Requests waiting for a stage replica with room",
            labels=["stage"],
        )
        for role, count in sorted(waiting.items()):
            queued.add_metric([role], count)
        yield queued
        total = CounterMetricFamily(
            "omni:stage_requests",
            "Requests sent to each stage replica",
            labels=["stage", "replica"],
        )
        for (role, replica_id), count in sorted(sent.items()):
            total.add_metric([role, replica_id], count)
        yield total

    def _llm_metrics(self) -> Iterator[Metric]:
        replicas = [r for r in self._router.replicas(LLM_ROLE) if r.stats]
        waiting, _ = self._router.load_snapshot()
        # vLLM's unlabelled gauge: everything not yet running, in the router or an engine.
        yield GaugeMetricFamily(
            "omni:num_requests_waiting",
            "Requests waiting for the LLM: in the router's queue or an engine's",
            value=waiting.get(LLM_ROLE, 0)
            + sum(r.stats.get("requests_waiting", 0.0) for r in replicas),
        )
        yield from _stat_families(_LLM_STATS, replicas, by_stage=False)

    def _worker_stage_metrics(self) -> Iterator[Metric]:
        # Each family samples only the replicas that report its stat.
        replicas = self._router.replicas()
        for table in (_ENCODER_STATS, _IMAGE_STATS, _SPEECH_STATS):
            yield from _stat_families(table, replicas, by_stage=True)

    @staticmethod
    def _encoder_cache_metrics(cache: EncoderCache) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "omni:encoder_cache_queries", "Media items looked up in the encoder-output cache",
            value=cache.queries,
        )  # fmt: skip
        yield CounterMetricFamily(
            "omni:encoder_cache_hits", "Media items whose encoder output was cached",
            value=cache.hits,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "omni:encoder_cache_usage_bytes", "Bytes held by the encoder-output cache",
            value=cache.num_bytes,
        )  # fmt: skip
