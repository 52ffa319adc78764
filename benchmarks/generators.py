"""Image generation throughput: omni's image stage against plain diffusers calls, one run.

Run on a GPU:
    python3 benchmarks/generators.py                 # SD 1.5-size pipeline, 512x512, 20 steps
    python3 benchmarks/generators.py --tiny          # CPU smoke test: a tiny pipeline, 32x32

Both sides load the same random-weight Stable Diffusion pipeline (SD 1.5's UNet, VAE and CLIP
text encoder sizes, built from configs, saved as safetensors) in the same dtype, with the same
DDIM scheduler, prompts, seeds (one CPU generator per image), size, steps and guidance scale.

* plain: `StableDiffusionPipeline.from_pretrained(...)`, then the requests one after another,
  each `pipe(prompt, generator=...)` returning a PIL image: what a diffusers user writes.
* omni: the image stage as its own process (`omni stage image`, started by the supervisor),
  the requests submitted at once through the router; the stage batches them into pipeline
  calls and answers with PNG files (what the HTTP API returns: omni's time includes PNG
  encoding and the transport) or with the raw uint8 pixels (the same deliverable as plain's
  PIL image). The stage runs with its CUDA defaults: the UNet replayed as CUDA graphs for
  batches of up to 8 rows (a lone request is launch-bound) and fused QKV projections;
  `--omni-option cuda_graphs=false` (any stage option) turns one off for a comparison.

Both are warmed up on their own shapes first (one call for plain; one request and one burst
for omni). Then: the burst of --requests concurrent requests against the same requests run
one by one, and one request alone on each side (median of --single-repeats). The pixel
difference compares omni's raw burst images with plain's (bf16 batched kernels round
differently from batch-1 ones; in fp32 on the CPU they agree to one level).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omni.stages.contracts.image import CONTRACT, ImageParams, image_tensor
from omni.stages.generators.image_encode import encode_image
from omni.stages.generators.random_diffusion import SD15, TINY, save_random_sd_pipeline
from PIL import Image

from omni.supervision.router import RouterConfig, StageRouter
from omni.supervision.supervisor import StageSpec, StageSupervisor

SUBJECTS = ["a lighthouse", "a red fox", "an owl at night", "a bowl of ramen", "a sailboat"]
STYLES = ["at dawn, oil painting", "in the snow, photograph", "watercolor", "isometric 3d render"]


@dataclasses.dataclass(frozen=True)
class Workload:
    side: int
    steps: int
    guidance_scale: float
    requests: int

    def prompts(self) -> list[str]:
        return [
            f"{SUBJECTS[i % len(SUBJECTS)]}, {STYLES[i % len(STYLES)]}"
            for i in range(self.requests)
        ]

    def body(self, prompt: str, seed: int, output_format: str) -> bytes:
        params = ImageParams(
            prompt,
            width=self.side,
            height=self.side,
            steps=self.steps,
            guidance_scale=self.guidance_scale,
            seed=seed,
            output_format=output_format,
        )
        return CONTRACT.encode(params)


# ---- plain diffusers ---------------------------------------------------------------------------


def load_plain(folder: Path, dtype: torch.dtype, device: str) -> Any:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plain_image(pipe: Any, work: Workload, prompt: str, seed: int) -> Image.Image:
    return pipe(
        prompt,
        width=work.side,
        height=work.side,
        num_inference_steps=work.steps,
        guidance_scale=work.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]


def run_plain(pipe: Any, work: Workload, prompts: list[str]) -> tuple[float, list[Image.Image]]:
    """Seconds for the requests one after another (PIL images: the host has every pixel)."""
    started = time.perf_counter()
    images = [plain_image(pipe, work, prompt, seed) for seed, prompt in enumerate(prompts)]
    return time.perf_counter() - started, images


# ---- omni --------------------------------------------------------------------------------------


def run_omni(
    router: StageRouter, work: Workload, prompts: list[str], output_format: str
) -> tuple[float, list[np.ndarray], list[int]]:
    """Seconds until every request's image is back (a PNG file, or the raw pixels); each
    image's bytes; the batch sizes the stage drew."""
    started = time.perf_counter()
    streams = [
        router.submit("image", body=work.body(prompt, seed, output_format))
        for seed, prompt in enumerate(prompts)
    ]
    replies = [stream.result(timeout=3600)[-1] for stream in streams]
    elapsed = time.perf_counter() - started
    images = [reply.tensors[image_tensor(0)].numpy().copy() for reply in replies]
    batches = [CONTRACT.decode_reply(reply.body).batch_images for reply in replies]
    return elapsed, images, batches


def start_stage(
    folder: Path, device: str, dtype: str, work: Workload, ipc_dir: str, extra: list[str]
) -> tuple[StageRouter, StageSupervisor]:
    router = StageRouter(RouterConfig(endpoint=f"ipc://{ipc_dir}/router.sock")).start()
    options = {
        "dtype": dtype,
        # One call may draw the whole burst.
        "max_batch_pixels": str(work.requests * work.side * work.side),
    }
    options.update(pair.split("=", 1) for pair in extra)
    spec = StageSpec(
        role="image",
        devices=(device,),
        model=str(folder),
        capacity=max(64, work.requests),
        extra_args=(
            *(a for k, v in options.items() for a in ("--option", f"{k}={v}")),
            "--log-level",
            "WARNING",
        ),
    )
    supervisor = StageSupervisor(router, [spec]).start()
    if not router.wait_for_replicas("image", 1, timeout=600):
        supervisor.stop()
        router.close()
        raise RuntimeError("the image stage did not start (see its log above)")
    return router, supervisor


