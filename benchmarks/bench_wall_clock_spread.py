"""How much the measured wall-clock fraction of the same early-exit decisions moves between processes.

Runs `measured_budget_table` (the evaluation's interleaved timing) on the same shuffled CIFAR-10 test images in
several fresh processes, one after another, and prints per process the wall-clock fraction (time per sample over the
full model's, same run) at each budget, the realized cost, and the full model's time per batch. The spread between
processes is the noise floor under a "wall-clock time within x % of the budget" check on this machine.

With `--decompose_budget b`, each process also times, batch by batch and interleaved (two passes after a warm-up),
the full model, EENet at budget b, the same exits forced (`ForcedExitPolicy`: what deciding costs), and every batch
forced whole to exit k (what the exit costs promise for uniform batches), each as a fraction of the full model's time.

Run (from the repository root):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_wall_clock_spread.py --model_dir outputs/vit-cifar10-eenet \
        --data ../shared/data/cifar10/test.parquet --budgets 0.3 0.5 0.7 --num_images 1280 --processes 4 \
        --decompose_budget 0.5
"""

from __future__ import annotations

import argparse
import json
import sys

from bench_cli import positive_int, run_child


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
    result = {
        "full_ms_per_batch": round(full, 1),
        "fractions": {row["budget"]: round(1 / row["speedup"], 3) for row in rows[1:]},
        "costs": {row["budget"]: round(row["cost"], 3) for row in rows[1:]},
    }
    if args.decompose_budget is not None:
        result["decomposition"] = decompose(model, [batch["pixel_values"] for batch in batches], args.decompose_budget)
    return result


def decompose(model, batches, budget: float, passes: int = 2) -> dict:
    """Fractions of the full model's time: EENet at `budget`, its exits forced, and whole batches forced to exit k."""
    import time

    import torch

    from hf_eenet import ForcedExitPolicy

    with torch.no_grad():
        taken = [model(pixel_values=batch, budget=budget).exit_index for batch in batches]
    runs = {
        "full": lambda i, batch: model(pixel_values=batch, budget=1.0),  # the full model even with a default_budget
        f"eenet {budget}": lambda i, batch: model(pixel_values=batch, budget=budget),
        "same exits forced": lambda i, batch: model(pixel_values=batch, exit_policy=ForcedExitPolicy(taken[i])),
    }
    for k in range(model.config.num_exits):
        runs[f"all at exit {k}"] = lambda i, batch, k=k: model(
            pixel_values=batch, exit_policy=ForcedExitPolicy(torch.full((batch.shape[0],), k))
        )
    elapsed = dict.fromkeys(runs, 0.0)
    with torch.no_grad():
        for batch in batches[:2]:  # warm-up: first calls of each configuration are slower
            for run in runs.values():
                run(0, batch)
        for _ in range(passes):
            for i, batch in enumerate(batches):
                for name, run in runs.items():
                    start = time.perf_counter()
                    run(i, batch)
                    elapsed[name] += time.perf_counter() - start
    fractions = {name: round(seconds / elapsed["full"], 3) for name, seconds in elapsed.items() if name != "full"}
    exits = torch.cat(taken)
    costs = torch.tensor(model.config.exit_costs)
    fractions["expected cost of the exits taken"] = round(float(costs[exits].mean()), 3)
    fractions["exit costs"] = [round(c, 3) for c in model.config.exit_costs]
    return fractions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True, help="An EENet vision model with a fitted scheduler.")
    parser.add_argument("--data", required=True, help="CIFAR-10 test parquet (an image column with bytes).")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--num_images", type=positive_int, default=1280)
    parser.add_argument("--batch_size", type=positive_int, default=64)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--processes", type=positive_int, default=4)
    parser.add_argument("--decompose_budget", type=float, default=None, help="Also take this budget apart.")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return
    results = []
    for _ in range(args.processes):
        output = run_child([sys.executable, *sys.argv, "--child"], "A timing process")
        results.append(json.loads(output.strip().splitlines()[-1]))
        print(f"process {len(results)} (measured): {results[-1]}", flush=True)
    for budget in args.budgets:
        fractions = [result["fractions"][str(budget)] for result in results]
        print(
            f"budget {budget}: wall-clock fraction {min(fractions):.3f}-{max(fractions):.3f} over {len(results)} "
            f"processes (error vs budget {min(fractions) / budget - 1:+.1%} to {max(fractions) / budget - 1:+.1%})"
        )


if __name__ == "__main__":
    main()
