"""Issue 12, end to end through `omni serve` on the embedded default (SmolLM2-135M-Instruct,
which takes text only), as a fresh install runs it: PDFs, scans, images and speech reach the
model as marked text read by the OCR and speech recognition stages (child processes), and
`/v1/audio/transcriptions` answers as OpenAI's does.

What the LLM stage received is read back with vLLM's `return_token_ids` (the prompt's token ids
as the orchestrator sent them to the stage), decoded with the model's tokenizer.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fixtures_audio import espeak_samples, espeak_wav_bytes, require_espeak
from fixtures_pdf import Page, garbled_text_layer_pdf, minimal_pdf
from fixtures_perception import (
    INVOICE,
    audio_kinds,
    encoded,
    image_kinds,
    invoice_pdf,
    scanned_invoice_pdf,
    sign_png,
    three_page_pdf,
)
from PIL import Image
from server_fixtures import free_port, metric, serve_process, wait_for_metric
from transformers import AutoTokenizer

MODEL = "SmolLM2-135M-Instruct"
PARIS = "The capital of France is Paris"
SIGN = "[image 1, text found by OCR]: EXIT 24\nMain Street\n"
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def server(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`omni serve` with no model argument: the embedded default, its stages child
    processes (the LLM, OCR and speech recognition; no voice)."""
    require_espeak()
    port = free_port()
    env = {**os.environ, "OMNI_CACHE_DIR": str(smollm2_dir.parent.parent)}
    command = [
        sys.executable, "-m", "omni.cli", "serve", "--port", str(port), "--no-speech",
        "--devices", "llm=cpu,ocr=cpu,asr=cpu", "--option", "num_kv_blocks=256",
        "--log-level", "warning",
    ]  # fmt: skip
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    with serve_process(command, log_path, healthy_within_s=300, stop_within_s=60, env=env) as url:
        yield url


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(smollm2_dir)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def pdf_part(data: bytes, filename: str | None = None) -> dict[str, Any]:
    file: dict[str, Any] = {"file_data": f"data:application/pdf;base64,{b64(data)}"}
    if filename:
        file["filename"] = filename
    return {"type": "file", "file": file}


def image_part(data: bytes, mime: str = "image/png") -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{b64(data)}"}}


def audio_part(data: bytes, audio_format: str = "wav") -> dict[str, Any]:
    return {"type": "input_audio", "input_audio": {"data": b64(data), "format": audio_format}}


def chat(server: str, parts: list[dict[str, Any]]) -> httpx.Response:
    body = {"model": MODEL, "max_tokens": 1, "temperature": 0, "return_token_ids": True,
            "messages": [{"role": "user", "content": parts}]}
    return httpx.post(f"{server}/v1/chat/completions", json=body, timeout=300)


def user_turn(server: str, tokenizer: Any, parts: list[dict[str, Any]]) -> str:
    """What the LLM stage got as the user's turn."""
    reply = chat(server, parts)
    assert reply.status_code == 200, reply.text
    prompt = tokenizer.decode(reply.json()["prompt_token_ids"])
    head = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
    tail = "<|im_end|>\n<|im_start|>assistant\n"
    assert prompt.startswith(head) and prompt.endswith(tail), prompt
    return str(prompt[len(head) : -len(tail)])


def stage_requests(server: str, role: str) -> float:
    """Requests the router has sent to the role's one replica (counted in the API process, so
    exact at once, unlike the stages' heartbeat stats)."""
    return metric(server, "omni:stage_requests_total", f'replica="{role}-0",stage="{role}"')


def test_a_pdf_text_layer_reaches_the_prompt(server: str, tokenizer: Any) -> None:
    ocr_before = stage_requests(server, "ocr")
    turn = user_turn(server, tokenizer, [pdf_part(invoice_pdf(), "report.pdf"),
                                         {"type": "text", "text": "What is the total?"}])
    assert turn == f"[document report.pdf, page 1, text layer]: {INVOICE}\nWhat is the total?"
    # A real text layer needs no OCR (nor a rendered page).
    assert stage_requests(server, "ocr") == ocr_before


