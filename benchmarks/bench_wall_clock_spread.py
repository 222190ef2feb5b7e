"""How much the measured wall-clock fraction of the same early-exit decisions moves between processes.

Runs `measured_budget_table` (the evaluation's interleaved timing) on the same shuffled CIFAR-10 test images in
several fresh processes, one after another, and prints per process the wall-clock fraction (time per sample over the
full model's, same run) at each budget, the realized cost, and the full model's time per batch. The spread between
processes is the noise floor under a "wall-clock time within x % of the budget" check on this machine.

Run (from the repository root):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_wall_clock_spread.py --model_dir outputs/vit-cifar10-eenet \
        --data ../shared/data/cifar10/test.parquet --budgets 0.3 0.5 0.7 --num_images 1280 --processes 4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def measure(args) -> dict:
    import torch
    from bench_compaction_shapes import load_pixels
    from transformers import AutoModelForImageClassification

    from hf_eenet.evaluation import measured_budget_table

    torch.set_num_threads(args.threads)
    model = AutoModelForImageClassification.from_pretrained(args.model_dir).eval()
    pixels = load_pixels(args.model_dir, args.data, args.num_images, "cpu")
    batches = [{"pixel_values": batch} for batch in pixels.split(args.batch_size)]
    rows = measured_budget_table(model, batches, budgets=args.budgets)
    full = rows[0]["seconds_per_sample"] * args.batch_size * 1e3
    return {
        "full_ms_per_batch": round(full, 1),
        "fractions": {row["budget"]: round(1 / row["speedup"], 3) for row in rows[1:]},
        "costs": {row["budget"]: round(row["cost"], 3) for row in rows[1:]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True, help="An EENet vision model with a fitted scheduler.")
    parser.add_argument("--data", required=True, help="CIFAR-10 test parquet (an image column with bytes).")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--num_images", type=int, default=1280)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return
    results = []
    for _ in range(args.processes):
        output = subprocess.run([sys.executable, *sys.argv, "--child"], check=True, capture_output=True, text=True)
        results.append(json.loads(output.stdout.strip().splitlines()[-1]))
        print(f"process {len(results)} (measured): {results[-1]}", flush=True)
    for budget in args.budgets:
        fractions = [result["fractions"][str(budget)] for result in results]
        print(
            f"budget {budget}: wall-clock fraction {min(fractions):.3f}-{max(fractions):.3f} over {len(results)} "
            f"processes (error vs budget {min(fractions) / budget - 1:+.1%} to {max(fractions) / budget - 1:+.1%})"
        )


if __name__ == "__main__":
    main()
