"""What a segment of the CIFAR-10 ResNet costs when it runs on a few survivors of a batch, in both memory layouts.

The early-exit forward runs the blocks between two exits (a *segment*) on the samples still running, and then that
exit's head. Exit costs price every sample alike, as if a segment's time were proportional to the samples it runs
on. This benchmark measures how far that holds on the CPU: the architecture of the CIFAR-10 ResNet reference
(`benchmarks/configs/eenet-resnet-cifar10` with its exits after residual blocks 1, 4, 6 and 8, as step 2 of
`cifar10_resnet_commands.sh` places them; random weights: only time is measured), in a process with
`hf_eenet.tune_cpu_allocator()`, in the default (NCHW) layout and channels-last. For each layout it times, interleaved,
the full forward on a batch of 64 random 32x32 images, the path to exit 0 (stem, first block, head) on that batch,
and every later segment with its exit head on `n` survivors, and fits `time = fixed + per_sample * n` per segment.
Times are fractions of the full forward of the same layout, and the channels-last full forward is given against the
default one.

    .venv/bin/python benchmarks/bench_segment_overhead.py --output benchmarks/results/segment_overhead_resnet.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_cli import positive_int
from bench_cpu_allocator import reference_architecture_config

SURVIVORS = (1, 2, 4, 8, 16, 32, 64)
LAYOUTS = {"default": torch.contiguous_format, "channels-last": torch.channels_last}


def build_runs(model, batch: torch.Tensor) -> dict:
    """Timed calls by name: the full forward, the path to exit 0, and each later segment with its head on n samples."""
    runs = {"full": lambda: model(pixel_values=batch, budget=1.0)}
    exit_layers = model.config.exit_layers

    def exit0():
        state = model.run_blocks(model.embed_inputs(pixel_values=batch), 0, exit_layers[0])
        return model.exit_logits(0, model.exit_features(state, 0))

    runs["exit 0 path"] = exit0
    with torch.no_grad():
        state = model.run_blocks(model.embed_inputs(pixel_values=batch), 0, exit_layers[0])
        for k in range(1, len(exit_layers)):
            start, end = exit_layers[k - 1], exit_layers[k]
            for n in SURVIVORS:
                kept = model.select_samples(state, torch.arange(n))

                def segment(kept=kept, k=k, start=start, end=end):
                    return model.exit_logits(k, model.exit_features(model.run_blocks(kept, start, end), k))

                runs[(k, n)] = segment
            state = model.run_blocks(state, start, end)
    return runs


def measure(threads: int, repeats: int) -> dict:
    import hf_eenet
    from hf_eenet import EENetResNetForImageClassification

    hf_eenet.tune_cpu_allocator()
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    config = reference_architecture_config()
    reference = EENetResNetForImageClassification(config).eval()
    batch = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    runs = {}
    for layout, memory_format in LAYOUTS.items():
        model = EENetResNetForImageClassification(config).eval()
        model.load_state_dict(reference.state_dict())
        model.to(memory_format=memory_format)
        runs.update({(layout, name): run for name, run in build_runs(model, batch).items()})
    times = {name: [] for name in runs}
    with torch.no_grad():
        for run in runs.values():  # warm-up
            run()
        for _ in range(repeats):  # interleaved: a drift of the machine's speed hits every call alike
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    results = {}
    for layout in LAYOUTS:
        full = medians[(layout, "full")]
        segments = {}
        for k in range(1, config.num_exits):
            fractions = [medians[(layout, (k, n))] / full for n in SURVIVORS]
            slope, fixed = statistics.linear_regression(SURVIVORS, fractions)
            segments[k] = {"fractions": fractions, "fixed": fixed, "per_sample": slope}
        results[layout] = {
            "full_ms": 1000 * full,
            "exit0": medians[(layout, "exit 0 path")] / full,
            "segments": segments,
        }
    return results


def report(argv: list[str], threads: int, repeats: int, results: dict) -> list[str]:
    default_full = results["default"]["full_ms"]
    lines = [
        "# A segment of the CIFAR-10 ResNet on a few survivors, default and channels-last layout (measured)",
        "",
        f"Command: `.venv/bin/python {' '.join(['benchmarks/bench_segment_overhead.py', *argv])}`",
        "",
        f"- machine: {platform.machine()}, {threads} threads, torch {torch.__version__}, `tune_cpu_allocator()`; the "
        "reference ResNet's architecture with random weights (time only), exits after blocks 1, 4, 6 and 8; medians "
        f"of {repeats} interleaved repeats",
        "- every time is a fraction of the full forward of the same layout on the batch of 64; segment k is the blocks "
        "from exit k-1 to exit k and exit k's head; *fixed* and *per sample* are the least-squares fit "
        "`fraction = fixed + per_sample * n` over the survivor counts",
        "",
        "| layout | full forward, batch 64 (ms) | vs default | exit 0 path, batch 64 |",
        "|---|---|---|---|",
    ]
    for layout, result in results.items():
        lines.append(
            f"| {layout} | {result['full_ms']:.2f} | {result['full_ms'] / default_full:.2f} | {result['exit0']:.3f} |"
        )
    lines += [
        "",
        "| layout | segment | "
        + " | ".join(f"n={n}" for n in SURVIVORS)
        + " | fixed | per sample | fixed / (64 x per sample) |",
        "|---|---|" + "---|" * (len(SURVIVORS) + 3),
    ]
    for layout, result in results.items():
        for k, segment in result["segments"].items():
            fixed, slope = segment["fixed"], segment["per_sample"]
            lines.append(
                f"| {layout} | {k} | "
                + " | ".join(f"{f:.3f}" for f in segment["fractions"])
                + f" | {fixed:.4f} | {slope:.5f} | {fixed / (64 * slope):.2f} |"
            )
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--repeats", type=positive_int, default=30)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    results = measure(args.threads, args.repeats)
    lines = report(argv if argv is not None else sys.argv[1:], args.threads, args.repeats, results)
    print("\n".join(lines))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text("\n".join(lines) + "\n")
    return results


if __name__ == "__main__":
    main()
