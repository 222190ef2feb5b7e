"""What glibc's malloc defaults cost the early-exit path on the CPU, and what `tune_cpu_allocator` gives back.

The architecture of the CIFAR-10 ResNet reference (`benchmarks/configs/eenet-resnet-cifar10` with its exits after
residual blocks 1, 4, 6 and 8, as step 2 of `cifar10_resnet_commands.sh` places them; random weights: only time is
measured) runs in a fresh process with glibc's default allocator and in one with `hf_eenet.tune_cpu_allocator()`.
Each process times, interleaved over the same batches of 64 random 32x32 images, the full forward and the early-exit
forward sending the images to the exits in the shares that the reference's EENet took on CIFAR-10 test at each
measured budget (`cifar10_resnet.md`; a `ForcedExitPolicy` per batch). The wall-clock fraction of a share is its time
over the full forward's in the same process; the speed-up target of the vision issue is 0.85 / budget.

    .venv/bin/python benchmarks/bench_cpu_allocator.py --output benchmarks/results/cpu_allocator.md
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_cli import positive_int, run_child

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "benchmarks" / "configs" / "eenet-resnet-cifar10"
# exit shares (%) of the ResNet reference's EENet on CIFAR-10 test, by budget (cifar10_resnet.md, measured rows)
REFERENCE_SHARES = {
    0.25: (99, 1, 0, 0),
    0.3: (89, 10, 1, 0),
    0.4: (69, 22, 8, 1),
    0.5: (51, 35, 14, 0),
    0.7: (12, 62, 25, 1),
}


def reference_architecture_config():
    """The reference ResNet's config with its exits after residual blocks 1, 4, 6 and 8 (step 2 of its commands)."""
    from transformers import AutoConfig

    import hf_eenet  # noqa: F401  (registers the EENet configs)

    return AutoConfig.from_pretrained(CONFIG, exit_layer_unit="block", exit_layers=[1, 4, 6, 8])


def add_timing_arguments(parser: argparse.ArgumentParser, num_batches: int) -> None:
    """The options the CPU timing benchmarks of the reference architecture share."""
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--num-batches", type=positive_int, default=num_batches)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--output", type=Path, default=None)


def forced_exits(shares, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Exits for one batch in the given shares (rounded to whole images), in random order."""
    counts = [round(batch_size * share / sum(shares)) for share in shares]
    counts[0] += batch_size - sum(counts)
    exits = torch.cat([torch.full((count,), k, dtype=torch.long) for k, count in enumerate(counts)])
    return exits[torch.randperm(batch_size, generator=generator)]


def child(allocator: str, batch_size: int, num_batches: int, repeats: int, threads: int) -> dict:
    import hf_eenet
    from hf_eenet import EENetResNetForImageClassification, ForcedExitPolicy

    applied = hf_eenet.tune_cpu_allocator() if allocator == "tuned" else False
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    config = reference_architecture_config()
    model = EENetResNetForImageClassification(config).eval()
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(batch_size, 3, 32, 32, generator=generator) for _ in range(num_batches)]
    policies = {
        budget: [ForcedExitPolicy(forced_exits(shares, batch_size, generator)) for _ in batches]
        for budget, shares in REFERENCE_SHARES.items()
    }
    runs = {"full": lambda i: model(pixel_values=batches[i])}
    for budget in REFERENCE_SHARES:
        runs[budget] = lambda i, budget=budget: model(pixel_values=batches[i], exit_policy=policies[budget][i])
    times = {name: [] for name in runs}
    with torch.no_grad():
        for i in range(num_batches):  # warm-up
            for run in runs.values():
                run(i)
        for _ in range(repeats):
            for i in range(num_batches):
                for name, run in runs.items():
                    start = time.perf_counter()
                    run(i)
                    times[name].append(time.perf_counter() - start)
    full = statistics.median(times["full"])
    costs = config.exit_costs
    return {
        "allocator": allocator,
        "applied": applied,
        "full_ms_per_image": 1000 * full / batch_size,
        "rows": [
            {
                "budget": budget,
                "shares": list(REFERENCE_SHARES[budget]),
                "flops_fraction": sum(s * c for s, c in zip(REFERENCE_SHARES[budget], costs)) / 100,
                "fraction": statistics.median(times[budget]) / full,
            }
            for budget in REFERENCE_SHARES
        ],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_timing_arguments(parser, num_batches=8)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--child", choices=["default", "tuned"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = [args.batch_size, args.num_batches, args.repeats, args.threads]
    if args.child:
        print("RESULT " + json.dumps(child(args.child, *settings)))
        return []
    results = []
    for allocator in ("default", "tuned"):  # one fresh process each: the allocator setting is process-wide
        command = [sys.executable, __file__, "--child", allocator]
        command += ["--batch-size", str(args.batch_size), "--num-batches", str(args.num_batches)]
        command += ["--repeats", str(args.repeats), "--threads", str(args.threads)]
        output = run_child(command, f"The {allocator} child")
        results.append(json.loads(output.split("RESULT ", 1)[1].splitlines()[0]))
    lines = report(args, argv if argv is not None else sys.argv[1:], results)
    print("\n".join(lines))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text("\n".join(lines) + "\n")
    return results


def report(args, argv: list[str], results: list[dict]) -> list[str]:
    lines = [
        "# glibc's malloc and the early-exit path of the CIFAR-10 ResNet (measured)",
        "",
        f"Command: `.venv/bin/python {' '.join(['benchmarks/bench_cpu_allocator.py', *argv])}`",
        "",
        f"- machine: {platform.machine()}, {args.threads} threads, torch {torch.__version__}; batches of "
        f"{args.batch_size} random 32x32 images, {args.num_batches} batches x {args.repeats} interleaved repeats, "
        "medians; the reference ResNet's architecture with random weights (time only)",
        "- *default*: glibc's malloc as the process starts; *tuned*: `hf_eenet.tune_cpu_allocator()` first",
        "",
        "| allocator | full model (ms / image) | budget | exit shares (%) | FLOPs fraction | wall-clock fraction | "
        "speed-up | target 0.85 / budget |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for row in result["rows"]:
            lines.append(
                f"| {result['allocator']} | {result['full_ms_per_image']:.3f} | {row['budget']:.2f} | "
                f"{' / '.join(str(s) for s in row['shares'])} | {row['flops_fraction']:.3f} | {row['fraction']:.3f} | "
                f"{1 / row['fraction']:.2f}x | {0.85 / row['budget']:.2f}x |"
            )
    return lines


if __name__ == "__main__":
    main()
