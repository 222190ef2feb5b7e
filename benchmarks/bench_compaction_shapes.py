"""Where a budgeted vision forward spends its time on an accelerator: per-exit work versus new batch shapes.

Times, per batch, on CIFAR-10 test images (shuffled): the full model, the all-exits pass, the budgeted forward on one
batch repeated (the same survivor counts every time: warm kernel-plan caches) and on different batches (new survivor
counts: convolution plans are looked up or built for each new shape), then the budgeted forward on different batches
with `torch.backends.cudnn.benchmark` on and with cuDNN off, and a profile of the budgeted forward.

Run (from the repository root; a CUDA device):

    HF_HUB_OFFLINE=1 python benchmarks/bench_compaction_shapes.py --model_dir outputs/resnet-cifar10-eenet \
        --data ../shared/data/cifar10/test.parquet --device cuda
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.profiler import ProfilerActivity, profile
from transformers import AutoImageProcessor, AutoModelForImageClassification

import hf_eenet  # noqa: F401  (registers the EENet classes)


def load_pixels(model_dir: str, data: str, num_images: int, device: str) -> torch.Tensor:
    table = pq.read_table(data)
    column = next(name for name in table.column_names if "im" in name)
    images = table.column(column).to_pylist()
    order = np.random.default_rng(0).permutation(len(images))[:num_images]
    pil = [Image.open(io.BytesIO(images[i]["bytes"])).convert("RGB") for i in order]
    return AutoImageProcessor.from_pretrained(model_dir)(pil, return_tensors="pt")["pixel_values"].to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True, help="An EENet vision model with a fitted scheduler.")
    parser.add_argument("--data", required=True, help="CIFAR-10 test parquet (an image column with bytes).")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--num_images", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device, budget = args.device, args.budget
    model = AutoModelForImageClassification.from_pretrained(args.model_dir).eval().to(device)
    pixels = load_pixels(args.model_dir, args.data, args.num_images, device)

    def synchronize():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    def ms_per_batch(run, batches) -> float:
        with torch.no_grad():
            for batch in batches[:2]:
                run(batch)
            synchronize()
            start = time.perf_counter()
            for _ in range(args.repeats):
                for batch in batches:
                    run(batch)
            synchronize()
        return (time.perf_counter() - start) / args.repeats / len(batches) * 1e3

    print(f"device {device}, exit costs {[round(c, 3) for c in model.config.exit_costs]}, budget {budget} (measured)")
    for batch_size in (64, 512):
        batches = list(pixels.split(batch_size))[: args.num_images // batch_size]
        full = ms_per_batch(lambda b: model(pixel_values=b, budget=1.0), batches)
        all_exits = ms_per_batch(lambda b: model(pixel_values=b, output_all_exits=True), batches)
        first = batches[0]
        same = ms_per_batch(lambda b, first=first: model(pixel_values=first, budget=budget), batches)
        different = ms_per_batch(lambda b: model(pixel_values=b, budget=budget), batches)
        print(
            f"batch {batch_size}: ms/batch full {full:.2f}, all exits {all_exits:.2f}, budgeted on one repeated batch "
            f"{same:.2f}, on different batches {different:.2f}"
        )
    batches = list(pixels.split(512))[:8]
    if torch.device(device).type == "cuda":
        for setting in ("cudnn.benchmark on", "cuDNN off"):
            torch.backends.cudnn.benchmark = setting == "cudnn.benchmark on"
            torch.backends.cudnn.enabled = setting != "cuDNN off"
            full = ms_per_batch(lambda b: model(pixel_values=b, budget=1.0), batches)
            different = ms_per_batch(lambda b: model(pixel_values=b, budget=budget), batches)
            print(f"{setting}: batch 512 ms/batch full {full:.2f}, budgeted on different batches {different:.2f}")
        torch.backends.cudnn.benchmark, torch.backends.cudnn.enabled = False, True
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    with torch.no_grad():
        for batch in batches[:2]:
            model(pixel_values=batch, budget=budget)
        synchronize()
        with profile(activities=activities) as prof:
            for batch in batches[2:6]:
                model(pixel_values=batch, budget=budget)
            synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=40))


if __name__ == "__main__":
    main()
