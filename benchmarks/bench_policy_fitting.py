"""Benchmark: fitting the exit policies for a 20-budget grid on 10,000 cached samples with 6 exits (CPU).

Fits EENet (ours, `eenet`) and the paper-faithful EENet (`eenet-paper`) -- every budget of the grid in one batched
optimisation -- and the confidence baselines on a synthetic calibration draw (exits of increasing accuracy, see
`hf_eenet.evaluation.synthetic_exit_outputs`), prints the fitting times, and evaluates every policy on an independent
test draw of the same synthetic "model" (simulated accuracy and cost). `--ablations` also fits EENet without each of
its parts (pooled features, allocation search, confidence candidates, sign test (or with it at 1 standard deviation
instead of 2), regret and expected-gain candidates,
cross-validated choice, any held-out data), to show what each part contributes.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_policy_fitting.py --output benchmarks/results/policy_fitting.md
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from bench_cli import positive_int

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_eenet.evaluation import format_budget_table, simulated_budget_table, synthetic_exit_outputs  # noqa: E402
from hf_eenet.models.exit_policies import ConfidenceThresholdPolicy, EENetPaperPolicy, EENetPolicy  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=positive_int, default=10_000)
    parser.add_argument("--num-exits", type=positive_int, default=6)
    parser.add_argument("--num-labels", type=positive_int, default=10)
    parser.add_argument("--num-budgets", type=positive_int, default=20)
    parser.add_argument("--feature-size", type=positive_int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ablations", action="store_true", help="also fit EENet without each of its parts")
    parser.add_argument("--output", type=Path, default=None, help="write the results as markdown here")
    args = parser.parse_args(argv)
    if args.num_budgets < 2 or args.num_exits < 2 or args.num_labels < 2:
        parser.error("--num-budgets, --num-exits and --num-labels must be >= 2")
    return args


def mean_accuracy(rows, name):
    values = [r["accuracy"] for r in rows if r["policy"] == name]
    return sum(values) / len(values)


def main(argv=None):
    args = parse_args(argv)
    calibration = synthetic_exit_outputs(
        args.num_samples, args.num_exits, args.num_labels, args.feature_size, seed=args.seed
    )
    test = synthetic_exit_outputs(
        args.num_samples, args.num_exits, args.num_labels, args.feature_size, seed=args.seed + 1
    )
    costs = calibration["exit_costs"]
    low = max(0.2, round(costs[0] + 0.005, 3))
    budgets = [round(low + i * (0.98 - low) / (args.num_budgets - 1), 4) for i in range(args.num_budgets)]
    inputs = {k: calibration[k] for k in ("exit_logits", "labels", "exit_features")}
    exit_accuracy = (calibration["exit_logits"].argmax(-1) == calibration["labels"][:, None]).float().mean(0)
    print(f"exit accuracies (calibration): {[round(100 * float(a), 1) for a in exit_accuracy]}")
    print(f"exit costs: {[round(c, 3) for c in costs]}; {len(budgets)} budgets {budgets[0]} .. {budgets[-1]}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")

    candidates = {
        "eenet": (EENetPolicy(args.num_exits), True),
        "eenet-paper": (EENetPaperPolicy(args.num_exits), True),
        "max-prob (global)": (ConfidenceThresholdPolicy(args.num_exits, allocation="global"), False),
        "max-prob (geometric)": (ConfidenceThresholdPolicy(args.num_exits, allocation="geometric"), False),
        "entropy (global)": (ConfidenceThresholdPolicy(args.num_exits, score="entropy", allocation="global"), False),
        "entropy (geometric)": (
            ConfidenceThresholdPolicy(args.num_exits, score="entropy", allocation="geometric"),
            False,
        ),
    }
    if args.ablations:
        candidates["eenet, no pooled features"] = (EENetPolicy(args.num_exits), False)
        candidates["eenet, no allocation search"] = (EENetPolicy(args.num_exits, search_allocation=False), True)
        candidates["eenet, no confidence candidates"] = (
            EENetPolicy(args.num_exits, confidence_candidates=False),
            True,
        )
        candidates["eenet, held-out maximum (no sign test)"] = (
            EENetPolicy(args.num_exits, selection_significance=0.0),
            True,
        )
        candidates["eenet, sign test at 1 standard deviation"] = (
            EENetPolicy(args.num_exits, selection_significance=1.0),
            True,
        )
        candidates["eenet, no regret candidate"] = (EENetPolicy(args.num_exits, regret_candidate=False), True)
        candidates["eenet, no expected-gain candidate"] = (EENetPolicy(args.num_exits, gain_candidate=False), True)
        candidates["eenet, one held-out slice (no cross-validation)"] = (
            EENetPolicy(args.num_exits, selection_folds=1),
            True,
        )
        candidates["eenet, no held-out data"] = (
            EENetPolicy(args.num_exits, selection_folds=1, validation_fraction=0.0),
            True,
        )
    policies, timings, epochs = {}, {}, {}
    for name, (policy, with_features) in candidates.items():
        start = time.perf_counter()
        policy.fit(
            **{**inputs, "exit_features": inputs["exit_features"] if with_features else None},
            exit_costs=costs,
            budgets=budgets,
        )
        timings[name] = time.perf_counter() - start
        epochs[name] = policy.fit_summary_[0]["epochs"] if hasattr(policy, "fit_summary_") else None
        policies[name] = policy
        print(f"fit {name:32s} {timings[name]:7.2f} s" + (f"  ({epochs[name]} epochs)" if epochs[name] else ""))

    calibration_rows = simulated_budget_table(policies, **inputs, exit_costs=costs, include_oracle=False)
    over = [r for r in calibration_rows if r["cost"] > r["budget"] + 1e-6]
    print(f"calibration rows over budget: {len(over)} of {len(calibration_rows)}")
    test_rows = simulated_budget_table(
        policies, test["exit_logits"], test["labels"], costs, exit_features=test["exit_features"]
    )
    summary = [
        f"| {name} | {timings[name]:.1f} | {epochs[name] or '—'} | {100 * mean_accuracy(test_rows, name):.2f} |"
        for name in policies
    ]
    print("\n".join(summary))

    if args.output is not None:
        command = "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_policy_fitting.py " + shlex.join(
            argv if argv is not None else sys.argv[1:]
        )
        load = os.getloadavg() if hasattr(os, "getloadavg") else None
        text = [
            "# Exit-policy fitting benchmark",
            "",
            f"Command: `{command.strip()}`",
            "",
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
            f"with {torch.get_num_threads()} threads; load average before the run ended: "
            f"{', '.join(f'{x:.2f}' for x in load) if load else 'n/a'} (the machine is shared).",
            "",
            f"Data: synthetic cached exit outputs (`hf_eenet.evaluation.synthetic_exit_outputs`), {args.num_samples} "
            f"calibration samples, {args.num_exits} exits, {args.num_labels} classes, pooled features of size "
            f"{args.feature_size}; exit accuracies {[round(100 * float(a), 1) for a in exit_accuracy]} %, exit costs "
            f"{[round(c, 3) for c in costs]}. Budget grid: {len(budgets)} budgets, {budgets[0]} .. {budgets[-1]}. "
            "Every budget-matched policy is fitted for the whole grid in one call; EENet's budgets (and restarts, "
            "feature variants) are trained as one batched optimisation.",
            "",
            "## Fitting time (wall clock) and simulated accuracy on an independent test draw",
            "",
            "Mean test accuracy is averaged over the budget grid (simulated, same synthetic model, other samples).",
            "",
            "| policy | fit time (s) | epochs | mean test accuracy (%) |",
            "|---|---|---|---|",
            *summary,
            "",
            f"Calibration rows over budget: {len(over)} of {len(calibration_rows)}.",
            "",
            "## Simulated budget table (test draw)",
            "",
            format_budget_table(test_rows),
            "",
        ]
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text("\n".join(text))
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
