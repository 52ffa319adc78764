"""vLLM 0.24.0's own load client, `vllm bench serve`, against `vllm serve` and then against
`omni serve` on the same model folder, one server at a time on GPU 0 (issue 11).

On the GPU machine, after scripts/gpu_vllm_setup.sh (it installs vLLM and omni and builds the
model folders; scripts/vllm_bundle.sh builds what it installs):
    python3 benchmarks/serve_vs_vllm.py --workloads b,c     # then: --workloads a
    python3 benchmarks/serve_vs_vllm.py --workloads c --servers omni --omni-args "--option x=y"
    python3 benchmarks/serve_vs_vllm.py --from-results /tmp/serve-vs-vllm  # tables, no runs

Workloads (WORKLOADS below; the load flags are VLLM.md's; both get --max-model-len 2048):
  a  Qwen2.5-VL-7B geometry, random bf16 weights, one 448x448 image + 64 tokens: req/s ratio.
  b  SmolLM2-135M-Instruct (the embedded default, real weights, bf16): out tok/s ratio.
  c  Qwen2.5-7B geometry, dummy weights on both sides: out tok/s ratio.
vLLM runs at its defaults (CUDA graphs, torch.compile) with VLLM_USE_FLASHINFER_SAMPLER=0
(flashinfer does not travel). The client starts with its server and waits for it
(--ready-check-timeout-sec: its import and sampling overlap the server's start-up, which is
printed; its one ready-check request is the same for both). --out-dir (default $OUT) gets
results.json (the client's JSON of each run, plus startup_s), results.md (the tables) and
logs.tar.gz (server and client logs): three files, as a device call brings back at most eight.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vllm_models
from server_procs import STARTED, healthy, kill_leftovers, log, spawn, stop, tail, wait_gpu_free

SERVERS = ("vllm", "omni")
NAME = "m"  # --served-model-name on both sides
MAX_MODEL_LEN = "2048"
VLLM = [sys.executable, "-m", "vllm.entrypoints.cli.main"]
OMNI = [sys.executable, "-m", "omni.cli"]
ENV = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
ENV |= {"PYTHONUNBUFFERED": "1", "VLLM_USE_FLASHINFER_SAMPLER": "0"}
MIN_RUN_S = 150.0  # with --deadline, no run starts with less time left
MAIN_RUN = "Starting main benchmark run"  # the client prints this once its ready check passed


@dataclass(frozen=True)
class Workload:
    title: str
    folder: str  # under --models
    load: str  # `vllm bench serve` dataset flags
    vllm: str  # extra `vllm serve` flags
    omni: str  # extra `omni serve` flags
    metric: str  # the ratio that answers the issue


TEXT = "--dataset-name random --random-input-len 256 --random-output-len 128 --ignore-eos"
IMAGE = """--dataset-name random-mm --random-input-len 64 --random-output-len 128 --ignore-eos
  --random-mm-base-items-per-request 1 --random-mm-num-mm-items-range-ratio 0
  --random-mm-limit-mm-per-prompt '{"image": 1, "video": 0}'
  --random-mm-bucket-config '{(448, 448, 1): 1.0}'"""
WORKLOADS = {
    "a": Workload(
        "Qwen2.5-VL-7B geometry, random bf16: 448x448 image + 64 tokens -> 128, "
        "256 requests, 64 in flight",
        vllm_models.VL7B,
        f"{IMAGE} --num-prompts 256 --max-concurrency 64",
        """--limit-mm-per-prompt '{"image": 1, "video": 0}'""",
        "--devices llm=0,vision=0",
        "request_throughput",
    ),
    "b": Workload(
        "SmolLM2-135M-Instruct bf16 (real weights): 512 x (256 -> 128), 128 in flight",
        vllm_models.SMOLLM2,
        f"{TEXT} --num-prompts 512 --max-concurrency 128",
        "",
        "--devices llm=0",
        "output_throughput",
    ),
    "c": Workload(
        "Qwen2.5-7B geometry, dummy weights: 512 x (256 -> 128), 128 in flight",
        vllm_models.QWEN7B,
        f"{TEXT} --num-prompts 512 --max-concurrency 128",
        "--load-format dummy",
        "--devices llm=0 --option load_format=dummy",
        "output_throughput",
    ),
}
# (column, result key, format); the last row gives omni / vLLM of each, counts left out.
COLUMNS = (
    ("req/s", "request_throughput", "{:.2f}"),
    ("out tok/s", "output_throughput", "{:.0f}"),
    ("TTFT med ms", "median_ttft_ms", "{:.1f}"),
    ("TTFT p99 ms", "p99_ttft_ms", "{:.1f}"),
    ("TPOT med ms", "median_tpot_ms", "{:.2f}"),
    ("completed", "completed", "{:d}"),
    ("failed", "failed", "{:d}"),
    ("start-up s", "startup_s", "{:.1f}"),
)
LABELS = {"vllm": "vLLM 0.24.0", "omni": "omni"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workloads", default="a,b,c", help="comma-separated, run in this order")
    p.add_argument("--servers", default="vllm,omni", help="comma-separated, run in this order")
    p.add_argument("--models", type=Path, default=vllm_models.default_root())
    default_out = os.environ.get("OUT") or "out/serve-vs-vllm"
    p.add_argument("--out-dir", type=Path, default=Path(default_out))
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/serve-vs-vllm"))
    p.add_argument("--omni-args", default="", help="extra flags for omni serve")
    p.add_argument("--vllm-args", default="", help="extra flags for vllm serve")
    p.add_argument("--bench-args", default="", help="extra flags for vllm bench serve")
    p.add_argument("--port", type=int, default=8100, help="vLLM's port; omni's is this + 100")
    p.add_argument("--startup-timeout", type=float, default=420.0)
    p.add_argument("--bench-timeout", type=float, default=300.0, help="after the server is up")
    deadline = "seconds after which no run starts and a running one stops (servers outlive a call)"
    p.add_argument("--deadline", type=float, default=None, help=deadline)
    p.add_argument("--from-results", type=Path, default=None, help="only tabulate DIR's JSON")
    args = p.parse_args(argv)
    args.ports = {"vllm": args.port, "omni": args.port + 100}
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not args.workloads or set(args.workloads) - set(WORKLOADS):
        p.error(f"--workloads takes a comma-separated list of {sorted(WORKLOADS)}")
    if not args.servers or set(args.servers) - set(SERVERS):
        p.error(f"--servers takes a comma-separated list of {SERVERS}")
    return args


def server_command(args: argparse.Namespace, wl: Workload, server: str, folder: Path) -> list[str]:
    common = f"--served-model-name {NAME} --host 127.0.0.1 --port {args.ports[server]}"
    common += f" --max-model-len {MAX_MODEL_LEN}"
    if server == "vllm":
        return [*VLLM, "serve", str(folder), *shlex.split(f"{common} {wl.vllm} {args.vllm_args}")]
    # The workloads send text and images only, as vLLM serves them: no speech generation and
    # no perception stages (whose Whisper and PP-OCR weights the GPU bundle does not carry).
    flags = f"{common} --no-speech --asr-replicas 0 --ocr-replicas 0 {wl.omni} {args.omni_args}"
    return [*OMNI, "serve", str(folder), *shlex.split(flags)]


def bench_command(args: argparse.Namespace, key: str, server: str, folder: Path) -> list[str]:
    flags = f"""--backend openai-chat --endpoint /v1/chat/completions
      --base-url http://127.0.0.1:{args.ports[server]} --served-model-name {NAME}
      {WORKLOADS[key].load} --save-result --result-filename {key}-{server}.json --disable-tqdm
      --ready-check-timeout-sec {int(args.startup_timeout + 60)} {args.bench_args}"""
    paths = ["--model", str(folder), "--tokenizer", str(folder), "--result-dir", str(args.work_dir)]
    return [*VLLM, "bench", "serve", *paths, *shlex.split(flags)]


def run_one(args: argparse.Namespace, key: str, server: str, folder: Path) -> dict[str, Any]:
    """One server up, the client's run against it, the server down: the client's result JSON
    plus startup_s (or an "error")."""
    wl, stem = WORKLOADS[key], args.work_dir / f"{key}-{server}"
    result_file = stem.with_suffix(".json")
    result_file.unlink(missing_ok=True)
    url = f"http://127.0.0.1:{args.ports[server]}"
    log(f"({key}) starting {server}: {shlex.join(server_command(args, wl, server, folder))}")
    started = time.monotonic()
    server_log, client_log = Path(f"{stem}.server.log"), Path(f"{stem}.bench.log")
    proc = spawn(server_command(args, wl, server, folder), server_log, ENV)
    with open(args.work_dir / "servers.pids", "a") as pids:  # see kill_leftovers
        pids.write(f"{proc.pid}\n")
    client = spawn(bench_command(args, key, server, folder), client_log, ENV)
    up: float | None = None
    error = None
    try:
        while client.poll() is None:
            now = time.monotonic() - started
            if proc.poll() is not None:
                error = f"{server} exited with {proc.returncode}"
            elif up is None and healthy(url):
                up = now
                log(f"({key}) {server} up in {up:.1f} s")
            elif up is None and now > args.startup_timeout:
                error = f"{server} was not healthy within {args.startup_timeout:.0f} s"
            elif up is not None and now - up > args.bench_timeout:
                error = f"the client ran over --bench-timeout {args.bench_timeout:.0f} s"
            elif up is not None and now - up > 90 and MAIN_RUN not in tail(client_log, 10**6):
                error = "the client's ready-check request still fails 90 s after /health"
            elif left(args) <= 0:
                error = f"stopped at --deadline {args.deadline:.0f} s"
            if error:
                break
            time.sleep(0.5)
        if error is None and client.returncode != 0:
            error = f"the client exited with {client.returncode}"
        if error is None and not result_file.exists():
            error = f"the client wrote no {result_file}"
    finally:
        stop(client, grace=5)
        stop(proc)
    log(f"({key}) {server} stopped, {time.monotonic() - started:.1f} s in all")
    if left(args) >= MIN_RUN_S:  # another run may follow
        wait_gpu_free()
    if error:
        log(f"({key}) {server} FAILED: {error}\n{server} log:\n{tail(server_log)}")
        print(f"client log:\n{tail(client_log)}", flush=True)
        return {"error": error, "startup_s": up}
    result: dict[str, Any] = json.loads(result_file.read_text())
    result["startup_s"] = up
    result_file.write_text(json.dumps(result))  # so that --from-results shows it too
    log(f"({key}) {server}: {result['output_throughput']:.0f} out tok/s")
    return result


def left(args: argparse.Namespace) -> float:
    """Seconds left before --deadline (infinite without one)."""
    deadline = float("inf") if args.deadline is None else float(args.deadline)
    return deadline - (time.monotonic() - STARTED)


def cell(result: dict[str, Any], key: str, fmt: str) -> str:
    value = result.get(key)
    return "-" if value is None else fmt.format(int(value) if fmt == "{:d}" else float(value))


def ratio(results: dict[str, dict[str, Any]], key: str) -> float | None:
    mine, peer = results.get("omni", {}).get(key), results.get("vllm", {}).get(key)
    if mine is None or not peer:
        return None
    return float(mine) / float(peer)


def table(key: str, results: dict[str, dict[str, Any]]) -> str:
    """The markdown table of one workload: a row per server, then omni / vLLM."""
    wl = WORKLOADS[key]
    lines = [
        f"### ({key}) {wl.title}",
        "",
        "| server | " + " | ".join(c[0] for c in COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for server in SERVERS:
        if server in results:
            r = results[server]
            cells = [cell(r, key, fmt) for _, key, fmt in COLUMNS]
            note = f" ({r['error']})" if r.get("error") else ""
            lines.append(f"| {LABELS[server]}{note} | " + " | ".join(cells) + " |")
    values = [
        ratio(results, k) if k not in ("completed", "failed") else None for _, k, _ in COLUMNS
    ]
    ratios = ["-" if value is None else f"{value:.2f}x" for value in values]
    lines.append("| omni / vLLM | " + " | ".join(ratios) + " |")
    main = ratio(results, wl.metric)
    name = next(col for col, k, _ in COLUMNS if k == wl.metric)
    verdict = "-" if main is None else f"{main:.2f}x"
    lines += ["", f"**({key}) {name}, omni / vLLM: {verdict}**", ""]
    return "\n".join(lines)


def write_outputs(args: argparse.Namespace, everything: dict[str, dict[str, Any]]) -> str:
    text = "\n".join(table(key, everything[key]) for key in everything)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results.json").write_text(json.dumps(everything, indent=1))
    (args.out_dir / "results.md").write_text(text)
    if args.from_results is None and args.work_dir.is_dir():
        with tarfile.open(args.out_dir / "logs.tar.gz", "w:gz") as archive:
            archive.add(args.work_dir, arcname="serve-vs-vllm")
    return text


def load_saved(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    everything: dict[str, dict[str, Any]] = {}
    for key in args.workloads:
        for server in args.servers:
            path = args.from_results / f"{key}-{server}.json"
            if path.exists():
                everything.setdefault(key, {})[server] = json.loads(path.read_text())
    return everything


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_results is not None:
        print(write_outputs(args, load_saved(args)))
        return 0
    # A SIGTERM (a call's timeout) unwinds through run_one's `finally`, which stops the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(f"{Path(__file__).name}: SIGTERM"))
    args.work_dir.mkdir(parents=True, exist_ok=True)
    kill_leftovers(args.work_dir)
    wait_gpu_free()  # a warning if something else still holds the GPU
    everything: dict[str, dict[str, Any]] = {}
    failed = False
    for key in args.workloads:
        try:  # scripts/gpu_vllm_setup.sh built them already; else this builds them now
            folder = vllm_models.folder_for(args.models.expanduser(), key)
        except Exception as exc:
            log(f"({key}) could not build its model folder: {exc!r}")
            everything[key] = {server: {"error": f"model folder: {exc!r}"} for server in SERVERS}
            failed = True
            continue
        for server in args.servers:
            if left(args) < MIN_RUN_S:
                log(f"({key}) {server} skipped: {left(args):.0f} s left before --deadline")
                everything.setdefault(key, {})[server] = {"error": "skipped at --deadline"}
                failed = True
                continue
            result = run_one(args, key, server, folder)
            failed |= bool(result.get("error") or result.get("failed"))
            everything.setdefault(key, {})[server] = result
            write_outputs(args, everything)  # after every run: a call cut short keeps them
        print("\n" + table(key, everything[key]), flush=True)
    text = write_outputs(args, everything)
    if len(everything) > 1:
        print("\n" + text, flush=True)
    log(f"done; results in {args.out_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
