"""Multi-modal throughput and repeated-image time to first token: omni against transformers'
generate and the workload floor, on a Qwen2.5-VL-7B-size architecture with random bf16 weights.

Run on a GPU:
    python3 benchmarks/multimodal.py

Workload: 256 requests, each one 448x448 image (256 merged image tokens) and 64 text tokens in,
128 tokens out (greedy, EOS ignored). Both engines start from the same PIL images, so image
preprocessing is inside both timings. omni encodes the images with its vision encoder in
batches, then runs every request through the LLM engine with the embeddings spliced in;
transformers runs `generate` in batches of --hf-batch.

Floor: vision-encoder and prefill FLOPs over the measured bf16 matmul rate, plus, for each decode
step, the larger of its FLOPs over that rate and its bytes (weights plus KV read) over the
measured copy bandwidth. Time to first token: one request with a new image, then the same image
again (omni skips the encoder and serves the prefix from cache).
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from ceilings import Geometry, measure_copy_bandwidth, measure_matmul_tflops
from PIL import Image

IMAGE_SIDE, TEXT_TOKENS, OUTPUT_TOKENS = 448, 64, 128
# --smoke runs the whole script on the CPU with a tiny model of the same shape of architecture,
# so a broken import or signature shows here rather than on a leased GPU.
DEVICE = "cuda"
PREPROCESS_THREADS = 4
VISION_START, IMAGE_PAD, VISION_END = 151652, 151655, 151653

TEXT = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 1000000.0,
        "mrope_section": [16, 24, 24],
    },
)
VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    in_chans=3,
    out_hidden_size=3584,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
    tokens_per_second=2,
)


def build_checkpoint(folder: str) -> None:
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig

    config = Qwen2_5_VLConfig(
        text_config=TEXT,
        vision_config=VISION,
        image_token_id=IMAGE_PAD,
        video_token_id=151656,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        architectures=["Qwen2_5_VLForConditionalGeneration"],
    )
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    gc.collect()
    empty_cache()


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def empty_cache() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def images(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8))
        for _ in range(n)
    ]


def image_processor():
    from transformers import Qwen2VLImageProcessor

    side = IMAGE_SIDE * IMAGE_SIDE
    return Qwen2VLImageProcessor(size={"shortest_edge": side, "longest_edge": side})


def text_ids(n: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 150000, (n, TEXT_TOKENS), generator=gen).tolist()


def prompt_ids(num_image_tokens: int, text: list[int]) -> list[int]:
    return [VISION_START, *[IMAGE_PAD] * num_image_tokens, VISION_END, *text]


# ---- omni ---------------------------------------------------------------------------------------


class OmniPipeline:
    """The vision encoder and the LLM engine in one process, as `omni serve --single-process`
    wires them, with the encoder-skip decision the orchestrator makes."""

    def __init__(self, folder: str) -> None:
        from omni.stages.encoders.vision import VisionEncoder

        from omni import LLM

        self.encoder = VisionEncoder.from_pretrained(folder, device=DEVICE, dtype="bfloat16")
        self.llm = LLM(
            folder,
            dtype="bfloat16",
            device=DEVICE,
            skip_tokenizer_init=True,
            max_model_len=1024,
            max_num_seqs=256,
            max_num_batched_tokens=8192,
            gpu_memory_utilization=0.85,
        )
        from omni.multimodal import Qwen2VLImageItems

        self.items = Qwen2VLImageItems(image_processor())
        self.ids = 0
        self.phase = dict.fromkeys(("preprocess_s", "encode_launch_s"), 0.0)

    def itemize(self, image: Image.Image, force_pixels: bool):
        """The image's hash and grid; its pixels too when forced (the throughput run, whose
        images are all new, makes them on the preprocessing threads)."""
        began = time.perf_counter()
        item = self.items.process(0, image)
        if force_pixels:
            _ = item.pixel_values
        self.phase["preprocess_s"] += time.perf_counter() - began
        return item

    def add(self, item, text: list[int], encode_batch: list) -> str:
        from omni.cache.block_hash import MultiModalPlaceholder

        from omni.multimodal import ImageSpan, mrope_positions

        span = ImageSpan(1, item.grid_thw)
        num_tokens = span.num_tokens(2)
        ids = prompt_ids(num_tokens, text)
        placeholder = MultiModalPlaceholder(item.item_hash, 1, num_tokens)
        positions, delta = mrope_positions(len(ids), [span], 2)
        hit = self.llm.engine.cached_prefix_tokens(ids, [placeholder])
        needs_encoder = placeholder.offset + placeholder.length > hit
        request_id = str(self.ids)
        self.ids += 1
        pending = (request_id, ids, placeholder, positions, delta)
        if needs_encoder:
            grid = torch.tensor([item.grid_thw], dtype=torch.int64)
            encode_batch.append((pending, item.pixel_values, grid))
        else:
            self._submit(pending, None)
        return request_id

    def flush(self, encode_batch: list) -> None:
        if not encode_batch:
            return
        began = time.perf_counter()
        embeddings = self.encoder.encode_batch([(pixels, grid) for _, pixels, grid in encode_batch])
        for (pending, _, _), embedding in zip(encode_batch, embeddings, strict=True):
            self._submit(pending, embedding)
        self.phase["encode_launch_s"] += time.perf_counter() - began
        encode_batch.clear()

    def _submit(self, pending, embedding) -> None:
        from omni.stages.llm.mm_inputs import MultiModalInputs

        from omni import SamplingParams

        request_id, ids, placeholder, positions, delta = pending
        mm = MultiModalInputs([placeholder], [embedding], positions.numpy(), delta)
        params = SamplingParams(temperature=0.0, max_tokens=OUTPUT_TOKENS, ignore_eos=True)
        self.llm.engine.add_request(request_id, ids, params, mm=mm, stream=True)

    def run_all(self, pil_images, texts, chunk: int = 32) -> float:
        """Images are preprocessed on CPU threads while the GPU encodes earlier chunks and the
        engine prefills and decodes the requests already submitted, as the stages overlap when
        served."""
        self.phase = dict.fromkeys(("preprocess_s", "encode_launch_s"), 0.0)
        engine = self.llm.engine
        start = time.perf_counter()
        batch: list = []
        with ThreadPoolExecutor(PREPROCESS_THREADS) as pool:
            itemized = pool.map(lambda image: self.itemize(image, True), pil_images)
            for item, text in zip(itemized, texts, strict=True):
                self.add(item, text, batch)
                if len(batch) == chunk:
                    self.flush(batch)
                    engine.step()
        self.flush(batch)
        while engine.has_unfinished_requests():
            engine.step()
        synchronize()
        return time.perf_counter() - start

    def time_to_first_token(self, image: Image.Image, text: list[int]) -> float:
        """From an idle engine (nothing queued on the GPU, as a server between requests) to
        the first token of one request."""
        engine = self.llm.engine
        while engine.has_unfinished_requests():
            engine.step()
        synchronize()
        start = time.perf_counter()
        batch: list = []
        request_id = self.add(self.itemize(image, False), text, batch)
        self.flush(batch)
        while True:
            if any(o.request_id == request_id for o in engine.step()):
                ttft = time.perf_counter() - start
                break
        engine.abort_request(request_id)
        return ttft

    def ttft_new_and_repeated(self, attempts: int = 3) -> tuple[float, float]:
        """The best of a few new images, and of the same images again: the first attempt of
        each path would otherwise include one-time kernel compilation for its shapes."""
        new, repeated = [], []
        for seed in range(100, 100 + attempts):
            image, text = images(1, seed=seed)[0], text_ids(1, seed=seed)[0]
            new.append(self.time_to_first_token(image, text))
            repeated.append(self.time_to_first_token(image, text))
        return min(new), min(repeated)


# ---- transformers -------------------------------------------------------------------------------


def run_transformers(folder: str, pil_images, texts, batch: int) -> float:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(
        folder, dtype=torch.bfloat16, device_map=DEVICE
    ).eval()
    processor = image_processor()

    def generate(chunk_images, chunk_texts, new_tokens: int) -> None:
        out = processor(images=chunk_images, return_tensors="pt")
        per_image = int(out["image_grid_thw"][0].prod()) // 4
        ids = torch.tensor([prompt_ids(per_image, t) for t in chunk_texts], device=DEVICE)
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            mm_token_type_ids=(ids == IMAGE_PAD).int(),
            pixel_values=out["pixel_values"].to(DEVICE, torch.bfloat16),
            image_grid_thw=out["image_grid_thw"].to(DEVICE),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )

    generate(pil_images[:2], texts[:2], 2)  # warm-up
    synchronize()
    start = time.perf_counter()
    for i in range(0, len(pil_images), batch):
        generate(pil_images[i : i + batch], texts[i : i + batch], OUTPUT_TOKENS)
    synchronize()
    elapsed = time.perf_counter() - start
    model.to("meta")
    gc.collect()
    empty_cache()
    return elapsed


# ---- floor --------------------------------------------------------------------------------------


def vision_flops_per_image() -> float:
    patches = (IMAGE_SIDE // 14) ** 2
    hidden, inter = VISION["hidden_size"], VISION["intermediate_size"]
    per_layer = 2 * patches * (4 * hidden * hidden + 3 * hidden * inter) + 4 * patches**2 * hidden
    patch_embed = 2 * patches * 3 * 2 * 14 * 14 * hidden
    merger = 2 * (patches // 4) * (4 * hidden * 4 * hidden + 4 * hidden * TEXT["hidden_size"])
    return VISION["depth"] * per_layer + patch_embed + merger


def floor_seconds(n: int, prompt_len: int, flops_rate: float, bandwidth: float) -> float:
    g = Geometry(
        TEXT["hidden_size"],
        TEXT["intermediate_size"],
        TEXT["num_hidden_layers"],
        TEXT["num_attention_heads"],
        TEXT["num_key_value_heads"],
        TEXT["vocab_size"],
    )
    seconds = n * vision_flops_per_image() / flops_rate
    seconds += (
        n * (prompt_len * g.token_flops(prompt_len // 2) + 2 * g.hidden * g.vocab) / flops_rate
    )
    for step in range(1, OUTPUT_TOKENS):
        context = prompt_len + step
        flops = n * (g.token_flops(context) + 2 * g.hidden * g.vocab)
        bytes_moved = g.weight_bytes + n * context * g.kv_bytes_per_token
        seconds += max(flops / flops_rate, bytes_moved / bandwidth)
    return seconds


def shrink_for_smoke() -> None:
    global DEVICE, IMAGE_SIDE, OUTPUT_TOKENS
    DEVICE, IMAGE_SIDE, OUTPUT_TOKENS = "cpu", 56, 4
    TEXT.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    TEXT.update(num_attention_heads=4, num_key_value_heads=2)
    TEXT["rope_parameters"] = {**TEXT["rope_parameters"], "mrope_section": [2, 3, 3]}
    VISION.update(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
    VISION.update(fullatt_block_indexes=[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--hf-batch", type=int, default=64)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU")
    args = parser.parse_args()

    if args.smoke:
        shrink_for_smoke()
        flops_rate, bandwidth, card = 1e12, 1e11, "cpu (smoke run: figures mean nothing)"
        args.num_requests = min(args.num_requests, 6)
        args.hf_batch = min(args.hf_batch, 3)
    else:
        flops_rate = measure_matmul_tflops() * 1e12
        bandwidth = measure_copy_bandwidth()
        card = torch.cuda.get_device_name()
    n = args.num_requests
    pil_images, texts = images(n, seed=0), text_ids(n, seed=0)
    prompt_len = 1 + (IMAGE_SIDE // 28) ** 2 + 1 + TEXT_TOKENS
    floor_tps = n * OUTPUT_TOKENS / floor_seconds(n, prompt_len, flops_rate, bandwidth)
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        build_checkpoint(folder)
        if not args.skip_transformers:
            hf_s = run_transformers(folder, pil_images, texts, args.hf_batch)
            results["transformers_tps"] = n * OUTPUT_TOKENS / hf_s
            print("transformers:", results, flush=True)
        omni = OmniPipeline(folder)
        omni.run_all(pil_images[:4], texts[:4])  # warm-up: compiles kernels, captures graphs
        omni.llm.engine.kv_cache.reset_prefix_cache()
        omni_s = omni.run_all(pil_images, texts)
        results["omni_tps"] = n * OUTPUT_TOKENS / omni_s
        results.update({f"omni_{k}": v for k, v in omni.phase.items()})
        omni.llm.engine.kv_cache.reset_prefix_cache()
        new_s, repeated_s = omni.ttft_new_and_repeated()
        results["ttft_new_ms"], results["ttft_repeat_ms"] = new_s * 1e3, repeated_s * 1e3

    print(
        f"\n{n} requests x (one {IMAGE_SIDE}x{IMAGE_SIDE} image + {TEXT_TOKENS} text tokens) "
        f"-> {OUTPUT_TOKENS} tokens, Qwen2.5-VL-7B geometry, bf16, {card}; matmul "
        f"{flops_rate / 1e12:.0f} TFLOP/s, copy {bandwidth / 1e12:.2f} TB/s"
    )
    print(f"{'engine':<14}{'out tok/s':>12}{'of floor':>10}")
    print(f"{'floor':<14}{floor_tps:>12.0f}{'100%':>10}")
    for name in ("transformers", "omni"):
        if f"{name}_tps" in results:
            tps = results[f"{name}_tps"]
            print(f"{name:<14}{tps:>12.0f}{tps / floor_tps:>10.0%}")
    print(
        f"omni phases: preprocessing {results['omni_preprocess_s']:.2f} s of CPU time over "
        f"{PREPROCESS_THREADS} threads, encoder launches {results['omni_encode_launch_s']:.2f} s"
    )
    ratio = results["ttft_repeat_ms"] / results["ttft_new_ms"]
    print(
        f"time to first token: new image {results['ttft_new_ms']:.1f} ms, repeated "
        f"{results['ttft_repeat_ms']:.1f} ms ({ratio:.2f} of the first)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": card, "floor_tps": floor_tps, **results}, f)


if __name__ == "__main__":
    main()
