"""`omni bench serve`: load-test any OpenAI-compatible server and print a latency report."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    p = kinds.add_parser("serve", help="load-test an OpenAI-compatible server")
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="the served model name")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument(
        "--input-words",
        type=int,
        default=128,
        help="random words of text per prompt (about as many tokens)",
    )
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--num-images", type=int, default=0, help="random images per request")
    p.add_argument("--image-size", default="448x448", help="WIDTHxHEIGHT")
    p.add_argument(
        "--image-format",
        choices=("png", "jpeg"),
        default="png",
        help="how random images are sent (vLLM's random-mm client sends JPEG)",
    )
    p.add_argument("--num-audio", type=int, default=0, help="audio clips per request")
    p.add_argument("--audio-seconds", type=float, default=5.0)
    p.add_argument("--pdf-pages", type=int, default=0, help="pages of a PDF per request")
    p.add_argument("--folder", default=None, help="send these image/audio/PDF files instead")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, default=8)
    load.add_argument("--request-rate", type=float, default=None, help="requests per second")
    p.add_argument("--api-key", default=None)
    p.add_argument(
        "--no-ignore-eos",
        action="store_true",
        help="let requests stop at EOS (default: exactly --output-tokens each)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the report here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from omni.bench.dataset import DatasetSpec, build_requests
    from omni.bench.serve import LoadSpec, format_report, run_load, summarize

    try:
        width, height = (int(v) for v in args.image_size.lower().split("x"))
        dataset = DatasetSpec(
            num_prompts=args.num_prompts,
            input_words=args.input_words,
            output_tokens=args.output_tokens,
            num_images=args.num_images,
            image_size=(width, height),
            image_format=args.image_format,
            num_audio=args.num_audio,
            audio_seconds=args.audio_seconds,
            pdf_pages=args.pdf_pages,
            folder=args.folder,
            seed=args.seed,
        )
        load = LoadSpec(
            base_url=args.base_url.rstrip("/"),
            model=args.model,
            concurrency=None if args.request_rate else args.concurrency,
            request_rate=args.request_rate,
            api_key=args.api_key,
            seed=args.seed,
            ignore_eos=not args.no_ignore_eos,
        )
        requests = build_requests(dataset)
    except ValueError as exc:
        print(f"omni bench serve: {exc}", file=sys.stderr)
        return 2
    results, wall = asyncio.run(run_load(load, requests))
    report = summarize(results, wall)
    print(format_report(report))
    errors = sorted({r.error for r in results if not r.ok})
    for error in errors[:5]:
        print(f"error: {error}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if report["failed"] == 0 else 1
