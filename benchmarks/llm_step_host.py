"""Host time of the LLM engine's steps on a GPU, without a server (dev-only, issue 11).

    python3 benchmarks/llm_step_host.py MODEL_FOLDER      # e.g. the Qwen2.5-VL-7B skeleton

Dummy weights at the folder's geometry. Requests of 330 random prompt tokens -> 128 tokens
(temperature 1) arrive four at a time, a step apart, until 64 run, as image chats reach the
LLM stage while serving. Prints, per kind of step, the wall time and the stepping thread's CPU
time; the Python functions that took the most host time inside steps with prompt tokens
(cProfile over those steps only); the caching allocator's counters; and the host time of one
bf16 GEMM launch at Qwen2.5-7B's MLP shape for a row count seen before and for new ones.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import statistics
import time

import torch
import torch.nn.functional as F
from omni.stages.contracts.sampling import SamplingParams
from omni.stages.llm.config import EngineConfig
from omni.stages.llm.engine import LLMEngine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--arrivals", type=int, default=4, help="requests added before each step")
    args = p.parse_args()
    engine = LLMEngine(
        EngineConfig(
            model=args.model, load_format="dummy", skip_tokenizer_init=True, max_model_len=2048
        )
    )
    rng = random.Random(0)
    vocab = engine.vocab_size
    params = SamplingParams(max_tokens=128, ignore_eos=True, temperature=1.0)
    profiler = cProfile.Profile()
    rows: list[tuple[str, float, float]] = []
    for round_ in range(2):  # the first round warms up (Triton autotuning, allocator)
        rows.clear()
        profiler = cProfile.Profile()
        added = 0
        while added < args.requests or engine.has_unfinished_requests():
            for _ in range(min(args.arrivals, args.requests - added)):
                prompt = [rng.randrange(10, vocab) for _ in range(330)]
                engine.add_request(f"{round_}-{added}", prompt, params)
                added += 1
            waiting = len(engine.scheduler.waiting)
            w0, c0 = time.perf_counter(), time.thread_time()
            if waiting and round_:
                profiler.enable()
            engine.step()
            profiler.disable()
            kind = "with prompt tokens" if waiting else "decode only"
            rows.append((kind, time.perf_counter() - w0, time.thread_time() - c0))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    print("steps of the second round (ms): kind, count, median wall, median cpu, total wall")
    for kind in ("with prompt tokens", "decode only"):
        walls = [w for k, w, _ in rows if k == kind]
        cpus = [c for k, _, c in rows if k == kind]
        print(
            f"  {kind:20s} {len(walls):4d} {statistics.median(walls) * 1e3:8.2f} "
            f"{statistics.median(cpus) * 1e3:8.2f} {sum(walls) * 1e3:9.1f}"
        )
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
    print("\nhost time inside steps with prompt tokens, by function (cProfile, tottime)")
    print("\n".join(out.getvalue().splitlines()[:45]))
    if not torch.cuda.is_available():
        return
    stats = torch.cuda.memory_stats()
    keys = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")
    print("\nallocator:", {k: stats.get(k) for k in keys})
    print(
        f"  reserved {torch.cuda.memory_reserved() / 2**30:.1f} GiB, "
        f"free on device {torch.cuda.mem_get_info()[0] / 2**30:.1f} GiB"
    )

    weight = torch.randn(2 * 18944, 3584, dtype=torch.bfloat16, device="cuda")
    for label, counts in (
        ("the same row count", [2640] * 20),
        ("new row counts", [2000 + 37 * i for i in range(20)]),
    ):
        times = []
        for m in counts:
            x = torch.randn(m, 3584, dtype=torch.bfloat16, device="cuda")
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            F.linear(x, weight)
            times.append(time.perf_counter() - t0)
            torch.cuda.synchronize()
        print(
            f"GEMM launch host time, {label}: median {statistics.median(times) * 1e6:.0f} us,"
            f" max {max(times) * 1e6:.0f} us"
        )


if __name__ == "__main__":
    main()
