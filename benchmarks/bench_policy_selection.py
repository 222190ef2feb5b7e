"""Benchmark: what EENet's parts add on a real model, against the best budget-matched baseline of every budget.

Caches every exit of a trained EENet model on its calibration split and on a test split (one pass each), fits the
four confidence baselines (max-prob and entropy, global and geometric allocation) and several EENet variants on the
calibration split for the budget grid of the model's stored policy (or `--budgets`), and reports, per budget, each
variant's simulated test accuracy minus the best baseline's on test (the baseline chosen in hindsight, on test).
Variants: the default EENet, with its guard against the confidence rules at 1 standard deviation instead of 2,
without the expected-gain candidate, without the regret candidate, with one held-out slice instead of the
cross-validated choice, with that and no regret candidate, and the paper-faithful EENet. Three last rows are not
policies but bounds in hindsight (they read the test labels): the default and the paper-faithful EENet fitted on test
itself and simulated on it (`HINDSIGHT_FITS`: how far EENet's function classes go on these exits when calibration
and test are the same samples), and max-prob with per-exit thresholds searched on test (`hindsight_max_prob`). Exit
costs are the model's own (`model.exit_cost_model()`), the seed `--seed` (or `--policy_seed`), as in
`fit_scheduler.py`.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_policy_selection.py \
        --model_name_or_path outputs/resnet-cifar10-block-eenet --dataset_name ../shared/data/cifar10 \
        --calibration_split "train[90%:]" --test_split test --shuffle_seed 0 --per_device_eval_batch_size 256 \
        --report_to none --seed 42 --output_dir /tmp/selection --report benchmarks/results/policy_selection_resnet.md
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from fit_scheduler import load_trained_model, model_label_names, prepare_for  # noqa: E402
from train_exits import parse_script_arguments  # noqa: E402

from hf_eenet.data import DatasetArguments, load_processed_splits  # noqa: E402
from hf_eenet.evaluation import simulated_budget_table, standard_policies  # noqa: E402
from hf_eenet.models.exit_policies import (  # noqa: E402
    ConfidenceThresholdPolicy,
    EENetPaperPolicy,
    EENetPolicy,
    exit_fractions,
    first_exit_over_threshold,
    geometric_exit_fractions,
    global_thresholds,
    match_thresholds,
    search_exit_fractions,
)
from hf_eenet.trainer import ExitSchedulerArguments, ExitSchedulerTrainer  # noqa: E402


@dataclass
class SelectionBenchmarkArguments:
    model_name_or_path: str = field(metadata={"help": "A trained EENet model (its exit costs are used)."})
    report: str = field(metadata={"help": "Write the results as markdown here."})


HINDSIGHT = "max-prob, thresholds searched on test (hindsight)"
HINDSIGHT_FITS = {  # row name: the variant fitted on test itself
    "eenet, fitted on test (hindsight)": "eenet",
    "eenet-paper, fitted on test (hindsight)": "eenet-paper",
}


def variants(num_exits: int, seed: int = 0) -> dict:
    return {
        "eenet": EENetPolicy(num_exits, seed=seed),
        "eenet, guard at 1 sd": EENetPolicy(num_exits, selection_significance=1.0, seed=seed),
        "eenet, no gain candidate": EENetPolicy(num_exits, gain_candidate=False, seed=seed),
        "eenet, no regret candidate": EENetPolicy(num_exits, regret_candidate=False, seed=seed),
        "eenet, one held-out slice": EENetPolicy(num_exits, selection_folds=1, seed=seed),
        "eenet, one held-out slice, no regret candidate": EENetPolicy(
            num_exits, selection_folds=1, regret_candidate=False, seed=seed
        ),
        "eenet-paper": EENetPaperPolicy(num_exits, seed=seed),
    }


def baselines(num_exits: int) -> dict:
    """The four budget-matched confidence baselines of every budget table."""
    policies = standard_policies(num_exits, eenet=False)
    return {name: policy for name, policy in policies.items() if isinstance(policy, ConfidenceThresholdPolicy)}


def accuracies(policies: dict, outputs: dict, costs) -> dict[str, list[float]]:
    rows = simulated_budget_table(
        policies, outputs["exit_logits"], outputs["labels"], costs, outputs["exit_features"], include_oracle=False
    )
    table: dict[str, list[float]] = {}
    for row in rows:
        table.setdefault(row["policy"], []).append(row["accuracy"])
    return table


def cached_exits(arguments_class: type, argv: list[str] | None):
    """
    Parse a benchmark's arguments (`arguments_class`, the dataset's and the scheduler trainer's), load its model and
    cache every exit on the calibration and test splits. Returns the three argument objects, the model and the two
    caches.
    """
    bench_args, data_args, args = parse_script_arguments(
        (arguments_class, DatasetArguments, ExitSchedulerArguments), argv
    )
    model, processor = load_trained_model(bench_args.model_name_or_path)
    prepare_for(args, processor)
    _, splits, collator = load_processed_splits(
        data_args, processor, roles=("calibration", "test"), label_names=model_label_names(model)
    )
    trainer = ExitSchedulerTrainer(model=model, args=args, data_collator=collator, processing_class=processor)
    calibration = trainer.cache_exit_outputs(splits["calibration"])
    test = trainer.cache_exit_outputs(splits["test"], description="Caching test exit outputs")
    return bench_args, data_args, args, model, calibration, test


def budget_grid(args: ExitSchedulerArguments, model) -> list[float]:
    """`--budgets`, else the grid the model's stored policy was fitted for, else 0.3 to 0.9 in steps of 0.05."""
    stored = model.exit_policy
    if args.budgets:
        return list(args.budgets)
    if stored is not None and stored.requires_budget and stored.is_fitted:
        return list(stored.budgets)
    return [round(0.3 + 0.05 * i, 2) for i in range(13)]


