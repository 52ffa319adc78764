"""`omni generate PROMPT`: answer one prompt with the offline engine and print the answer."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="answer a prompt and print the answer")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument(
        "--model",
        default=None,
        help="model folder or hub id (default: the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--raw",
        action="store_true",
        help="send the prompt as plain text instead of through the chat template",
    )
    p.add_argument("--no-stream", action="store_true", help="print the answer only when complete")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from omni.llm import LLM
    from omni.stages.contracts.sampling import SamplingParams

    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
        )
        llm = LLM(args.model, device=args.device, dtype=args.dtype)
        prompt = args.prompt
        if not args.raw and getattr(llm.tokenizer, "chat_template", None):
            prompt = llm.chat_prompt_ids([{"role": "user", "content": prompt}])
        if args.no_stream:
            print(llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].text)
            return 0
        for output in llm.stream(prompt, params):
            sys.stdout.write(output.outputs[0].text_delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    except ValueError as exc:
        print(f"omni generate: {exc}", file=sys.stderr)
        return 2
