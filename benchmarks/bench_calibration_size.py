"""Benchmark: would more calibration data let EENet beat the confidence baselines? (simulated)

Caches every exit of a trained EENet model on its calibration split and on a labelled test split, cuts the test
split into two random halves, and for each half: fits the four confidence baselines and EENet on (a) the calibration
split alone and (b) the calibration split plus that half, and simulates both on the *other* half. Each sample of the
test split is thus evaluated once per setting, by policies that never saw it; (b) has about as many more calibration
samples as half the test split. The report gives, per budget, EENet's margin to the best baseline of the same
setting (chosen in hindsight on the evaluated half), summed over both halves. Exit costs are the model's own.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_calibration_size.py \
        --model_name_or_path outputs/minilm-sst2-eenet --dataset_name ../shared/data/sst2 \
        --calibration_split dev --test_split test --max_seq_length 64 --per_device_eval_batch_size 64 \
        --report_to none --seed 42 --output_dir /tmp/calibration-size --report benchmarks/results/calibration_size_sst2.md
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(ROOT / "benchmarks")]

from bench_policy_selection import (  # noqa: E402
    accuracies,
    baselines,
    budget_grid,
    cached_exits,
    command_line,
    write_report,
)

from hf_eenet.models.exit_policies import EENetPolicy  # noqa: E402


@dataclass
class CalibrationSizeArguments:
    model_name_or_path: str = field(metadata={"help": "A trained EENet model (its exit costs are used)."})
    report: str = field(metadata={"help": "Write the results as markdown here."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the random halves of the test split."})


def subset(outputs: dict, index: torch.Tensor) -> dict:
    return {
        "exit_logits": outputs["exit_logits"][index],
        "labels": outputs["labels"][index],
        "exit_features": [features[index] for features in outputs["exit_features"]],
    }


def concatenate(first: dict, second: dict) -> dict:
    return {
        "exit_logits": torch.cat([first["exit_logits"], second["exit_logits"]]),
        "labels": torch.cat([first["labels"], second["labels"]]),
        "exit_features": [torch.cat([a, b]) for a, b in zip(first["exit_features"], second["exit_features"])],
    }


def main(argv: list[str] | None = None) -> dict:
    bench_args, data_args, args, model, calibration, test = cached_exits(CalibrationSizeArguments, argv)
    costs, num_exits = model.exit_cost_model(), model.config.num_exits  # with segment costs, if measured
    budgets = budget_grid(args, model)
    seed = args.seed if args.policy_seed is None else args.policy_seed
    num_test = test["labels"].numel()
    order = torch.randperm(num_test, generator=torch.Generator().manual_seed(bench_args.split_seed))
    halves = [order[: num_test // 2], order[num_test // 2 :]]

    settings = {"calibration split": [], "calibration split + half of test": []}
    hits = {name: {"eenet": [0.0] * len(budgets), "best baseline": [0.0] * len(budgets)} for name in settings}
    for half in range(2):
        evaluated = subset(test, halves[1 - half])
        fit_sets = {
            "calibration split": calibration,
            "calibration split + half of test": concatenate(calibration, subset(test, halves[half])),
        }
        for name, fit_set in fit_sets.items():
            policies = {**baselines(num_exits), "eenet": EENetPolicy(num_exits, seed=seed)}
            for policy in policies.values():
                policy.fit(fit_set["exit_logits"], fit_set["labels"], costs, budgets, fit_set["exit_features"])
            table = accuracies(policies, evaluated, costs)
            count = evaluated["labels"].numel()
            for m in range(len(budgets)):
                hits[name]["eenet"][m] += table["eenet"][m] * count
                hits[name]["best baseline"][m] += max(table[b][m] for b in baselines(1)) * count
            settings[name].append(fit_set["labels"].numel())
            print(f"half {half}: fitted on {name} ({fit_set['labels'].numel()} samples)", flush=True)

    def margins(name: str) -> list[float]:
        return [100 * (e - b) / num_test for e, b in zip(hits[name]["eenet"], hits[name]["best baseline"])]

    in_range = [m for m, b in enumerate(budgets) if 0.3 - 1e-9 <= b <= 0.9 + 1e-9] or list(range(len(budgets)))
    summary = []
    for name, sizes in settings.items():
        values = [margins(name)[m] for m in in_range]
        summary.append(
            f"| {name} | {' / '.join(str(s) for s in sizes)} | {sum(values) / len(values):+.2f} | {min(values):+.2f} | "
            f"{max(values):+.2f} |"
        )
    per_budget = [
        f"| {budget:.2f} | " + " | ".join(f"{margins(name)[m]:+.2f}" for name in settings) + " |"
        for m, budget in enumerate(budgets)
    ]
    text = [
        f"# More calibration data for EENet on {Path(bench_args.model_name_or_path).name} (simulated)",
        "",
        f"Command: `{command_line('bench_calibration_size.py', argv)}`",
        "",
        f"The {num_test} samples of `{data_args.test_split}` are cut into two random halves (seed "
        f"{bench_args.split_seed}). For each half, the four confidence baselines and EENet are fitted on the "
        f"{calibration['labels'].numel()} samples of `{data_args.calibration_split}` alone, and on those plus the half, "
        "then simulated on the other half; margins are EENet's accuracy minus the best baseline's of the same setting "
        f"(chosen in hindsight on the evaluated half), over all {num_test} evaluated samples (one sample: "
        f"{100 / num_test:.3f} pt). Budgets: {budgets}; the summary covers 0.3-0.9. Exit costs "
        f"({model.config.exit_cost_source}): {[round(c, 3) for c in costs.exit_costs]}.",
        "",
        "| fitted on | calibration samples (per half) | mean margin (pt) | worst (pt) | best (pt) |",
        "|---|---|---|---|---|",
        *summary,
        "",
        "## Margin to the best baseline per budget (pt)",
        "",
        "| budget | " + " | ".join(settings) + " |",
        "|---|" + "---|" * len(settings),
        *per_budget,
        "",
    ]
    write_report(bench_args.report, text)
    print("\n".join(summary))
    return {name: margins(name) for name in settings}


if __name__ == "__main__":
    main()
