"""BudgetTracker against fixed thresholds on streams unlike the calibration split (measured).

A model's stored policy has thresholds fitted on its calibration split. Served on data like it, they spend about the
budget; served on a stream whose inputs differ they spend whatever that stream's confidence gives. This benchmark
runs the real early-exit forward (`measured_budget_table`) over several streams of the labelled test sentences, each
budget once with the fixed thresholds and once with a `BudgetTracker`, and reports the realised cost and accuracy:

- `test`: the sentences in file order (like the calibration split);
- `short half` / `long half`: the sentences at or below / above the median token length;
- `shortest first`: every sentence, from the shortest to the longest (a stream that drifts).

Example (after the SST-2 workflow of benchmarks/results/sst2_minilm.md):

    .venv/bin/python benchmarks/bench_budget_tracking.py --model outputs/minilm-sst2-eenet \
        --output benchmarks/results/budget_tracking_sst2.md
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import sys
from pathlib import Path

import torch
from bench_cli import positive_int
from bench_speed import DEFAULT_DATA, tokenize_batches
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

import hf_eenet
from hf_eenet.evaluation import TRACKED_SUFFIX, measured_budget_table


def load_labelled(path: Path) -> tuple[list[str], list[int]]:
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows or {"sentence", "label"} - set(rows[0]):
        raise ValueError(f"{path} needs a header with 'sentence' and 'label' columns and at least one row.")
    return [row["sentence"] for row in rows], [int(row["label"]) for row in rows]


def streams(tokenizer, sentences: list[str]) -> dict[str, list[int]]:
    """Sample indices of each stream, in the order they are served."""
    lengths = [len(ids) for ids in tokenizer(sentences)["input_ids"]]
    median = statistics.median(lengths)
    order = list(range(len(sentences)))
    return {
        "test": order,
        "short half": [i for i in order if lengths[i] <= median],
        "long half": [i for i in order if lengths[i] > median],
        "shortest first": sorted(order, key=lambda i: (lengths[i], i)),
    }


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="EENet text model with a fitted (budget-matched) policy.")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Labelled tsv (sentence, label).")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.7])
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--max-length", type=positive_int, default=64)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = AutoModelForSequenceClassification.from_pretrained(args.model).eval()
    if not isinstance(model, hf_eenet.EarlyExitMixin) or model.exit_policy is None:
        raise ValueError(f"{args.model} is not an EENet model with a fitted exit policy.")
    policy, name = model.exit_policy, model.config.exit_policy["policy_type"]
    unfitted = [b for b in args.budgets if not any(abs(b - fitted) < 1e-6 for fitted in policy.budgets)]
    if unfitted:  # a fixed threshold would serve the fitted budget below, and its row would read as a miss
        parser.error(f"--budgets {unfitted} are not among the policy's fitted budgets {policy.budgets}.")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    sentences, labels = load_labelled(args.data)
    results = {}
    for stream, indices in streams(tokenizer, sentences).items():
        batches = tokenize_batches(
            tokenizer, [sentences[i] for i in indices], args.batch_size, args.max_length, model.device
        )
        stream_labels = torch.tensor([labels[i] for i in indices]).split(args.batch_size)
        batches = [{**batch, "labels": batch_labels} for batch, batch_labels in zip(batches, stream_labels)]
        results[stream] = measured_budget_table(
            model, batches, {name: policy}, budgets=args.budgets, tracked_policies=[name], num_warmup_batches=1
        )
        print(f"{stream}: {len(indices)} sentences measured")
    write_report(args, sys.argv[1:] if argv is None else argv, name, results)
    return results


def write_report(args, argv: list[str], name: str, results: dict[str, list[dict]]) -> None:
    command = " ".join(["benchmarks/bench_budget_tracking.py", *argv])
    lines = [
        f"# BudgetTracker against fixed thresholds on streams unlike the calibration split: {Path(args.model).name}",
        "",
        f"Command: `.venv/bin/python {command}`",
        "",
        f"- machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"hf_eenet {hf_eenet.__version__}; data: `{args.data.name}`, batches of {args.batch_size} served in order",
        f"- policy: the stored `{name}`, fitted on the calibration split; *fixed*: `budget=b`; *tracked*: "
        "`budget=BudgetTracker(b)`, one tracker per stream and budget (measured: the real early-exit forward)",
        "",
    ]
    for stream, rows in results.items():
        full = next(row for row in rows if row["policy"] == "full model")
        lines += [
            f"## {stream} ({full['num_samples']} sentences; full model {100 * full['accuracy']:.2f} %)",
            "",
            "| budget | fixed: accuracy | fixed: cost | fixed: cost error | tracked: accuracy | tracked: cost | "
            "tracked: cost error | tracked: budgets served (budget:% of samples) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for budget in args.budgets:
            fixed = next(r for r in rows if r["policy"] == name and r["budget"] == budget)
            tracked = next(r for r in rows if r["policy"] == f"{name} {TRACKED_SUFFIX}" and r["budget"] == budget)
            served = " ".join(f"{b:g}:{100 * share:.0f}" for b, share in tracked["served_budgets"])
            lines.append(
                f"| {budget:.2f} | {100 * fixed['accuracy']:.2f} % | {fixed['cost']:.3f} | "
                f"{100 * (fixed['cost'] - budget) / budget:+.1f} % | {100 * tracked['accuracy']:.2f} % | "
                f"{tracked['cost']:.3f} | {100 * (tracked['cost'] - budget) / budget:+.1f} % | {served} |"
            )
        lines.append("")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
