"""Stage-side Prometheus metrics, read at scrape time from the objects that already count them.

* the router: requests running (sent, not finished) per replica, waiting for a replica per
  stage, and sent per replica; replicas lost and requests failed;
* the supervisor: stage restarts;
* each replica's latest heartbeat (`StageWorker.stats`, decoded with its role's contract):
  the LLM engine's own running, waiting and encoding queues, KV cache usage, prefix-cache token
  counters and media items encoded or found in its encoder-output cache; each encoder
  replica's queue, requests encoded and forward passes; each image replica's queue, images
  generated and pipeline calls; each speech replica's requests, sentences and seconds;
* the API process's encoder-output cache: queries, hits and bytes held.

Names follow vLLM's (`vllm:num_requests_waiting` -> `omni:num_requests_waiting`,
`vllm:kv_cache_usage_perc`, `vllm:prefix_cache_queries`), with `stage` and `replica` labels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from omni.cache.encoder_cache import EncoderCache
from omni.server.perception import Perception
from omni.stages.contracts import asr, audio, image, llm, ocr, speech, vision
from omni.stages.contracts.asr import ASRStats
from omni.stages.contracts.encoder import EncoderStats
from omni.stages.contracts.image import ImageStats
from omni.stages.contracts.llm import LLMStats
from omni.stages.contracts.ocr import OCRStats
from omni.stages.contracts.speech import SpeechStats
from omni.supervision.replicas import ReplicaInfo
from omni.supervision.router import StageRouter

logger = logging.getLogger(__name__)

S = TypeVar("S")
S_co = TypeVar("S_co", covariant=True)


class _StatsDecoder(Protocol[S_co]):
    """What is needed of a role's contract here (any `Contract` is one)."""

    def decode_stats(self, body: bytes | memoryview) -> S_co: ...


@dataclass(frozen=True)
class _Stat(Generic[S]):
    """One metric family read from a role's stats struct."""

    name: str
    documentation: str
    is_counter: bool
    value: Callable[[S], float]


_LLM_STATS: list[_Stat[LLMStats]] = [
    _Stat(
        "omni:llm_requests_running", "Requests in the LLM engine's running batch", False,
        lambda s: s.requests_running,
    ),
    _Stat(
        "omni:llm_requests_waiting", "Requests in the LLM engine's waiting queue", False,
        lambda s: s.requests_waiting,
    ),
    _Stat(
        "omni:llm_requests_encoding",
        "Requests in an LLM engine waiting for their media items' embeddings", False,
        lambda s: s.requests_encoding,
    ),
    _Stat(
        "omni:kv_cache_usage_perc", "Fraction of KV blocks in use (0 to 1)", False,
        lambda s: s.kv_cache_usage,
    ),
    _Stat(
        "omni:kv_cache_blocks_used", "KV blocks held by requests", False,
        lambda s: s.kv_blocks_used,
    ),
    _Stat(
        "omni:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", True,
        lambda s: s.prefix_cache_queries,
    ),
    _Stat(
        "omni:prefix_cache_hits", "Prompt tokens served from the prefix cache", True,
        lambda s: s.prefix_cache_hits,
    ),
    _Stat(
        "omni:llm_items_encoded", "Media items an LLM engine asked an encoder stage for", True,
        lambda s: s.items_encoded,
    ),
    _Stat(
        "omni:llm_items_from_encoder_cache",
        "Media items an LLM engine found in its encoder-output cache", True,
        lambda s: s.items_from_encoder_cache,
    ),
]  # fmt: skip
# Encoder stage replicas (vision, audio), labelled by stage too.
_ENCODER_STATS: list[_Stat[EncoderStats]] = [
    _Stat(
        "omni:encoder_requests_queued", "Requests queued in an encoder stage replica", False,
        lambda s: s.requests_queued,
    ),
    _Stat(
        "omni:encoder_requests_encoded", "Requests an encoder stage replica has encoded", True,
        lambda s: s.requests_encoded,
    ),
    _Stat(
        "omni:encoder_forwards", "Batched forward passes of an encoder stage replica", True,
        lambda s: s.forwards,
    ),
]  # fmt: skip
_IMAGE_STATS: list[_Stat[ImageStats]] = [
    _Stat(
        "omni:image_requests_queued", "Requests queued in an image stage replica", False,
        lambda s: s.requests_queued,
    ),
    _Stat(
        "omni:images_generated", "Images an image stage replica has generated", True,
        lambda s: s.images_generated,
    ),
    _Stat(
        "omni:image_pipeline_calls", "Batched pipeline calls of an image stage replica", True,
        lambda s: s.pipeline_calls,
    ),
]  # fmt: skip
_SPEECH_STATS: list[_Stat[SpeechStats]] = [
    _Stat(
        "omni:speech_requests_active", "Requests a speech stage replica is speaking", False,
        lambda s: s.requests_active,
    ),
    _Stat(
        "omni:speech_sentences", "Sentences a speech stage replica has synthesized", True,
        lambda s: s.sentences,
    ),
    _Stat(
        "omni:speech_audio_seconds", "Seconds of audio a speech stage replica has made", True,
        lambda s: s.audio_seconds,
    ),
    _Stat(
        "omni:speech_synthesis_seconds", "Seconds a speech stage replica spent synthesizing",
        True, lambda s: s.synthesis_seconds,
    ),
]  # fmt: skip


