"""The whole EENet workflow in one command, on a slice of SST-2 (`make demo`).

1. train the exits of all-MiniLM-L6-v2 (an exit after every layer, the early ones pooling the tokens with a learned
   attention) on a slice of SST-2 train (`train_exits.py`);
2. fit the exit scheduler (EENet and every baseline) on the calibration split (`fit_scheduler.py`);
3. report the budget table on the test split, simulated and measured (EENet's fixed thresholds, and a `BudgetTracker`
   that keeps the running average cost on each budget), and write the plot (`evaluate_budgets.py`).

Where `../shared/data/sst2` exists it reads it (dev to calibrate, the labelled test to report) and runs offline
(`HF_HUB_OFFLINE=1` unless the variable is set: `HF_HUB_OFFLINE=0` to pass a Hub `--dataset_name` there); without
local data it reads the Hub's `nyu-mll/glue` (`sst2`), whose test labels are withheld, so it calibrates on the first
half of validation and reports on the second. About 2-5 minutes on 2 CPU cores. Any flag that is not the demo's own
goes, after the demo's settings, which it overrides, to every step if it is a dataset flag (`DatasetArguments`:
`--shuffle_seed`, `--max_calibration_samples`, `--max_test_samples`, ...) and to the training step otherwise (every
`train_exits.py` flag, `TrainingArguments`' included). Example:

    python scripts/demo.py --output_dir outputs/demo --max_train_samples 8000 --num_train_epochs 2
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

LOCAL_SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
HUB_SST2 = "nyu-mll/glue"
if LOCAL_SST2.is_dir():  # data and model (the packaged MiniLM) are local: never wait on the Hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before the Hugging Face libraries read it at import

import evaluate_budgets  # noqa: E402
import fit_scheduler  # noqa: E402
import train_exits  # noqa: E402
from transformers import HfArgumentParser  # noqa: E402

from hf_eenet.data import DatasetArguments  # noqa: E402
from hf_eenet.evaluation import ORACLE_NAME  # noqa: E402


@dataclass
class DemoArguments:
    r"""What the demo runs on; any other flag goes to the training step, the rest takes the workflow's defaults."""

    output_dir: str = field(default="outputs/demo", metadata={"help": "Where the three steps write their outputs."})
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "SST-2 as a local directory or Hub id (default: ../shared/data/sst2, else nyu-mll/glue)."},
    )
    dataset_config_name: str | None = field(
        default="sst2", metadata={"help": "Configuration of a Hub dataset (GLUE's 'sst2')."}
    )
    max_train_samples: int = field(default=6000, metadata={"help": "Size of the training slice."})
    max_seq_length: int = field(default=64, metadata={"help": "Truncate texts to this many tokens."})
    measured_budgets: list[float] = field(
        default_factory=lambda: [0.3, 0.5, 0.7], metadata={"help": "Budgets timed on the real early-exit forward."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of training and fitting."})


def data_arguments(args: DemoArguments) -> list[str]:
    """Dataset flags: local SST-2 (dev / test) when present, else the Hub's GLUE SST-2 (validation halves)."""
    name = args.dataset_name or (str(LOCAL_SST2) if LOCAL_SST2.is_dir() else None)
    if name is not None and Path(name).exists():
        return ["--dataset_name", name, "--calibration_split", "dev", "--test_split", "test"]
    flags = ["--dataset_name", name or HUB_SST2, "--calibration_split", "validation[:50%]"]
    flags += ["--test_split", "validation[50%:]"]
    return flags + (["--dataset_config_name", args.dataset_config_name] if args.dataset_config_name else [])


def split_dataset_flags(flags: list[str]) -> tuple[list[str], list[str]]:
    """The flags of `DatasetArguments` (each with its values), which every step takes, and the others."""
    names = {f"--{field.name}" for field in dataclasses.fields(DatasetArguments)}
    dataset_flags, others, target = [], [], None
    for flag in flags:
        if flag.startswith("--"):
            target = dataset_flags if flag.split("=", 1)[0] in names else others
        (target if target is not None else others).append(flag)
    return dataset_flags, others


def main(argv: list[str] | None = None) -> list[dict]:
    parser = HfArgumentParser(
        DemoArguments,
        description="The whole EENet workflow on a slice of SST-2 (train the exits, fit the scheduler, report the "
        "budget table). Any other flag goes on: a dataset flag (e.g. --shuffle_seed, --max_test_samples) to every "
        "step, the others to the training step (every flag of scripts/train_exits.py, TrainingArguments' included).",
    )
    args, training_flags = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        raise ValueError(
            f"The demo runs in one process, but {world_size} were launched. To train and fit with several processes, "
            "launch scripts/train_exits.py, scripts/fit_scheduler.py and scripts/evaluate_budgets.py themselves with "
            "torchrun (see the README)."
        )
    output = Path(args.output_dir)
    dataset_flags, training_flags = split_dataset_flags(training_flags)
    data = data_arguments(args) + [
        "--class_names", "negative", "positive",
        "--max_seq_length", str(args.max_seq_length),
        *dataset_flags,
    ]  # fmt: skip
    common = ["--report_to", "none", "--seed", str(args.seed), "--per_device_eval_batch_size", "64"]
    print(f"[1/3] Training the exits of all-MiniLM-L6-v2 on {args.max_train_samples} SST-2 training samples")
    train_exits.main(
        [
            *data,
            *common,
            "--output_dir",
            str(output / "exits"),
            "--max_train_samples",
            str(args.max_train_samples),
            "--num_train_epochs",
            "1",
            "--per_device_train_batch_size",
            "32",
            "--learning_rate",
            "5e-5",
            "--exit_head_learning_rate",
            "1e-3",
            "--exit_head_pooling",
            "attention",
            "--warmup_steps",
            "20",
            "--train_sampling_strategy",
            "group_by_length",
            "--eval_strategy",
            "no",
            "--save_strategy",
            "no",
            "--logging_steps",
            "50",
            *training_flags,
        ]  # fmt: skip
    )
    print("[2/3] Fitting the exit scheduler (EENet and the baselines) on the calibration split")
    fit_scheduler.main(
        [*data, *common, "--model_name_or_path", str(output / "exits"), "--output_dir", str(output / "model")]
    )
    print(
        "[3/3] Budget table on the test split (simulated for every policy, measured for EENet with its fixed "
        "thresholds and with a BudgetTracker)"
    )
    rows = evaluate_budgets.main(
        [
            *data,
            *common,
            "--model_name_or_path",
            str(output / "model"),
            "--output_dir",
            str(output / "model"),
            "--measured_budgets",
            *map(str, args.measured_budgets),
            "--tracked_policies",
            "eenet",
        ]  # fmt: skip
    )
    print_summary(rows, output / "model")
    return rows


def print_summary(rows: list[dict], model_dir: Path) -> None:
    """EENet against the best baseline at each budget of the test table, and where everything was written."""
    simulated = [row for row in rows if row["mode"] == "simulated"]
    oracle = next(row for row in simulated if row["policy"] == ORACLE_NAME)
    baselines = [row for row in simulated if row["budget"] is not None and not row["policy"].startswith("eenet")]
    print("\nEENet vs the best budget-matched baseline on test (simulated; measured rows above):")
    print(f"{'budget':>6}  {'eenet':>7}  {'eenet-paper':>11}  {'best baseline':>22}")
    for row in simulated:
        if row["policy"] != "eenet":
            continue
        paper = next(r for r in simulated if r["policy"] == "eenet-paper" and r["budget"] == row["budget"])
        best = max((r for r in baselines if r["budget"] == row["budget"]), key=lambda r: r["accuracy"])
        print(
            f"{row['budget']:>6.2f}  {100 * row['accuracy']:>6.2f}%  {100 * paper['accuracy']:>10.2f}%  "
            f"{100 * best['accuracy']:>6.2f}% {best['policy']:>15}"
        )
    print(f"oracle: {100 * oracle['accuracy']:.2f}% at cost {oracle['cost']:.3f}")
    print(f"\nModel with its scheduler, card, tables and plot: {model_dir}")


if __name__ == "__main__":
    sys.exit(main() and 0)
