"""Dev-only: where the LLM stage's time goes while it serves, for finding idle GPU time.

Put this folder first on PYTHONPATH and set OMNI_PROFILE_OUT=DIR in the environment of
`omni serve` (benchmarks/profile_serving.py says how). Every process then imports this file
at start-up; in the one that steps an LLM engine it patches the engine's step and its phases.
Nothing here runs unless OMNI_PROFILE_OUT is set. Two modes (OMNI_PROFILE_MODE):

- "timing" (default): every step's wall time and the stepping thread's CPU time, in all and
  per phase (schedule, launch_forward, sample, _resolve), with the tokens and requests it
  scheduled, into DIR/steps.json whenever the stage pauses stepping. A phase whose CPU
  time is far below its wall time waited: for the GIL, or for the device.
- "trace": after OMNI_PROFILE_SKIP_STEPS non-empty steps (default 300), torch.profiler records
  CPU ops and every CUDA kernel of the process (CUPTI is process-wide, but the profiler must
  be started on the thread that steps) for OMNI_PROFILE_SECONDS (default 1.5), into
  DIR/trace.json.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

OUT = os.environ.get("OMNI_PROFILE_OUT")
MODE = os.environ.get("OMNI_PROFILE_MODE", "timing")


def _patch() -> None:
    import torch
    from omni.stages.llm import cuda_graphs, model_runner, scheduler
    from omni.stages.llm import engine as engine_mod

    current: dict[str, float] = {}  # this step's phase times: name -> wall, name.cpu -> cpu
    last_scheduled = [0, 0]

    def timed(cls: object, name: str) -> None:
        original = getattr(cls, name)
        label = f"omni.{getattr(cls, '__name__', '').rsplit('.', 1)[-1]}.{name}"

        def wrapper(*args, **kwargs):
            w0, c0 = time.perf_counter(), time.thread_time()
            with torch.profiler.record_function(label):
                result = original(*args, **kwargs)
            current[name] = current.get(name, 0.0) + time.perf_counter() - w0
            current[name + ".cpu"] = current.get(name + ".cpu", 0.0) + time.thread_time() - c0
            if name == "schedule":
                last_scheduled[:] = [result.num_tokens, len(result.scheduled)]
                with torch.profiler.record_function(
                    f"omni.scheduled tokens={result.num_tokens} requests={len(result.scheduled)}"
                ):
                    pass
            return result

        setattr(cls, name, wrapper)

    timed(scheduler.Scheduler, "schedule")
    timed(model_runner.ModelRunner, "launch_forward")
    timed(model_runner.ModelRunner, "sample")
    timed(engine_mod.LLMEngine, "_resolve")
    # Inside launch_forward: the host inputs, their copies, the decode graphs' replay, the
    # embeddings' copies; the rest of forward_hidden is the eager model's launches.
    timed(model_runner.ModelRunner, "forward_hidden")
    timed(model_runner, "build_host_inputs")
    timed(model_runner, "to_device")
    timed(model_runner, "copy_to_device")
    timed(cuda_graphs.DecodeGraphs, "run")
    timed(cuda_graphs.MixedGraphs, "run")  # recorded as "run" too: the step's kind tells
    original_step = engine_mod.LLMEngine.step
    skip = int(os.environ.get("OMNI_PROFILE_SKIP_STEPS", "300"))
    seconds = float(os.environ.get("OMNI_PROFILE_SECONDS", "1.5"))
    state = {"steps": 0, "prof": None, "started": 0.0, "done": False, "last": time.monotonic()}
    records: list[dict[str, float]] = []

    def flush_when_idle() -> None:
        # Rewritten whole after every pause in stepping: the server may be stopped any time.
        written = 0
        while True:
            time.sleep(0.2)
            if len(records) > written and time.monotonic() - state["last"] > 0.3:
                written = len(records)
                with open(os.path.join(OUT, "steps.json.tmp"), "w") as f:
                    json.dump(records[:written], f)
                os.replace(os.path.join(OUT, "steps.json.tmp"), os.path.join(OUT, "steps.json"))

    if MODE == "timing":
        threading.Thread(target=flush_when_idle, daemon=True, name="profiling-flush").start()

    def step(self):
        if MODE == "timing":
            running = len(self.scheduler.running)
            current.clear()
            last_scheduled[:] = [0, 0]
            w0, c0 = time.perf_counter(), time.thread_time()
            outputs = original_step(self)
            if last_scheduled[1] or running:
                row = dict(current)
                row.update(
                    t=w0,
                    wall=time.perf_counter() - w0,
                    cpu=time.thread_time() - c0,
                    running=running,
                    tokens=last_scheduled[0],
                    requests=last_scheduled[1],
                )
                records.append(row)
                state["last"] = time.monotonic()
            return outputs
        if state["done"]:
            return original_step(self)
        running = len(self.scheduler.running)
        if running:
            state["steps"] += 1
        prof = state["prof"]
        if prof is None and state["steps"] > skip:
            prof = torch.profiler.profile(
                activities=[
                    torch.profiler.ProfilerActivity.CPU,
                    torch.profiler.ProfilerActivity.CUDA,
                ]
            )
            prof.start()
            state["prof"], state["started"] = prof, time.perf_counter()
        with torch.profiler.record_function(f"omni.step running={running}"):
            outputs = original_step(self)
        if prof is not None and time.perf_counter() - state["started"] > seconds:
            state["done"] = True
            prof.stop()
            prof.export_chrome_trace(os.path.join(OUT, "trace.json"))
        return outputs

    engine_mod.LLMEngine.step = step


def _wait_and_patch() -> None:
    # Patch once the engine's module is imported (the stage imports it after start-up).
    for _ in range(6000):
        if {"omni.stages.llm.engine", "omni.stages.llm.model_runner"} <= sys.modules.keys():
            try:
                _patch()
            except Exception as exc:  # a dev hook must never take the stage down
                print(f"profiling hook: {exc!r}", file=sys.stderr)
            return
        time.sleep(0.05)


if OUT:
    os.makedirs(OUT, exist_ok=True)
    threading.Thread(target=_wait_and_patch, daemon=True, name="profiling-hook").start()