def test_b_a_scan_is_read_by_ocr(server: str, tokenizer: Any) -> None:
    turn = user_turn(server, tokenizer, [pdf_part(scanned_invoice_pdf(), "scan.pdf")])
    assert turn == f"[document scan.pdf, page 1, text found by OCR]: {INVOICE}\n"
    assert "4711" in turn


def test_garbage_and_empty_text_layers_are_read_by_ocr(server: str, tokenizer: Any) -> None:
    # The invoice with a text layer of private-use code points (a font whose ToUnicode map is
    # wrong), and a page whose only text is a number: both are read from their pixels.
    garbled = garbled_text_layer_pdf(Page(612, 792, (1.0, 1.0, 1.0), INVOICE))
    turn = user_turn(server, tokenizer, [pdf_part(garbled)])
    assert turn == f"[document 1, page 1, text found by OCR]: {INVOICE}\n"
    number_only = minimal_pdf([Page(300, 200, (1.0, 1.0, 1.0), "7")])
    turn = user_turn(server, tokenizer, [pdf_part(number_only)])
    assert turn == "[document 1, page 1: no text found]\n"


def test_c_a_photo_of_a_sign_is_read_by_ocr(server: str, tokenizer: Any) -> None:
    turn = user_turn(server, tokenizer, [image_part(sign_png()),
                                         {"type": "text", "text": "Where does this go?"}])
    assert turn == SIGN + "Where does this go?"
    blank = encoded(Image.new("RGB", (320, 200), (250, 250, 250)), "PNG")
    assert user_turn(server, tokenizer, [image_part(blank)]) == "[image 1: no text found]\n"


def test_d_speech_is_transcribed_and_heard_in_chat(server: str, tokenizer: Any) -> None:
    wav = espeak_wav_bytes(PARIS)
    reply = httpx.post(f"{server}/v1/audio/transcriptions", files={"file": ("paris.wav", wav)},
                       data={"model": "whisper-1"}, timeout=300)
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"text": f"{PARIS}.", "usage": {"type": "duration", "seconds": 3}}
    asr_before = stage_requests(server, "asr")
    hits_before = metric(server, "omni:perception_cache_hits_total", 'kind="asr"')
    turn = user_turn(server, tokenizer, [audio_part(wav)])
    assert turn == f"[audio clip 1, transcript]: {PARIS}.\n"
    # The same clip again: the transcript came from the cache, not the stage.
    assert stage_requests(server, "asr") == asr_before
    assert metric(server, "omni:perception_cache_hits_total", 'kind="asr"') == hits_before + 1
    wait_for_metric(server, "omni:asr_requests_transcribed_total", 1)


def test_transcription_formats_and_stream(server: str) -> None:
    wav = espeak_wav_bytes(PARIS)

    def post(**fields: str) -> httpx.Response:
        return httpx.post(f"{server}/v1/audio/transcriptions",
                          files={"file": ("paris.wav", wav)},
                          data={"model": "whisper-tiny.en", **fields}, timeout=300)

    assert post(response_format="text").text == f"{PARIS}.\n"
    assert post(response_format="srt").text == f"1\n00:00:00,000 --> 00:00:02,000\n{PARIS}.\n\n"
    assert post(response_format="vtt").text == (
        f"WEBVTT\n\n00:00:00.000 --> 00:00:02.000\n{PARIS}.\n\n"
    )
    verbose = post(response_format="verbose_json", **{"timestamp_granularities[]": "segment"})
    body = verbose.json()
    assert (body["task"], body["language"], body["text"]) == ("transcribe", "english",
                                                              f"{PARIS}.")
    assert [(s["id"], s["start"], s["end"], s["text"]) for s in body["segments"]] == [
        (0, 0.0, 2.0, f"{PARIS}.")
    ]
    with httpx.stream("POST", f"{server}/v1/audio/transcriptions",
                      files={"file": ("paris.wav", wav)},
                      data={"model": "whisper-1", "stream": "true"}, timeout=300) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in stream.iter_lines() if line]
    assert events == [
        {"type": "transcript.text.delta", "delta": f"{PARIS}."},
        {"type": "transcript.text.done", "text": f"{PARIS}.",
         "usage": {"type": "duration", "seconds": 3}},
    ]


