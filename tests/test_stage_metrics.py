"""Stage metrics read from heartbeats: each replica's stats bytes decoded with its role's
contract and exported under the vLLM-style names, exact values per replica."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec
from omni.stages.contracts.encoder import EncoderStats
from omni.stages.contracts.image import ImageStats
from omni.stages.contracts.llm import LLMStats
from omni.stages.contracts.speech import SpeechStats
from prometheus_client.core import Metric

from omni.server.stage_metrics import StageCollector
from omni.supervision.replicas import ReplicaInfo
from omni.supervision.routing import RouterCounters


def _replica(role: str, replica_id: str, stats: msgspec.Struct | bytes | None) -> ReplicaInfo:
    body = (
        stats
        if isinstance(stats, bytes)
        else b""
        if stats is None
        else msgspec.msgpack.encode(stats)
    )
    return ReplicaInfo(
        replica_id=replica_id,
        role=role,
        model="m",
        device="cpu",
        capacity=8,
        pid=1,
        host_id="h",
        shared_memory=False,
        load=2,
        stats=body,
    )


@dataclass
class _FakeRouter:
    """What the collector reads of a router."""

    infos: list[ReplicaInfo]
    waiting: dict[str, int] = field(default_factory=dict)
    counters: RouterCounters = field(default_factory=RouterCounters)

    def replicas(self, role: str | None = None) -> list[ReplicaInfo]:
        return [info for info in self.infos if role is None or info.role == role]

    def load_snapshot(self) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
        return self.waiting, {}


def _samples(metrics: list[Metric], prefix: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    return {
        sample.name: [(s.labels, s.value) for s in metric.samples if s.name == sample.name]
        for metric in metrics
        if metric.name.startswith(prefix)
        for sample in metric.samples
    }


def test_heartbeat_stats_become_metrics_per_role() -> None:
    llm = LLMStats(
        requests_running=3,
        requests_waiting=2,
        requests_encoding=1,
        kv_cache_usage=0.25,
        kv_blocks_used=40,
        kv_blocks_total=160,
        prefix_cache_queries=100,
        prefix_cache_hits=64,
        items_encoded=5,
        items_from_encoder_cache=7,
    )
    router = _FakeRouter(
        [
            _replica("llm", "llm-0", llm),
            _replica("llm", "llm-1", None),  # no heartbeat stats yet: left out
            _replica(
                "vision",
                "vision-0",
                EncoderStats(requests_queued=1, requests_encoded=9, forwards=3),
            ),
            _replica("audio", "audio-0", EncoderStats(requests_encoded=2, forwards=2)),
            _replica(
                "image",
                "image-0",
                ImageStats(requests_queued=4, images_generated=12, pipeline_calls=3),
            ),
            _replica("speech", "speech-0", SpeechStats(1, 6, 2.5, 0.5)),
            _replica("speech", "speech-1", b"\x81\xa3bad\x01"),  # not its contract's: left out
        ],
        waiting={"llm": 4},
    )
    collector = StageCollector(router, restarts=lambda: 0)  # type: ignore[arg-type]
    metrics = list(collector.collect())
    llm_labels = {"replica": "llm-0"}
    assert _samples(metrics, "omni:num_requests_waiting") == {
        "omni:num_requests_waiting": [({}, 6.0)]
    }
    assert _samples(metrics, "omni:llm_") == {
        "omni:llm_requests_running": [(llm_labels, 3.0)],
        "omni:llm_requests_waiting": [(llm_labels, 2.0)],
        "omni:llm_requests_encoding": [(llm_labels, 1.0)],
        "omni:llm_items_encoded_total": [(llm_labels, 5.0)],
        "omni:llm_items_from_encoder_cache_total": [(llm_labels, 7.0)],
    }
    assert _samples(metrics, "omni:kv_cache") == {
        "omni:kv_cache_usage_perc": [(llm_labels, 0.25)],
        "omni:kv_cache_blocks_used": [(llm_labels, 40.0)],
    }
    assert _samples(metrics, "omni:prefix_cache") == {
        "omni:prefix_cache_queries_total": [(llm_labels, 100.0)],
        "omni:prefix_cache_hits_total": [(llm_labels, 64.0)],
    }
    vision = {"stage": "vision", "replica": "vision-0"}
    audio = {"stage": "audio", "replica": "audio-0"}
    assert _samples(metrics, "omni:encoder_") == {
        "omni:encoder_requests_queued": [(vision, 1.0), (audio, 0.0)],
        "omni:encoder_requests_encoded_total": [(vision, 9.0), (audio, 2.0)],
        "omni:encoder_forwards_total": [(vision, 3.0), (audio, 2.0)],
    }
    image = {"stage": "image", "replica": "image-0"}
    assert {
        **_samples(metrics, "omni:image_"),
        **_samples(metrics, "omni:images_"),
    } == {
        "omni:image_requests_queued": [(image, 4.0)],
        "omni:image_pipeline_calls_total": [(image, 3.0)],
        "omni:images_generated_total": [(image, 12.0)],
    }
    speech = {"stage": "speech", "replica": "speech-0"}
    assert _samples(metrics, "omni:speech_") == {
        "omni:speech_requests_active": [(speech, 1.0)],
        "omni:speech_sentences_total": [(speech, 6.0)],
        "omni:speech_audio_seconds_total": [(speech, 2.5)],
        "omni:speech_synthesis_seconds_total": [(speech, 0.5)],
    }
