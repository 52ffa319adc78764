"""`omni bench serve` against a freshly started `omni serve`, and the same text load through the
offline engine in one run: how much of the engine's throughput survives the HTTP edge.

Run on a GPU (the embedded default model, its LLM stage on GPU 0):
    python3 benchmarks/serving.py --devices llm=0 --offline
A multimodal model, its vision stage beside the LLM stage, images then PDF pages then the
images again (served from the caches):
    python3 benchmarks/serving.py /path/to/vl --devices llm=0,vision=0 --runs image,pdf,image
On the CPU (small numbers):
    python3 benchmarks/serving.py --devices llm=cpu --num-prompts 8 --concurrency 4 --offline

* serve: `omni serve MODEL --no-speech` as a subprocess (its stages as their own processes),
  then the load client of `omni bench serve` (streamed chat completions, `ignore_eos`, greedy)
  at --concurrency requests in flight. Each entry of --runs is one report: `text` sends
  --input-words random words, `image` adds --num-images random images of --image-size, `pdf`
  a PDF of --pdf-pages random pages. The same seed gives the same requests, so a repeated
  entry repeats its requests.
* offline (--offline, text runs only): the same conversations through `omni.LLM.chat` in this
  process after the server has exited, with max_num_seqs equal to --concurrency so that both
  sides batch at most as many requests; its time covers the chat template and tokenization.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from typing import Any

import httpx

from omni.bench.dataset import BenchRequest, DatasetSpec, build_requests
from omni.bench.serve import LoadSpec, format_report, run_load, summarize

RUNS = ("text", "image", "pdf")
# Counters printed after the runs: where the work went and what the caches saved.
METRICS = re.compile(
    r"^omni:(stage_requests_total|prefix_cache_(queries|hits)_total|encoder_cache_\w+_total)"
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model", nargs="?", default=None, help="model folder (default: SmolLM2)")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--devices", default="llm=0", help="passed to omni serve --devices")
    p.add_argument("--port", type=int, default=8013)
    p.add_argument("--runs", default="text", help=f"comma-separated, each one of {RUNS}")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--input-words", type=int, default=256)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--num-images", type=int, default=1, help="per request of an image run")
    p.add_argument("--image-size", default="448x448", help="WIDTHxHEIGHT")
    p.add_argument("--pdf-pages", type=int, default=2, help="per request of a pdf run")
    p.add_argument("--offline", action="store_true", help="also time the offline engine")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    args = p.parse_args()
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = sorted(set(args.runs) - set(RUNS))
    if unknown or not args.runs:
        p.error(f"--runs takes a comma-separated list of {RUNS}, got {unknown or 'nothing'}")
    return args


def dataset(args: argparse.Namespace, run: str) -> DatasetSpec:
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    return DatasetSpec(
        num_prompts=args.num_prompts,
        input_words=args.input_words,
        output_tokens=args.output_tokens,
        num_images=args.num_images if run == "image" else 0,
        image_size=(width, height),
        pdf_pages=args.pdf_pages if run == "pdf" else 0,
    )


def start_server(args: argparse.Namespace) -> subprocess.Popen[bytes]:
    command = ["omni", "serve", "--port", str(args.port), "--devices", args.devices]
    command += ["--no-speech", "--log-level", "WARNING"]
    if args.model:
        command.insert(2, args.model)
    if args.served_model_name:
        command += ["--served-model-name", args.served_model_name]
    print("$", " ".join(command), flush=True)
    # Its own process group, so that stopping it reaches every stage process it started.
    server = subprocess.Popen(command, start_new_session=True)
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"omni serve exited with {server.returncode} before it was healthy")
        try:
            if httpx.get(f"{base_url(args)}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_server(server)
    raise RuntimeError(f"omni serve was not healthy within {args.startup_timeout:.0f} s")


def stop_server(server: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server, which stops its stages; then SIGKILL to whatever of its process
    group is left."""
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)


def base_url(args: argparse.Namespace) -> str:
    return f"http://127.0.0.1:{args.port}"


def served_model(args: argparse.Namespace) -> str:
    models = httpx.get(f"{base_url(args)}/v1/models", timeout=10).json()["data"]
    names = [m["id"] for m in models]
    wanted = args.served_model_name or names[0]
    if wanted not in names:
        raise RuntimeError(f"the server lists {names}, not {wanted!r}")
    return str(wanted)


def serve_runs(args: argparse.Namespace) -> list[tuple[str, dict[str, float]]]:
    server = start_server(args)
    try:
        load = LoadSpec(
            base_url=base_url(args), model=served_model(args), concurrency=args.concurrency
        )
        reports = []
        for run in args.runs:
            requests = build_requests(dataset(args, run))
            results, wall = asyncio.run(run_load(load, requests))
            report = summarize(results, wall)
            print(f"\n== serve: {run} ==\n{format_report(report)}", flush=True)
            for error in sorted({r.error for r in results if not r.ok})[:5]:
                print(f"error: {error}", flush=True)
            reports.append((run, report))
        time.sleep(2)  # the stages' counters arrive with their heartbeats, about once a second
        metrics = httpx.get(f"{base_url(args)}/metrics", timeout=10).text
        print("\n" + "\n".join(line for line in metrics.splitlines() if METRICS.match(line)))
        return reports
    finally:
        stop_server(server)


def conversation(request: BenchRequest) -> list[dict[str, Any]]:
    (text,) = (part["text"] for part in request.content if part["type"] == "text")
    return [{"role": "user", "content": text}]


def offline_run(args: argparse.Namespace) -> dict[str, float]:
    from omni.stages.contracts.sampling import SamplingParams

    from omni.llm import LLM

    # The LLM stage's device as --devices names it: a GPU index, or a torch device.
    device = dict(item.split("=", 1) for item in args.devices.split(","))["llm"]
    llm = LLM(
        args.model,
        device=f"cuda:{device}" if device.isdigit() else device,
        max_num_seqs=args.concurrency,
    )
    requests = build_requests(dataset(args, "text"))
    params = SamplingParams(max_tokens=args.output_tokens, ignore_eos=True, temperature=0.0)
    llm.chat([conversation(requests[0])], replace(params, max_tokens=4), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outputs = llm.chat([conversation(r) for r in requests], params, use_tqdm=False)
    wall = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"\n== offline: {len(outputs)} requests, {tokens} tokens in {wall:.2f} s ==", flush=True)
    return {"output_throughput": tokens / wall, "request_throughput": len(outputs) / wall}


def main() -> None:
    args = parse_args()
    reports = serve_runs(args)
    offline = offline_run(args) if args.offline and "text" in args.runs else None
    print(
        f"\n{'run':<8}{'req/s':>8}{'out tok/s':>11}{'TTFT med/p99 ms':>18}"
        f"{'TPOT med ms':>13}{'vs offline':>12}"
    )
    for run, r in reports:
        ratio = (
            f"{r['output_throughput'] / offline['output_throughput']:.2f}x"
            if offline and run == "text"
            else "-"
        )
        ttft = f"{r['median_ttft_ms']:.1f}/{r['p99_ttft_ms']:.1f}"
        print(
            f"{run:<8}{r['request_throughput']:>8.2f}{r['output_throughput']:>11.1f}{ttft:>18}"
            f"{r['median_tpot_ms']:>13.2f}{ratio:>12}"
        )
        if r["failed"]:
            sys.exit(f"{int(r['failed'])} requests of the {run} run failed")
    if offline:
        print(
            f"{'offline':<8}{offline['request_throughput']:>8.2f}"
            f"{offline['output_throughput']:>11.1f}"
        )


if __name__ == "__main__":
    main()