def hindsight_max_prob(outputs: dict, costs, budgets) -> list[float]:
    """
    Test accuracy of max-prob with per-exit thresholds searched on the test samples themselves (it reads their
    labels, like the oracle): starting from the global and the geometric allocation of each budget, the exit fractions
    are moved by `search_exit_fractions` while test accuracy rises, and the better of the two is kept. Not a policy:
    what tuning max-prob's thresholds in hindsight reaches on these exits (a local search, so a reference point rather
    than a strict bound).
    """
    logits, labels = outputs["exit_logits"].float(), outputs["labels"]
    scores = logits.softmax(-1).amax(-1)  # (N, K)
    correct = (logits.argmax(-1) == labels[:, None]).float()
    grid = torch.tensor(budgets)
    num_samples, num_exits = scores.shape
    starts = {
        "global": torch.stack(
            [
                exit_fractions(first_exit_over_threshold(scores, global_thresholds(scores, costs, b)), num_exits)
                for b in budgets
            ]
        ),
        "geometric": torch.stack([geometric_exit_fractions(costs, b) for b in budgets]),
    }
    best = torch.zeros(len(budgets))
    score_sets = scores.expand(len(budgets), num_samples, num_exits)
    for fractions in starts.values():
        searched = search_exit_fractions(score_sets, correct, fractions, costs, grid)
        _, exits = match_thresholds(score_sets, searched[:, None])
        best = torch.maximum(best, correct[torch.arange(num_samples), exits[:, 0]].mean(-1))
    return best.tolist()


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that ran `script` (a file under `benchmarks/`) with `argv`, as a report quotes it."""
    arguments = shlex.join(argv if argv is not None else sys.argv[1:])
    return f"HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/{script} {arguments}".strip()


def write_report(path: str, lines: list[str]) -> None:
    report = Path(path)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines))
    print(f"wrote {report}")


def main(argv: list[str] | None = None) -> dict:
    bench_args, data_args, args, model, calibration, test = cached_exits(SelectionBenchmarkArguments, argv)
    costs = model.exit_cost_model()  # with its segment costs, if measured
    budgets = budget_grid(args, model)

    fitted, timings = {}, {}
    seed = args.seed if args.policy_seed is None else args.policy_seed  # as `fit_scheduler.py` seeds them
    num_exits = model.config.num_exits
    calibration_fits = {**baselines(num_exits), **variants(num_exits, seed)}
    to_fit = [(name, policy, calibration) for name, policy in calibration_fits.items()]
    to_fit += [(name, variants(num_exits, seed)[variant], test) for name, variant in HINDSIGHT_FITS.items()]
    for name, policy, outputs in to_fit:
        start = time.perf_counter()
        policy.fit(outputs["exit_logits"], outputs["labels"], costs, budgets, outputs["exit_features"])
        timings[name], fitted[name] = time.perf_counter() - start, policy
        print(f"fit {name:48s} {timings[name]:6.1f} s", flush=True)
    table = accuracies(fitted, test, costs)
    best = [max(table[name][m] for name in baselines(1)) for m in range(len(budgets))]
    best_name = [max(baselines(1), key=lambda name: table[name][m]) for m in range(len(budgets))]
    margins = {
        name: [100 * (table[name][m] - best[m]) for m in range(len(budgets))]
        for name in [*variants(1), *HINDSIGHT_FITS]
    }
    hindsight = hindsight_max_prob(test, costs, budgets)
    margins[HINDSIGHT] = [100 * (hindsight[m] - best[m]) for m in range(len(budgets))]

    target = [m for m, budget in enumerate(budgets) if 0.3 - 1e-9 <= budget <= 0.9 + 1e-9] or list(range(len(budgets)))
    summary = []
    for name, values in margins.items():
        values = [values[m] for m in target]
        fit_time = f"{timings[name]:.1f}" if name in timings else "-"
        summary.append(
            f"| {name} | {fit_time} | {sum(values) / len(values):+.2f} | {min(values):+.2f} | "
            f"{sum(v < -1e-9 for v in values)} of {len(values)} |"
        )
    per_budget = [
        f"| {budget:.2f} | {100 * best[m]:.2f} % ({best_name[m]}) | "
        + " | ".join(f"{margins[name][m]:+.2f}" for name in margins)
        + " |"
        for m, budget in enumerate(budgets)
    ]
    num_test, num_calibration = test["exit_logits"].shape[0], calibration["exit_logits"].shape[0]
    exit_accuracy = (test["exit_logits"].argmax(-1) == test["labels"][:, None]).float().mean(0)
    text = [
        f"# EENet's parts on {Path(bench_args.model_name_or_path).name}: margins to the best baseline (simulated)",
        "",
        f"Command: `{command_line('bench_policy_selection.py', argv)}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"with {torch.get_num_threads()} threads (fit times on a shared machine).",
        "",
        f"Every policy is fitted on the {num_calibration} samples of `{data_args.calibration_split}` and simulated on "
        f"the {num_test} of `{data_args.test_split}` from cached exit outputs (one sample of test: "
        f"{100 / num_test:.3f} pt). Exit costs ({model.config.exit_cost_source}): {[round(c, 3) for c in costs.exit_costs]}; "
        f"test accuracy per exit: {[round(100 * float(a), 2) for a in exit_accuracy]} %. The best baseline of a budget "
        "is the most accurate of max-prob and entropy with global and geometric allocation on test (chosen in "
        "hindsight). The three last rows are not policies but bounds in hindsight (they read the test labels): EENet "
        "and the paper-faithful EENet fitted on test itself and simulated on it (how far their function classes go on "
        "these exits when calibration and test are the same samples), and max-prob with per-exit thresholds searched "
        "on test (a local search from the global and geometric allocations), how far tuning max-prob's thresholds "
        "goes.",
        "",
        f"Every policy is fitted for the budgets {budgets}; the summary covers those from 0.3 to 0.9.",
        "",
        "| policy | fit time (s) | mean margin (pt) | worst margin (pt) | budgets below the best baseline |",
        "|---|---|---|---|---|",
        *summary,
        "",
        "## Margin to the best baseline per budget (pt, simulated on test)",
        "",
        "| budget | best baseline | " + " | ".join(margins) + " |",
        "|---|---|" + "---|" * len(margins),
        *per_budget,
        "",
    ]
    write_report(bench_args.report, text)
    print("\n".join(summary))
    return margins


if __name__ == "__main__":
    main()
