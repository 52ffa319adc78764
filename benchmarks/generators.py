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
  calls and answers with PNG files, so omni's time includes PNG encoding and the transport.

Both are warmed up on their own shapes first (one call for plain; one request and one burst
for omni). Then: the burst of --requests concurrent requests against the same requests run
one by one, and one request alone on each side (median of --single-repeats).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omni.stages.generators.image_params import ImageParams
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

    def params(self, prompt: str, seed: int) -> dict[str, Any]:
        return ImageParams(
            prompt,
            width=self.side,
            height=self.side,
            steps=self.steps,
            guidance_scale=self.guidance_scale,
            seed=seed,
        ).to_wire()


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
    router: StageRouter, work: Workload, prompts: list[str]
) -> tuple[float, list[bytes], list[int]]:
    """Seconds until every request's PNG is back; the PNGs; the batch sizes the stage drew."""
    started = time.perf_counter()
    streams = [
        router.submit("image", params=work.params(prompt, seed))
        for seed, prompt in enumerate(prompts)
    ]
    replies = [stream.result(timeout=3600)[-1] for stream in streams]
    elapsed = time.perf_counter() - started
    files = [bytes(reply.tensors["image_0"].numpy()) for reply in replies]
    batches = [int(reply.data["batch_images"]) for reply in replies]
    return elapsed, files, batches


def start_stage(
    folder: Path, device: str, dtype: str, work: Workload, ipc_dir: str
) -> tuple[StageRouter, StageSupervisor]:
    router = StageRouter(RouterConfig(endpoint=f"ipc://{ipc_dir}/router.sock")).start()
    options = {
        "dtype": dtype,
        # One call may draw the whole burst.
        "max_batch_pixels": str(work.requests * work.side * work.side),
    }
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


def pixel_difference(png: bytes, image: Image.Image) -> tuple[int, float]:
    got = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)
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
        router, supervisor = start_stage(Path(folder), device, dtype_name, work, ipc_dir)
        try:
            pipe = load_plain(Path(folder), dtype, device)
            # Warm-up on each side's own shapes (allocator, cuDNN/cuBLAS plans, first calls).
            plain_image(pipe, work, prompts[0], 0)
            run_omni(router, work, prompts[:1])
            run_omni(router, work, prompts)

            plain_s, plain_images = run_plain(pipe, work, prompts)
            omni_s, omni_files, batches = run_omni(router, work, prompts)
            plain_one = statistics.median(
                run_plain(pipe, work, prompts[:1])[0] for _ in range(args.single_repeats)
            )
            omni_one = statistics.median(
                run_omni(router, work, prompts[:1])[0] for _ in range(args.single_repeats)
            )
            diffs = [pixel_difference(f, i) for f, i in zip(omni_files, plain_images, strict=True)]
        finally:
            supervisor.stop()
            router.close()

    n = work.requests
    rows = [
        (f"{n} requests (omni: concurrent)", n / plain_s, n / omni_s),
        ("1 request", 1 / plain_one, 1 / omni_one),
    ]
    model = "tiny SD" if args.tiny else "SD 1.5-size"
    print(
        f"\n{model} pipeline, random {dtype_name} weights, {work.side}x{work.side}, "
        f"{work.steps} steps, DDIM, guidance {work.guidance_scale}"
    )
    print(f"{'workload':<32} {'plain img/s':>12} {'omni img/s':>12} {'omni/plain':>11}")
    for name, plain_rate, omni_rate in rows:
        print(f"{name:<32} {plain_rate:>12.3f} {omni_rate:>12.3f} {omni_rate / plain_rate:>10.2f}x")
    print(
        f"1 request latency: plain {plain_one * 1000:.0f} ms, omni {omni_one * 1000:.0f} ms "
        f"(omni includes PNG encoding and the transport)"
    )
    print(f"omni batch sizes in the burst: {sorted(set(batches), reverse=True)}")
    print(
        f"omni vs plain pixels: max |diff| {max(d[0] for d in diffs)}, "
        f"mean |diff| {statistics.fmean(d[1] for d in diffs):.4f} (0-255 scale)"
    )
    print(f"card: {card_name(device)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
