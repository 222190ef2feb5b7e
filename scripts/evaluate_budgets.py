"""Report a model's budget table on a labelled split (test): simulated and measured, with the accuracy-cost plot.

Simulated rows cover every policy `fit_scheduler.py` fitted (read from `exit_policies.*` next to the model) and the
oracle; measured rows run the real early-exit forward beside the full model, timed in one run (`--measured_policies`
chooses which policies, `all` for every one; `--measured_budgets` which budgets; `--tracked_policies` which of them
are also served with a `BudgetTracker`, which keeps the running average cost at the budget). Tables
(`budget_table_<split>.json` and `.md`) and the plot go to `output_dir`; with `--update_model_card` (default) the
model card in `output_dir` gains the test tables and the plot. Example (offline):

    python scripts/evaluate_budgets.py --model_name_or_path outputs/minilm-sst2-eenet \
        --dataset_name ../shared/data/sst2 --output_dir outputs/minilm-sst2-eenet
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from fit_scheduler import load_trained_model, model_label_names, prepare_for
from train_exits import parse_script_arguments, refuse_flags
from transformers.utils import logging

from hf_eenet.cpu import tune_cpu_allocator
from hf_eenet.data import SPLIT_ALIASES, DatasetArguments, check_max_seq_length, load_processed_splits, parse_split
from hf_eenet.evaluation import format_budget_table, load_policies, plot_accuracy_vs_cost
from hf_eenet.model_card import write_model_card
from hf_eenet.trainer import ExitSchedulerArguments, ExitSchedulerTrainer, end_distributed_run, split_file_stem

logger = logging.get_logger("hf_eenet.scripts.evaluate_budgets")

ALL_POLICIES = "all"


@dataclass
class BudgetEvaluationArguments:
    r"""The fitted model and what to report."""

    model_name_or_path: str = field(metadata={"help": "EENet checkpoint with a fitted scheduler."})
    policies_dir: str | None = field(
        default=None,
        metadata={
            "help": "Directory of the policies saved by fit_scheduler.py (default: the model directory when it holds "
            "them, else the model's stored policy alone)."
        },
    )
    measured: bool = field(default=True, metadata={"help": "Also time the real early-exit forward."})
    measured_policies: list[str] | None = field(
        default=None, metadata={"help": "Policies to measure (default: the stored one; 'all' for every policy)."}
    )
    measured_budgets: list[float] | None = field(
        default=None, metadata={"help": "Budgets to measure (default: the fitted grid)."}
    )
    tracked_policies: list[str] | None = field(
        default=None,
        metadata={
            "help": "Measured policies whose budgets are also served with a BudgetTracker over the split in order "
            "(rows '<name> (budget tracked)': the running average cost kept at the budget); 'all' for every measured "
            "budget-matched policy."
        },
    )
    measured_warmup_batches: int = field(
        default=1,
        metadata={
            "help": "Leading batches run through every measured configuration, untimed, before the timed pass. On a "
            "GPU each new survivor count looks up or builds kernel plans: a warm-up over as many batches as are "
            "timed measures the steady state of long-running traffic instead of cold shapes."
        },
    )
    plot: bool = field(default=True, metadata={"help": "Write the accuracy-vs-cost plot."})
    update_model_card: bool = field(
        default=True, metadata={"help": "Add the tables and plot to the model card in `output_dir`."}
    )

    def __post_init__(self):
        if self.measured_warmup_batches < 0:
            raise ValueError(f"`measured_warmup_batches` must be >= 0, got {self.measured_warmup_batches}.")


def parse_arguments(argv: list[str] | None = None):
    return parse_script_arguments((BudgetEvaluationArguments, DatasetArguments, ExitSchedulerArguments), argv)


# `ExitSchedulerArguments` that only fitting uses: evaluating the fitted policies with any of them set would ignore it.
FIT_ONLY_ARGUMENTS = (
    "exit_policy",
    "budgets",
    "fit_baselines",
    "default_budget",
    "policy_kwargs",
    "policy_seed",
    "latency_costs_batch_size",
    "latency_segment_costs",
    "latency_costs_early_exit_batches",
    "latency_costs_early_exit_rounds",
)


def check_no_fitting_arguments(args: ExitSchedulerArguments) -> None:
    """Refuse the fitting flags: this script reports the policies fit_scheduler.py fitted, as they were fitted."""
    refuse_flags(
        args,
        FIT_ONLY_ARGUMENTS,
        "these flags apply to fitting (scripts/fit_scheduler.py); evaluate_budgets.py reports the policies as they "
        "were fitted (`--measured_budgets` chooses which of their budgets are timed).",
    )


def same_rows(split: str, other: str) -> bool:
    """
    Whether two split names select the same rows: the same split (or an alias, e.g. "dev" and "validation") and the
    same row slice, or one without a slice. Different slices of one split (e.g. "validation[:50%]" and
    "validation[50%:]") are taken to be the disjoint halves they usually are.
    """
    (name, rows), (other_name, other_rows) = parse_split(split), parse_split(other)
    same_split = name == other_name or other_name in SPLIT_ALIASES.get(name, ())
    return same_split and (rows is None or other_rows is None or rows == other_rows)


def same_policy(a, b) -> bool:
    """Whether two fitted policies are the same: the same description and the same tensors."""
    state_a, state_b = a.state_dict(), b.state_dict()
    return (
        a.get_config() == b.get_config()
        and state_a.keys() == state_b.keys()
        and all(torch.equal(state_a[key].cpu(), state_b[key].cpu()) for key in state_a)
    )


def fitted_policies(model, eval_args: BudgetEvaluationArguments) -> tuple[dict, str]:
    """
    The policies to report (those saved by fit_scheduler.py, or the model's stored policy alone) and the name, among
    them, of the policy stored in the model (saved policies are named for display, e.g. "max-prob (global)").
    """
    if model.exit_policy is None:
        raise ValueError(
            f"{eval_args.model_name_or_path!r} has no fitted exit policy; fit one first with scripts/fit_scheduler.py."
        )
    directory = eval_args.policies_dir
    if directory is None and Path(eval_args.model_name_or_path, "exit_policies.json").is_file():
        directory = eval_args.model_name_or_path
    if directory is None:
        name = model.exit_policy.policy_type
        return {name: model.exit_policy}, name
    policies = load_policies(directory)
    name = next((name for name, policy in policies.items() if same_policy(policy, model.exit_policy)), None)
    if name is None:
        raise ValueError(
            f"None of the policies saved in {str(directory)!r} is the {model.exit_policy.policy_type!r} policy stored "
            f"in {eval_args.model_name_or_path!r}: they were fitted for another model (or before its policy was "
            "replaced). Fit them again with scripts/fit_scheduler.py."
        )
    return policies, name


def main(argv: list[str] | None = None) -> list[dict]:
    """Evaluate; save the tables, the plot and (optionally) the updated model card; return every row."""
    tune_cpu_allocator()  # keep large CPU tensors' memory in the process (glibc): see hf_eenet.cpu
    eval_args, data_args, args = parse_arguments(argv)
    check_no_fitting_arguments(args)
    model, processor = load_trained_model(eval_args.model_name_or_path)
    prepare_for(args, processor)
    check_max_seq_length(data_args, processor, model.config)
    card = getattr(model, "model_card_data", None)
    if (
        card is not None
        and card.calibration_split is not None
        and same_rows(card.calibration_split, data_args.test_split)
    ):
        logger.warning(
            f"The test split {data_args.test_split!r} is the one the scheduler was fitted on: its rows are in-sample, "
            "not held-out results."
        )
    policies, stored = fitted_policies(model, eval_args)
    args.exit_policy = stored
    _, splits, collator = load_processed_splits(
        data_args, processor, roles=("test",), label_names=model_label_names(model)
    )
    trainer = ExitSchedulerTrainer(
        model=model, args=args, policies=policies, data_collator=collator, processing_class=processor
    )
    measured_policies = eval_args.measured_policies
    if measured_policies == [ALL_POLICIES]:
        measured_policies = list(policies)
    tracked_policies = eval_args.tracked_policies or []
    if tracked_policies == [ALL_POLICIES]:
        tracked_policies = [name for name in measured_policies or [stored] if policies[name].requires_budget]
    split = data_args.test_split
    rows = trainer.evaluate_budgets(
        splits["test"],
        split=split,
        measured=eval_args.measured,
        measured_policies=measured_policies,
        measured_budgets=eval_args.measured_budgets,
        num_warmup_batches=eval_args.measured_warmup_batches,
        tracked_policies=tracked_policies,
    )
    if not trainer.is_world_process_zero():
        return rows
    output_dir = Path(args.output_dir)
    if eval_args.plot:
        plot = plot_accuracy_vs_cost(
            rows,
            output_dir / f"budget_plot_{split_file_stem(split)}.png",
            title=f"{Path(eval_args.model_name_or_path).name}: {split}",
        )
        model.model_card_data.plot_path = str(plot)
        print(f"Plot: {plot}")
    if eval_args.update_model_card:
        write_model_card(model, output_dir, overwrite=True)
    print(f"\nBudget table on {split}:")
    print(format_budget_table(rows, format="text"))
    if args.push_to_hub:
        trainer.push_to_hub(commit_message=f"Budget evaluation on {split}")
    return rows


if __name__ == "__main__":
    main()
    end_distributed_run()
