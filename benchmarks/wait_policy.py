"""How a stage's OpenMP threads wait for work: omni serve with its stages' torch threads
sleeping at once (`OMP_WAIT_POLICY=PASSIVE`), spinning briefly (omni's default,
`GOMP_SPINCOUNT=10000`), or spinning as long as libgomp's default has them (300,000 turns),
side by side in one run.

    python benchmarks/wait_policy.py [--rounds 3] [--burn 2] [--json out.json]

The servers are started at once (`omni serve` on the embedded default, no speech stage) and
measured in turn, round after round, so that other users' load on a shared machine falls on
all alike; those not measured are idle. Each round sends each server 16 new scanned pages at
8 in flight and 4 more one at a time (a chat with the page as an image: the OCR stage reads it,
the LLM answers one token), then 3 chats of 32 generated tokens one at a time and 16 at 8 in
flight. libgomp's default is had by an empty `OMP_WAIT_POLICY`, which omni keeps and libgomp
reads as unset (it warns once about the value).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from perception import make_pages, omni_seconds, pool_seconds, start_omni
from server_procs import log, stop

# The environment each server starts with (its stages inherit it).
POLICIES = {
    "sleep (OMP_WAIT_POLICY=PASSIVE)": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin briefly (omni's default: GOMP_SPINCOUNT=10000)": {},
    "spin (libgomp's default, 300,000 turns)": {"OMP_WAIT_POLICY": ""},
}


def burn() -> None:
    while True:
        pass


async def chat_seconds(url: str, count: int, concurrency: int, tokens: int) -> float:
    async with httpx.AsyncClient(timeout=600) as client:

        async def one(number: int) -> None:
            body = {"model": "SmolLM2-135M-Instruct", "max_tokens": tokens,
                    "temperature": 0, "ignore_eos": True, "messages": [
                        {"role": "user", "content": f"Tell a story about {number}."}]}
            reply = await client.post(f"{url}/v1/chat/completions", json=body)
            assert reply.status_code == 200, reply.text

        # Highest number first, as the prompts always went.
        return await pool_seconds(one, list(reversed(range(count))), concurrency)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--burn", type=int, default=0,
                        help="busy processes to run meanwhile, as other users' load")
    parser.add_argument("--json", default=None, help="write the figures here too")
    args = parser.parse_args()

    pages = make_pages(args.rounds * len(POLICIES) * 20 + 1)
    seconds = {name: [0.0, 0.0, 0.0, 0.0] for name in POLICIES}
    servers = {}
    burners: list[multiprocessing.Process] = []
    with tempfile.TemporaryDirectory() as folder:
        try:
            for index, (name, policy) in enumerate(POLICIES.items()):
                for variable in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
                    os.environ.pop(variable, None)
                os.environ.update(policy)
                work = Path(folder) / str(index)
                work.mkdir()
                servers[name] = start_omni("--asr-replicas 0", work)
            for _, url in servers.values():
                asyncio.run(omni_seconds("ocr", url, [pages[-1]], 1))
                asyncio.run(chat_seconds(url, 2, 1, 8))
            burners = [multiprocessing.Process(target=burn, daemon=True)
                       for _ in range(args.burn)]
            for burner in burners:
                burner.start()
            for round_index in range(args.rounds):
                for name, (_, url) in servers.items():
                    batch = pages[:20]
                    pages = pages[20:]
                    totals = seconds[name]
                    totals[0] += asyncio.run(omni_seconds("ocr", url, batch[:16], 8))
                    totals[1] += sum(asyncio.run(omni_seconds("ocr", url, [page], 1))
                                     for page in batch[16:])
                    totals[2] += asyncio.run(chat_seconds(url, 3, 1, 32))
                    totals[3] += asyncio.run(chat_seconds(url, 16, 8, 32))
                log(f"round {round_index + 1} of {args.rounds} done")
        finally:
            for burner in burners:
                burner.terminate()
            for proc, _ in servers.values():
                stop(proc)  # type: ignore[arg-type]

    rounds = args.rounds
    rows = {name: {"pages_per_s_x8": 16 * rounds / t[0], "page_alone_s": t[1] / (4 * rounds),
                   "tokens_per_s_alone": 96 * rounds / t[2],
                   "tokens_per_s_x8": 512 * rounds / t[3]}
            for name, t in seconds.items()}
    print(f"\nmachine: {os.cpu_count()} CPU cores, {args.burn} busy processes added; load "
          f"average at the end: {os.getloadavg()[0]:.1f}")
    print("| OpenMP threads | pages/s, 8 in flight | s a page, alone | tokens/s, 1 at a time "
          "| tokens/s, 8 in flight |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['pages_per_s_x8']:.2f} | {row['page_alone_s']:.2f} | "
              f"{row['tokens_per_s_alone']:.1f} | {row['tokens_per_s_x8']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
