"""What the first pass over new survivor counts costs the early-exit forward of the CIFAR-10 ResNet on the CPU.

In the early-exit forward the number of images that run a segment changes from batch to batch, and every new input
shape has its convolution kernels built the first time it is seen. A timing that starts cold prices those builds into
the policy's cost, a long-running server pays them once. This benchmark measures the difference: in fresh processes
(tuned allocator, 2 threads), the architecture of the CIFAR-10 ResNet reference (`benchmarks/configs/eenet-resnet-cifar10`
with its exits after residual blocks 1, 4, 6 and 8; random weights: only time is measured; channels-last, as its CPU
reference is timed) runs three passes over the same batches of 64 random 32x32 images. In each pass every batch runs
the full forward and the early-exit forward with the images sent to the exits by a `ForcedExitPolicy` (after one
untimed full forward, so that the first pass prices the new survivor counts, not the process's start), each image
drawn independently with the exit shares the CPU reference's EENet took at a budget (`cifar10_resnet_cpu.md`), so the
survivor counts vary as they do in serving. A mix's fraction is its time over the full forward's in the same pass.

    .venv/bin/python benchmarks/bench_cold_shapes.py --output benchmarks/results/cold_shapes_resnet.md
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch
from bench_cli import positive_int, run_child
from bench_cpu_allocator import add_timing_arguments, reference_architecture_config

# exit shares (%) of the CPU reference's EENet on CIFAR-10 test, by budget (cifar10_resnet_cpu.md, measured rows)
REFERENCE_SHARES = {0.4: (78, 22, 0, 0), 0.5: (56, 44, 0, 0), 0.8: (9, 64, 27, 0), 0.9: (1, 57, 27, 16)}


def child(batch_size: int, num_batches: int, passes: int, threads: int) -> dict:
    import hf_eenet
    from hf_eenet import EENetResNetForImageClassification, ForcedExitPolicy

    hf_eenet.tune_cpu_allocator()
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = EENetResNetForImageClassification(reference_architecture_config()).eval()
    model = model.to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(batch_size, 3, 32, 32, generator=generator) for _ in range(num_batches)]
    policies = {
        budget: [
            ForcedExitPolicy(
                torch.multinomial(
                    torch.tensor(shares, dtype=torch.float), batch_size, replacement=True, generator=generator
                )
            )
            for _ in batches
        ]
        for budget, shares in REFERENCE_SHARES.items()
    }
    fractions = []
    with torch.no_grad():
        model(pixel_values=batches[0])  # untimed: the process's one-time costs and the full batch's shapes, not the
        # survivor counts this benchmark prices, stay out of the first pass's full-forward denominator
        for _ in range(passes):
            elapsed = {name: 0.0 for name in ["full", *REFERENCE_SHARES]}
            for i, batch in enumerate(batches):
                for name in elapsed:
                    policy = None if name == "full" else policies[name][i]  # no policy, no budget: the full forward
                    start = time.perf_counter()
                    model(pixel_values=batch, exit_policy=policy)
                    elapsed[name] += time.perf_counter() - start
            fractions.append({str(budget): elapsed[budget] / elapsed["full"] for budget in REFERENCE_SHARES})
    return {"full_ms_per_image": 1000 * elapsed["full"] / (num_batches * batch_size), "passes": fractions}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_timing_arguments(parser, num_batches=40)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--processes", type=positive_int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.passes < 2:
        parser.error(f"--passes must be >= 2 (the first against the last), got {args.passes}")
    if args.child:
        print(json.dumps(child(args.batch_size, args.num_batches, args.passes, args.threads)))
        return []
    command = [sys.executable, __file__, "--child", "--batch-size", str(args.batch_size), "--num-batches",
               str(args.num_batches), "--passes", str(args.passes), "--threads", str(args.threads)]  # fmt: skip
    results = []
    for _ in range(args.processes):  # a fresh process each time: every shape starts cold
        output = run_child(command, "A timing process")
        results.append(json.loads(output.strip().splitlines()[-1]))
    lines = report(argv if argv is not None else sys.argv[1:], args, results)
    print("\n".join(lines))
    if args.output is not None:
        args.output.write_text("\n".join(lines) + "\n")
    return results


def report(argv: list[str], args, results: list[dict]) -> list[str]:
    budgets = list(REFERENCE_SHARES)
    lines = [
        "# The first pass over new survivor counts, CIFAR-10 ResNet on the CPU (measured)",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_cold_shapes.py {' '.join(argv)}`",
        "",
        f"- machine: {platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
        "`tune_cpu_allocator()`; the reference ResNet's architecture with random weights (time only), channels-last, "
        f"exits after blocks 1, 4, 6 and 8; {args.num_batches} batches of {args.batch_size} random images, "
        f"{args.passes} passes in each of {args.processes} fresh processes",
        "- each cell: the early-exit forward's time over the full forward's in the same pass, with the images sent to "
        "the exits in the shares the CPU reference's EENet took at that budget (drawn per image, so survivor counts "
        "vary between batches)",
        "",
        "| process | pass | "
        + " | ".join(f"shares of budget {b:g}" for b in budgets)
        + " | full forward (ms / image) |",
        "|---|---|" + "---|" * len(budgets) + "---|",
    ]
    for p, result in enumerate(results):
        for k, fractions in enumerate(result["passes"]):
            full = f"{result['full_ms_per_image']:.3f}" if k == len(result["passes"]) - 1 else ""
            cells = " | ".join(f"{fractions[str(b)]:.3f}" for b in budgets)
            lines.append(f"| {p + 1} | {k + 1}{' (cold)' if k == 0 else ''} | {cells} | {full} |")
    cold = [r["passes"][0] for r in results]
    warm = [r["passes"][-1] for r in results]

    def mean(rows, budget):
        return sum(row[str(budget)] for row in rows) / len(rows)

    lines += [
        "",
        "Mean over the processes, first pass against last: "
        + "; ".join(f"{b:g}: {mean(cold, b):.3f} against {mean(warm, b):.3f}" for b in budgets)
        + ".",
    ]
    return lines


if __name__ == "__main__":
    main()