def test_transcription_refusals_name_the_field(server: str) -> None:
    wav = espeak_wav_bytes("Hello")

    def error(files: dict[str, Any], **fields: str) -> tuple[int, str, str | None]:
        reply = httpx.post(f"{server}/v1/audio/transcriptions", files=files,
                           data={"model": "whisper-1", **fields}, timeout=300)
        detail = reply.json()["error"]
        return reply.status_code, detail["message"], detail["param"]

    clip = {"file": ("a.wav", wav)}
    assert error(clip, temperature="0.4") == (
        400, "temperature 0.4: only 0 is served (greedy decoding)", "temperature")
    assert error(clip, response_format="srt", stream="true")[2] == "response_format"
    assert error({"file": ("sign.png", sign_png())}) == (
        400, "file is an image file; send WAV, FLAC, OGG or MP3 audio (judged by its contents)",
        "file")
    assert error(clip, language="fr") == (
        400, "language 'fr': this Whisper model transcribes English only ('en')", None)
    assert error(clip, model="whisper-large")[0] == 404
    assert error(clip, **{"timestamp_granularities[]": "word",
                          "response_format": "verbose_json"})[2] == "timestamp_granularities[]"


def test_every_valid_media_kind_is_answered(server: str, tokenizer: Any) -> None:
    for name, (data, mime) in image_kinds().items():
        assert user_turn(server, tokenizer, [image_part(data, mime)]) == SIGN, name
    three = user_turn(server, tokenizer, [pdf_part(three_page_pdf(), "three.pdf")])
    assert three == "".join(f"[document three.pdf, page {n}, text layer]: Page {n} of the "
                            "report\n" for n in (1, 2, 3))
    for name, (data, audio_format) in audio_kinds(espeak_samples(PARIS)).items():
        turn = user_turn(server, tokenizer, [audio_part(data, audio_format)])
        if name == "tone.wav":
            assert turn.startswith("[audio clip 1"), turn
        else:
            assert turn.startswith("[audio clip 1, transcript]: ") and "Paris" in turn, (
                name, turn)


def test_invalid_media_gets_a_4xx_naming_the_item(server: str) -> None:
    cut_wav = espeak_wav_bytes("Hello")[:30]
    cases = [
        ([{"type": "text", "text": "hi"}, image_part(sign_png()[:100])],
         "messages[0].content[1] could not be decoded: the file is truncated or corrupt"),
        ([image_part(b"not an image at all")],
         "messages[0].content[0] is not a PNG, JPEG, WebP, GIF or BMP image"),
        ([pdf_part(b"%PDF-1.4 broken", "bad.pdf")],
         "messages[0].content[0] (bad.pdf) could not be read: the PDF is corrupt or truncated"),
        ([audio_part(cut_wav)], "messages[0].content[0]"),
        ([audio_part(b"RIFF", "aac")], "messages[0].content[0]"),
    ]
    for parts, message in cases:
        reply = chat(server, parts)
        assert 400 <= reply.status_code < 500, reply.text
        assert message in reply.json()["error"]["message"], reply.text


def test_uploads_take_every_kind_for_a_text_model(server: str) -> None:
    wav = espeak_wav_bytes(PARIS)
    files = [("file", ("invoice.pdf", invoice_pdf())), ("file", ("sign.png", sign_png())),
             ("file", ("paris.wav", wav))]
    reply = httpx.post(f"{server}/v1/uploads/chat", files=files,
                       data={"prompt": "Summarize.", "max_tokens": "1"}, timeout=300)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["finish_reason"] == "length"
    bad = httpx.post(f"{server}/v1/uploads/chat",
                     files=[("file", ("sign.png", sign_png()[:100]))],
                     data={"max_tokens": "1"}, timeout=300)
    assert bad.status_code == 400
    assert bad.json()["error"]["message"] == (
        "file 1 (sign.png) could not be decoded: the file is truncated or corrupt"
    )
