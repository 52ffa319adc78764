"""Drives an OpenAI-compatible server with streamed chat completions and reports latency and
throughput, in the spirit of `vllm bench serve`.

Each request streams (`stream_options.include_usage`), so the client sees when every chunk
arrives: time to first token (TTFT), the gaps between chunks (inter-token latency, ITL), and
time per output token after the first (TPOT). Requests go out at a fixed concurrency or at a
Poisson request rate.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np

from omni.bench.dataset import BenchRequest


@dataclass(frozen=True)
class LoadSpec:
    base_url: str
    model: str
    # At most this many requests in flight; None means no limit (use request_rate).
    concurrency: int | None = 8
    # Requests per second, arrivals drawn from a Poisson process; None sends at once.
    request_rate: float | None = None
    api_key: str | None = None
    timeout_s: float = 600.0
    seed: int = 0
    # Sent as vLLM's `ignore_eos`, so every request generates exactly its output tokens.
    ignore_eos: bool = True

    def __post_init__(self) -> None:
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.request_rate is not None and self.request_rate <= 0:
            raise ValueError(f"request_rate must be positive, got {self.request_rate}")


@dataclass
class RequestResult:
    ok: bool
    output_tokens: int = 0
    prompt_tokens: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""


async def _one(
    session: aiohttp.ClientSession, load: LoadSpec, request: BenchRequest
) -> RequestResult:
    body: dict[str, Any] = {
        "model": load.model,
        "messages": [{"role": "user", "content": request.content}],
        "max_tokens": request.output_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if load.ignore_eos:
        body["ignore_eos"] = True
    headers = {"Authorization": f"Bearer {load.api_key}"} if load.api_key else {}
    start = time.perf_counter()
    result = RequestResult(ok=False)
    last = start
    try:
        async with session.post(
            f"{load.base_url}/v1/chat/completions", json=body, headers=headers
        ) as response:
            if response.status != 200:
                text = (await response.read()).decode(errors="replace")
                return RequestResult(ok=False, error=f"HTTP {response.status}: {text[:200]}")
            async for line in _lines(response.content):
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[len(b"data: ") :])
                if chunk.get("usage"):
                    result.output_tokens = int(chunk["usage"]["completion_tokens"])
                    result.prompt_tokens = int(chunk["usage"]["prompt_tokens"])
                choices = chunk.get("choices") or []
                if choices and choices[0].get("delta", {}).get("content"):
                    now = time.perf_counter()
                    if result.ttft_s == 0.0:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last)
                    last = now
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
        return RequestResult(ok=False, error=f"{type(exc).__name__}: {exc}")
    result.latency_s = time.perf_counter() - start
    result.ok = True
    return result


async def _lines(stream: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """The body's lines as they arrive, however long (aiohttp's own line reader stops at its
    buffer size)."""
    pending = b""
    async for data in stream.iter_any():
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r")
    if pending:
        yield pending


async def run_load(
    load: LoadSpec, requests: list[BenchRequest]
) -> tuple[list[RequestResult], float]:
    """Sends every request; returns the results in request order and the wall time."""
    limit = asyncio.Semaphore(load.concurrency or len(requests))
    rng = random.Random(load.seed)

    async def limited(session: aiohttp.ClientSession, request: BenchRequest) -> RequestResult:
        async with limit:
            return await _one(session, load, request)

    # aiohttp rather than httpx: httpx's connection pool scans every connection on each
    # request and each response, which at 128 streams made the client, not the server, the
    # bottleneck (an H100 run measured 4.6k tok/s with httpx, 11.2k with aiohttp).
    connector = aiohttp.TCPConnector(limit=load.concurrency or 0)
    timeout = aiohttp.ClientTimeout(total=load.timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        tasks = []
        for request in requests:
            tasks.append(asyncio.create_task(limited(session, request)))
            if load.request_rate is not None:
                await asyncio.sleep(rng.expovariate(load.request_rate))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


def summarize(results: list[RequestResult], wall_s: float) -> dict[str, float]:
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    report: dict[str, float] = {
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": wall_s,
        "request_throughput": len(done) / wall_s,
        "output_throughput": output_tokens / wall_s,
        "total_input_tokens": sum(r.prompt_tokens for r in done),
        "total_output_tokens": output_tokens,
    }
    tpot = [(r.latency_s - r.ttft_s) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    series = {
        "ttft_ms": [r.ttft_s * 1e3 for r in done],
        "tpot_ms": [t * 1e3 for t in tpot],
        "itl_ms": [gap * 1e3 for r in done for gap in r.itl_s],
        "e2el_ms": [r.latency_s * 1e3 for r in done],
    }
    for name, values in series.items():
        data = np.asarray(values if values else [0.0])
        report[f"mean_{name}"] = float(data.mean())
        report[f"median_{name}"] = float(np.median(data))
        report[f"p99_{name}"] = float(np.percentile(data, 99))
    return report


def format_report(report: dict[str, float]) -> str:
    lines = [
        f"{'Successful requests:':<40}{int(report['completed']):>12}",
        f"{'Failed requests:':<40}{int(report['failed']):>12}",
        f"{'Benchmark duration (s):':<40}{report['duration_s']:>12.2f}",
        f"{'Total input tokens:':<40}{int(report['total_input_tokens']):>12}",
        f"{'Total generated tokens:':<40}{int(report['total_output_tokens']):>12}",
        f"{'Request throughput (req/s):':<40}{report['request_throughput']:>12.2f}",
        f"{'Output token throughput (tok/s):':<40}{report['output_throughput']:>12.2f}",
    ]
    for name, title in (
        ("ttft", "Time to First Token"),
        ("tpot", "Time per Output Token"),
        ("itl", "Inter-token Latency"),
        ("e2el", "End-to-end Latency"),
    ):
        lines.append(f"{'-' * 15}{title:^22}{'-' * 15}")
        for stat in ("mean", "median", "p99"):
            label = f"{stat.capitalize() if stat != 'p99' else 'P99'} {name.upper()} (ms):"
            lines.append(f"{label:<40}{report[f'{stat}_{name}_ms']:>12.2f}")
    return "\n".join(lines)
