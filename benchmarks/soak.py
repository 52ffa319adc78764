"""Soak test (issue 14): mixed requests at high concurrency while a random stage process is
SIGKILLed every minute; only requests in flight at a kill may fail, and with 503; memory stays
flat; nothing is left behind.

    python3 benchmarks/soak.py                          # 10,000 requests at 64 in flight
    python3 benchmarks/soak.py --requests 500 --kill-every 20   # a quick check

Two `omni serve` processes, each with its stages as supervised processes, on the tiny random
checkpoints the tests build offline (CPU): a Qwen2.5-VL one (LLM + vision stage) serves text,
images and PDFs; a Qwen2-Audio one (LLM + audio stage) serves audio. The load mixes plain and
streamed chat completions (a fifth of the streams are dropped by the client after the first
chunk), image, PDF and audio requests. After a warm-up, every process's RSS is sampled every
few seconds; a random stage replica of either server is SIGKILLed every --kill-every seconds
(the supervisor restarts it). At the end the servers get SIGTERM and /dev/shm and /tmp are
checked for anything they left.

Printed: errors by cause (a 503 is "allowed" only for a request in flight at a kill),
p50/p99 latency by kind, each process's RSS after warm-up and at the end; written: the same as
JSON (--json) and RSS over time as an SVG plot (--plot).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from server_procs import healthy, log, spawn, stop, tail
from svg_plot import line_chart

from omni.bench.dataset import DatasetSpec, build_requests

ROOT = Path(__file__).resolve().parent.parent
# The tiny checkpoints come from the tests' offline builders (random weights, real tokenizers).
sys.path.insert(0, str(ROOT / "tests"))

KINDS = {"text": 0.3, "stream": 0.3, "image": 0.2, "pdf": 0.1, "audio": 0.1}
DISCONNECT_SHARE = 0.2  # of the streams
POOL = 64  # distinct bodies per kind (repeats exercise the caches, as real traffic does)
REQUEST_TIMEOUT_S = 300.0
KEEPALIVE_S = 3.0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--warmup", type=int, default=1000, help="requests before the RSS baseline")
    p.add_argument("--kill-every", type=float, default=60.0, help="seconds between kills")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=8431, help="the VL server's; the audio one's +1")
    p.add_argument("--work-dir", default=None, help="models and logs (default: a temp folder)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--plot", default=None, help="write the RSS plot (SVG) here")
    return p.parse_args()


# ---- servers --------------------------------------------------------------------------------


@dataclass
class Server:
    name: str  # "vl" or "audio"
    model: str  # the served model name
    url: str
    process: Any  # subprocess.Popen


def start_servers(args: argparse.Namespace, work: Path) -> list[Server]:
    from fixtures_qwen2_audio import make_tiny_qwen2_audio
    from fixtures_vl import make_tiny_qwen2_5_vl

    specs = [
        ("vl", make_tiny_qwen2_5_vl(work / "vl"), "vision", args.port),
        ("audio", make_tiny_qwen2_audio(work / "audio"), "audio", args.port + 1),
    ]
    servers = []
    for name, folder, encoder, port in specs:
        command = [
            sys.executable, "-m", "omni.cli", "serve", str(folder), "--port", str(port),
            "--served-model-name", f"soak-{name}", "--devices", f"llm=cpu,{encoder}=cpu",
            "--no-speech", "--option", "num_kv_blocks=2048", "--option", "block_size=16",
            "--max-num-seqs", str(args.concurrency), "--log-level", "WARNING",
        ]  # fmt: skip
        process = spawn(command, work / f"{name}.log")
        servers.append(Server(name, f"soak-{name}", f"http://127.0.0.1:{port}", process))
    deadline = time.monotonic() + 600
    for server in servers:
        while not healthy(server.url):
            if server.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{server.name} server did not start:\n{tail(work / f'{server.name}.log')}"
                )
            time.sleep(0.5)
        log(f"{server.name} server up (pid {server.process.pid})")
    return servers


def processes(servers: list[Server]) -> dict[str, psutil.Process]:
    """Every process of the servers by a stable label: "vl api", "vl llm-0", "vl pdf-0", ..."""
    found: dict[str, psutil.Process] = {}
    for server in servers:
        with contextlib.suppress(psutil.Error):
            api = psutil.Process(server.process.pid)
            found[f"{server.name} api"] = api
            pdf = 0
            for child in api.children():
                argv = child.cmdline()
                if "--replica-id" in argv:
                    found[f"{server.name} {argv[argv.index('--replica-id') + 1]}"] = child
                else:  # the PDF render workers
                    found[f"{server.name} worker-{pdf}"] = child
                    pdf += 1
    return found


def rss_mib(procs: dict[str, psutil.Process]) -> dict[str, float]:
    sizes = {}
    for label, process in procs.items():
        with contextlib.suppress(psutil.Error):
            sizes[label] = process.memory_info().rss / 2**20
    return sizes


# ---- requests -------------------------------------------------------------------------------


@dataclass
class Job:
    kind: str
    server: Server
    body: dict[str, Any]
    disconnect: bool = False


@dataclass
class Outcome:
    kind: str
    started: float
    ended: float
    cause: str  # "ok", "client disconnected", "503", "HTTP 400: ...", "ClientError: ..."
    detail: str = ""


def build_jobs(args: argparse.Namespace, servers: list[Server], count: int, seed: int) -> list[Job]:
    vl, audio = servers
    words = 16

    def pool(**media: Any) -> list[list[dict[str, Any]]]:
        spec = DatasetSpec(num_prompts=POOL, input_words=words, seed=seed, **media)
        return [request.content for request in build_requests(spec)]

    pools = {
        "text": pool(),
        "stream": pool(),
        "image": pool(num_images=1, image_size=(56, 56)),
        "pdf": pool(pdf_pages=1),
        "audio": pool(num_audio=1, audio_seconds=1.0),
    }
    rng = random.Random(seed)
    kinds = rng.choices(list(KINDS), weights=list(KINDS.values()), k=count)
    jobs = []
    for kind in kinds:
        server = audio if kind == "audio" else vl
        content = rng.choice(pools[kind])
        body: dict[str, Any] = {
            "model": server.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": args.max_tokens,
            "temperature": 0,
        }
        if kind == "pdf":
            body["pdf_dpi"] = 36  # an A4 page in ~160 tokens of the tiny model's 512
        if kind == "stream":
            body["stream"] = True
        jobs.append(Job(kind, server, body, kind == "stream" and rng.random() < DISCONNECT_SHARE))
    return jobs


async def send(session: aiohttp.ClientSession, job: Job) -> Outcome:
    started = time.monotonic()

    def done(cause: str, detail: str = "") -> Outcome:
        return Outcome(job.kind, started, time.monotonic(), cause, detail[:400])

    try:
        async with session.post(f"{job.server.url}/v1/chat/completions", json=job.body) as reply:
            if reply.status != 200:
                text = await reply.text()
                return done("503" if reply.status == 503 else f"HTTP {reply.status}", text)
            if not job.body.get("stream"):
                await reply.read()
                return done("ok")
            async for line in reply.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                if job.disconnect:
                    reply.close()  # the client leaves after the first chunk
                    return done("client disconnected")
                event = json.loads(line[6:])
                if "error" in event:  # the stage failed after the stream began
                    unavailable = event["error"].get("type") == "service_unavailable"
                    return done("503" if unavailable else "stream error", str(event["error"]))
            return done("ok")
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return done(f"{type(exc).__name__}", str(exc))


async def run_jobs(jobs: list[Job], concurrency: int) -> list[Outcome]:
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    # Idle connections are dropped before uvicorn's 5 s keep-alive timeout would close them,
    # so that a request never races the server's close of the connection it reuses.
    connector = aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=KEEPALIVE_S)
    semaphore = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def limited(job: Job) -> Outcome:
            async with semaphore:
                return await send(session, job)

        return list(await asyncio.gather(*(limited(job) for job in jobs)))


# ---- the run --------------------------------------------------------------------------------


@dataclass
class Soak:
    servers: list[Server]
    rng: random.Random
    kill_every: float
    sample_every: float
    started: float = field(default_factory=time.monotonic)
    kills: list[tuple[float, str, int]] = field(default_factory=list)  # (t, label, pid)
    samples: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    pids_seen: set[int] = field(default_factory=set)
    folders: set[str] = field(default_factory=set)  # the servers' ipc folders under /tmp

    async def watch(self, stop_event: asyncio.Event) -> None:
        """Sample RSS, and SIGKILL a random stage replica every `kill_every` seconds."""
        next_kill = time.monotonic() + self.kill_every
        while not stop_event.is_set():
            procs = await asyncio.to_thread(processes, self.servers)
            self.pids_seen.update(p.pid for p in procs.values())
            self.folders |= ipc_folders(procs)
            self.samples.append((time.monotonic() - self.started, rss_mib(procs)))
            if time.monotonic() >= next_kill:
                stages = sorted(
                    label for label in procs if "api" not in label and "worker" not in label
                )
                label = self.rng.choice(stages)
                with contextlib.suppress(psutil.Error):
                    procs[label].kill()
                    self.kills.append((time.monotonic(), label, procs[label].pid))
                    log(f"SIGKILLed {label} (pid {procs[label].pid})")
                next_kill += self.kill_every
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop_event.wait(), self.sample_every)

    async def load(self, jobs: list[Job], concurrency: int) -> list[Outcome]:
        stop_event = asyncio.Event()
        watcher = asyncio.ensure_future(self.watch(stop_event))
        try:
            return await run_jobs(jobs, concurrency)
        finally:
            stop_event.set()
            await watcher


def classify(outcomes: list[Outcome], kills: list[tuple[float, str, int]]) -> Counter[str]:
    """Errors by cause. A 503 is allowed only for a request in flight at a kill: one that was
    running when the kill came, or one sent to the killed process in the moment before the
    server noticed its death (the error names the killed pid)."""
    killed = [f"(pid {pid}) was killed by SIGKILL" for _, _, pid in kills]
    causes: Counter[str] = Counter()
    for outcome in outcomes:
        cause = outcome.cause
        if cause == "503":
            at_kill = any(outcome.started <= t <= outcome.ended for t, _, _ in kills) or any(
                words in outcome.detail for words in killed
            )
            cause = "503, in flight at a kill (allowed)" if at_kill else "503, not at a kill"
        causes[cause] += 1
    return causes


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ipc_folders(procs: dict[str, psutil.Process]) -> set[str]:
    """The /tmp folders of the servers' router endpoints, from their stages' --connect."""
    folders = set()
    for process in procs.values():
        with contextlib.suppress(psutil.Error):
            argv = process.cmdline()
            if "--connect" in argv:
                endpoint = argv[argv.index("--connect") + 1]
                folders.add(str(Path(endpoint.removeprefix("ipc://")).parent))
    return folders


def leftovers(pids: set[int], folders: set[str]) -> dict[str, list[str]]:
    owned = [
        name for name in os.listdir("/dev/shm")
        if name.startswith("omni_") and name.split("_")[1].isdigit()
        and int(name.split("_")[1]) in pids
    ]  # fmt: skip
    # Only this run's folders: other programs (a test suite) may be using /tmp/omni-* now.
    tmp = sorted(folder for folder in folders if Path(folder).exists())
    alive = sorted(str(pid) for pid in pids if psutil.pid_exists(pid))
    return {"/dev/shm": owned, "/tmp/omni-*": tmp, "processes": alive}


def report(
    args: argparse.Namespace,
    soak: Soak,
    outcomes: list[Outcome],
    wall_s: float,
    baseline: dict[str, float],
    final: dict[str, float],
    left: dict[str, list[str]],
) -> dict[str, Any]:
    causes = classify(outcomes, soak.kills)
    lines = [
        f"{len(outcomes)} requests at {args.concurrency} in flight in {wall_s:.0f} s "
        f"({len(outcomes) / wall_s:.1f} req/s); {len(soak.kills)} stage kills",
        "",
        "| cause | requests |",
        "|---|---|",
        *(f"| {cause} | {count} |" for cause, count in causes.most_common()),
        "",
        "| kind | requests | p50 latency (ms) | p99 latency (ms) |",
        "|---|---|---|---|",
    ]
    latency: dict[str, dict[str, float]] = {}
    for kind in [*KINDS, "all"]:
        done = [
            o.ended - o.started for o in outcomes if o.cause == "ok" and kind in (o.kind, "all")
        ]
        count = sum(1 for o in outcomes if kind in (o.kind, "all"))
        latency[kind] = {
            "p50_ms": 1000 * percentile(done, 0.5),
            "p99_ms": 1000 * percentile(done, 0.99),
        }
        lines.append(
            f"| {kind} | {count} | {latency[kind]['p50_ms']:.0f} | {latency[kind]['p99_ms']:.0f} |"
        )
    lines += [
        "",
        "| process | RSS after warm-up (MiB) | RSS at the end (MiB) | change |",
        "|---|---|---|---|",
    ]
    for label in sorted(set(baseline) | set(final)):
        before, after = baseline.get(label), final.get(label)
        change = f"{100 * (after - before) / before:+.1f}%" if before and after else "-"
        lines.append(f"| {label} | {before or 0:.0f} | {after or 0:.0f} | {change} |")
    lines += ["", f"left behind: {json.dumps(left)}"]
    print("\n".join(lines), flush=True)
    return {
        "requests": len(outcomes),
        "concurrency": args.concurrency,
        "wall_s": wall_s,
        "causes": dict(causes),
        "latency": latency,
        "kills": soak.kills,
        "rss_baseline_mib": baseline,
        "rss_final_mib": final,
        "left_behind": left,
        "samples": soak.samples,
        "table": "\n".join(lines),
        "errors": [
            {
                "kind": o.kind,
                "cause": o.cause,
                "started": o.started,
                "ended": o.ended,
                "detail": o.detail,
            }
            for o in outcomes
            if o.cause not in ("ok", "client disconnected")
        ],
    }


def main() -> int:
    args = parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="soak-"))
    work.mkdir(parents=True, exist_ok=True)
    servers = start_servers(args, work)
    soak = Soak(servers, random.Random(args.seed), args.kill_every, args.sample_every)
    try:
        log(f"warm-up: {args.warmup} requests")
        warm = asyncio.run(
            run_jobs(build_jobs(args, servers, args.warmup, args.seed), args.concurrency)
        )
        log(f"warm-up causes: {dict(Counter(o.cause for o in warm))}")
        time.sleep(2)
        baseline = rss_mib(processes(servers))
        jobs = build_jobs(args, servers, args.requests, args.seed + 1)
        log(f"load: {len(jobs)} requests, a stage killed every {args.kill_every:g} s")
        soak.started = time.monotonic()
        outcomes = asyncio.run(soak.load(jobs, args.concurrency))
        wall_s = time.monotonic() - soak.started
        # Let restarted replicas finish loading before the last measure.
        deadline = time.monotonic() + 120
        while not all(healthy(s.url) for s in servers) and time.monotonic() < deadline:
            time.sleep(1)
        time.sleep(2)
        final = rss_mib(processes(servers))
        soak.pids_seen.update(p.pid for p in processes(servers).values())
    finally:
        for server in servers:
            stop(server.process)
    time.sleep(1)
    left = leftovers(soak.pids_seen, soak.folders)
    results = report(args, soak, outcomes, wall_s, baseline, final, left)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    if args.plot:
        series: dict[str, list[tuple[float, float]]] = {}
        for t, sizes in soak.samples:
            for label, mib in sizes.items():
                series.setdefault(label, []).append((t, mib))
        kills = [t - soak.started for t, _, _ in soak.kills]
        title = (
            f"RSS during the soak ({len(outcomes)} requests, a stage SIGKILLed at each dashed line)"
        )
        Path(args.plot).write_text(line_chart(title, "seconds", "RSS (MiB)", series, kills))
    bad = sum(
        n
        for cause, n in results["causes"].items()
        if cause not in ("ok", "client disconnected") and "allowed" not in cause
    )
    return 1 if bad or any(left.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