_OCR_STATS: list[_Stat[OCRStats]] = [
    _Stat(
        "omni:ocr_requests_queued", "Images queued in an OCR stage replica", False,
        lambda s: s.requests_queued,
    ),
    _Stat(
        "omni:ocr_images_read", "Images and pages an OCR stage replica has read", True,
        lambda s: s.images_read,
    ),
    _Stat(
        "omni:ocr_lines_found", "Text lines an OCR stage replica has found", True,
        lambda s: s.lines_found,
    ),
    _Stat(
        "omni:ocr_busy_seconds", "Seconds an OCR stage replica spent reading", True,
        lambda s: s.busy_seconds,
    ),
]  # fmt: skip
_ASR_STATS: list[_Stat[ASRStats]] = [
    _Stat(
        "omni:asr_requests_queued", "Clips queued or being heard in an asr stage replica",
        False, lambda s: s.requests_queued,
    ),
    _Stat(
        "omni:asr_requests_transcribed", "Clips an asr stage replica has transcribed", True,
        lambda s: s.requests_transcribed,
    ),
    _Stat(
        "omni:asr_batches", "Batched passes of an asr stage replica", True,
        lambda s: s.batches,
    ),
    _Stat(
        "omni:asr_audio_seconds", "Seconds of audio an asr stage replica has heard", True,
        lambda s: s.audio_seconds,
    ),
    _Stat(
        "omni:asr_busy_seconds", "Seconds an asr stage replica spent hearing", True,
        lambda s: s.busy_seconds,
    ),
]  # fmt: skip


def replica_stats(
    contract: _StatsDecoder[S], replicas: Sequence[ReplicaInfo]
) -> list[tuple[ReplicaInfo, S]]:
    """Each replica's latest heartbeat stats in its role's contract; a replica that sent none,
    or stats that do not decode (a stage of another version), is left out (and logged)."""
    decoded = []
    for replica in replicas:
        if not replica.stats:
            continue
        try:
            decoded.append((replica, contract.decode_stats(replica.stats)))
        except ValueError as exc:
            logger.warning("replica %s: %s", replica.replica_id, exc)
    return decoded


def _stat_families(
    table: Sequence[_Stat[S]], replicas: Sequence[tuple[ReplicaInfo, S]], by_stage: bool
) -> Iterator[Metric]:
    """One metric family per stat in `table`, a sample per replica."""
    labels = ["stage", "replica"] if by_stage else ["replica"]
    for stat in table:
        kind = CounterMetricFamily if stat.is_counter else GaugeMetricFamily
        family = kind(stat.name, stat.documentation, labels=labels)
        for replica, stats in replicas:
            values = [replica.role, replica.replica_id] if by_stage else [replica.replica_id]
            family.add_metric(values, float(stat.value(stats)))
        yield family


class StageCollector(Collector):
    """See the module docstring; one per server."""

    def __init__(
        self,
        router: StageRouter,
        restarts: Callable[[], int],
        encoder_cache: EncoderCache | None = None,
        perception: Perception | None = None,
    ) -> None:
        self._router = router
        self._restarts = restarts
        self._encoder_cache = encoder_cache
        self._perception = perception

    def collect(self) -> Iterator[Metric]:
        yield from self._router_metrics()
        yield from self._llm_metrics()
        yield from self._worker_stage_metrics()
        if self._encoder_cache is not None:
            yield from self._encoder_cache_metrics(self._encoder_cache)
        if self._perception is not None:
            yield from self._perception_cache_metrics(self._perception)

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
        replicas = replica_stats(llm.CONTRACT, self._router.replicas(llm.ROLE))
        waiting, _ = self._router.load_snapshot()
        # vLLM's unlabelled gauge: everything not yet running, in the router or an engine.
        yield GaugeMetricFamily(
            "omni:num_requests_waiting",
            "Requests waiting for the LLM: in the router's queue or an engine's",
            value=waiting.get(llm.ROLE, 0) + sum(s.requests_waiting for _, s in replicas),
        )
        yield from _stat_families(_LLM_STATS, replicas, by_stage=False)

    def _worker_stage_metrics(self) -> Iterator[Metric]:
        encoders = [
            *replica_stats(vision.CONTRACT, self._router.replicas(vision.ROLE)),
            *replica_stats(audio.CONTRACT, self._router.replicas(audio.ROLE)),
        ]
        yield from _stat_families(_ENCODER_STATS, encoders, by_stage=True)
        images = replica_stats(image.CONTRACT, self._router.replicas(image.ROLE))
        yield from _stat_families(_IMAGE_STATS, images, by_stage=True)
        voices = replica_stats(speech.CONTRACT, self._router.replicas(speech.ROLE))
        yield from _stat_families(_SPEECH_STATS, voices, by_stage=True)
        readers = replica_stats(ocr.CONTRACT, self._router.replicas(ocr.ROLE))
        yield from _stat_families(_OCR_STATS, readers, by_stage=True)
        hearers = replica_stats(asr.CONTRACT, self._router.replicas(asr.ROLE))
        yield from _stat_families(_ASR_STATS, hearers, by_stage=True)

    @staticmethod
    def _perception_cache_metrics(perception: Perception) -> Iterator[Metric]:
        """Lookups of OCR texts and transcripts by content hash, and those answered without
        a stage request."""
        queries = CounterMetricFamily(
            "omni:perception_cache_queries", "Perception results looked up by content hash",
            labels=["kind"],
        )
        hits = CounterMetricFamily(
            "omni:perception_cache_hits", "Perception results served without a stage request",
            labels=["kind"],
        )
        for kind, cache in (("ocr", perception.pages), ("asr", perception.transcripts)):
            queries.add_metric([kind], cache.queries)
            hits.add_metric([kind], cache.hits)
        yield queries
        yield hits

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