# ---- report ------------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def pixel_difference(raw: np.ndarray, image: Image.Image) -> tuple[int, float]:
    got = raw.astype(np.int16)
    expected = np.asarray(image.convert("RGB")).astype(np.int16)
    diff = np.abs(got - expected)
    return int(diff.max()), float(diff.mean())


def card_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny pipeline, 32x32, 2 steps, CPU")
    parser.add_argument("--device", default=None, help="default: cuda:0, or cpu with --tiny")
    parser.add_argument("--dtype", default=None, help="bfloat16 (GPU default) or float32")
    parser.add_argument("--size", type=int, default=None, help="image side (512; 32 tiny)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (20; 2 tiny)")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--requests", type=int, default=None, help="burst size (32; 8 tiny)")
    parser.add_argument("--single-repeats", type=int, default=3)
    parser.add_argument(
        "--omni-option", action="append", default=[], metavar="KEY=VALUE", help="stage option"
    )
    args = parser.parse_args()

    device = args.device or ("cpu" if args.tiny else "cuda:0")
    dtype_name = args.dtype or ("float32" if torch.device(device).type == "cpu" else "bfloat16")
    dtype = getattr(torch, dtype_name)
    geometry = TINY if args.tiny else SD15
    work = Workload(
        side=args.size or (32 if args.tiny else 512),
        steps=args.steps or (2 if args.tiny else 20),
        guidance_scale=args.guidance_scale,
        requests=args.requests or (8 if args.tiny else 32),
    )
    prompts = work.prompts()

    with (
        tempfile.TemporaryDirectory(prefix="omni-sd-") as folder,
        tempfile.TemporaryDirectory(prefix="omni-", dir="/tmp") as ipc_dir,
    ):
        started = time.perf_counter()
        save_random_sd_pipeline(folder, geometry, seed=0, dtype=dtype, device=device)
        print(f"built and saved the random pipeline in {time.perf_counter() - started:.1f} s")
        router, supervisor = start_stage(
            Path(folder), device, dtype_name, work, ipc_dir, args.omni_option
        )
        try:
            pipe = load_plain(Path(folder), dtype, device)
            # Warm-up on each side's own shapes (allocator, cuDNN/cuBLAS plans, first calls).
            plain_image(pipe, work, prompts[0], 0)
            run_omni(router, work, prompts[:1], "png")
            run_omni(router, work, prompts, "png")

            plain_s, plain_images = run_plain(pipe, work, prompts)
            burst = {fmt: run_omni(router, work, prompts, fmt) for fmt in ("png", "raw")}
            repeats = range(args.single_repeats)
            plain_one = statistics.median(run_plain(pipe, work, prompts[:1])[0] for _ in repeats)
            one = {
                fmt: statistics.median(run_omni(router, work, prompts[:1], fmt)[0] for _ in repeats)
                for fmt in ("png", "raw")
            }
            single_raw = run_omni(router, work, prompts[:1], "raw")[1][0]
        finally:
            supervisor.stop()
            router.close()
    png_encode_s = statistics.median(
        timed(lambda image=image: encode_image(np.asarray(image), "png")) for image in plain_images
    )
    diffs = [pixel_difference(r, i) for r, i in zip(burst["raw"][1], plain_images, strict=True)]
    single_diff = pixel_difference(single_raw, plain_images[0])
    batches = sorted(set(burst["png"][2] + burst["raw"][2]), reverse=True)

    n = work.requests
    rows = [
        (f"{n} concurrent, PNG out", n / plain_s, n / burst["png"][0]),
        (f"{n} concurrent, raw pixels out", n / plain_s, n / burst["raw"][0]),
        ("1 request, PNG out", 1 / plain_one, 1 / one["png"]),
        ("1 request, raw pixels out", 1 / plain_one, 1 / one["raw"]),
    ]
    model = "tiny SD" if args.tiny else "SD 1.5-size"
    print(
        f"\n{model} pipeline, random {dtype_name} weights, {work.side}x{work.side}, "
        f"{work.steps} steps, DDIM, guidance {work.guidance_scale}; plain: one diffusers call "
        "per request, PIL out; omni: the image stage process over the transport"
    )
    print(f"{'workload':<32} {'plain img/s':>12} {'omni img/s':>12} {'omni/plain':>11}")
    for name, plain_rate, omni_rate in rows:
        print(f"{name:<32} {plain_rate:>12.3f} {omni_rate:>12.3f} {omni_rate / plain_rate:>10.2f}x")
    print(
        f"1 request latency: plain {plain_one * 1000:.0f} ms (a PNG encode of its image adds "
        f"{png_encode_s * 1000:.0f} ms), omni {one['png'] * 1000:.0f} ms with PNG, "
        f"{one['raw'] * 1000:.0f} ms raw"
    )
    print(
        f"omni batch sizes in the bursts: {batches}; "
        f"stage options: {args.omni_option or 'defaults'}"
    )
    print(
        f"omni vs plain pixels: max |diff| {max(d[0] for d in diffs)}, "
        f"mean |diff| {statistics.fmean(d[1] for d in diffs):.4f} (0-255 scale); "
        f"1 request alone: max {single_diff[0]}, mean {single_diff[1]:.4f}"
    )
    print(f"card: {card_name(device)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
