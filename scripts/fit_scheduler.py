"""Phase 2: fit the exit scheduler of a model with trained exits, with `ExitSchedulerTrainer`.

Runs the model over the calibration split (held out from training, and looking like deployment data), fits EENet
(stored in the model) and every baseline for the budget grid, and saves the model with its scheduler, the budget
table of the calibration split and the fitted policies to `output_dir`. Every `TrainingArguments` flag is available
(evaluation batch size, devices, `seed`, ...), plus the scheduler ones (`--exit_policy`, `--budgets`,
`--default_budget`, `--policy_kwargs`, `--latency_costs_batch_size` to measure the exit costs on this device and
`--latency_costs_early_exit_batches` to refit them to the timed early-exit forward) and the dataset flags of
`hf_eenet.data.DatasetArguments`. Example (offline):

    python scripts/fit_scheduler.py --model_name_or_path outputs/minilm-sst2 --dataset_name ../shared/data/sst2 \
        --calibration_split dev --output_dir outputs/minilm-sst2-eenet

Online, `--dataset_name nyu-mll/glue --dataset_config_name sst2 --calibration_split validation` reads the Hub.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from train_exits import parse_script_arguments, refuse_flags
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging

import hf_eenet  # noqa: F401  (registers the EENet Auto classes)
from hf_eenet.auto import checkpoint_config, is_eenet_config, load_eenet_model, load_processor
from hf_eenet.cpu import tune_cpu_allocator
from hf_eenet.data import DatasetArguments, check_max_seq_length, load_processed_splits, shared_rows
from hf_eenet.evaluation import format_budget_table, format_choices
from hf_eenet.trainer import ExitSchedulerArguments, ExitSchedulerTrainer, budget_table_path, end_distributed_run

logger = logging.get_logger("hf_eenet.scripts.fit_scheduler")


@dataclass
class TrainedModelArguments:
    r"""A model whose exits are trained (the output of `train_exits.py`)."""

    model_name_or_path: str = field(metadata={"help": "EENet checkpoint with trained exits (Hub id or local dir)."})


def load_trained_model(path: str):
    """The EENet model and its processor; a clear error for a checkpoint that is not an EENet model."""
    config = checkpoint_config(path)
    if not is_eenet_config(config):
        raise ValueError(
            f"{path!r} is a {config.model_type!r} checkpoint, not an EENet model with trained exits; train its exits "
            "first with scripts/train_exits.py."
        )
    return load_eenet_model(path), load_processor(path)


def prepare_for(args, processor) -> None:
    """Image data becomes `pixel_values` on access: the trainer must keep the image column."""
    if not isinstance(processor, PreTrainedTokenizerBase):
        args.remove_unused_columns = False


def model_label_names(model) -> list[str]:
    """The model's labels in class-id order."""
    return [model.config.id2label[i] for i in range(model.config.num_labels)]


# `TrainingArguments` that only training uses (fitting the scheduler runs the evaluation loop alone)
TRAINING_ONLY_ARGUMENTS = (
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "warmup_steps",
    "weight_decay",
    "resume_from_checkpoint",
)


def warn_if_calibrating_on_training_rows(model, data_args: DatasetArguments, num_rows: int) -> None:
    """
    Warn when calibration rows were training rows of the exits (as `train_exits.py` recorded them in the card data):
    e.g. training on `train[:90%]` and calibrating on `train[90%:]` with another (or no) `shuffle_seed`. Exits are
    more often right on their training rows, so a scheduler fitted on them exits too early on new data.
    """
    card = getattr(model, "model_card_data", None)
    training = getattr(card, "training_data", None)
    if not training:
        return
    training_args = dataclasses.replace(data_args, **training)
    shared = shared_rows(training_args, "train", data_args, "calibration")
    if shared:
        logger.warning(
            f"{shared} of the {num_rows} calibration rows ({data_args.calibration_split!r}, shuffle_seed "
            f"{data_args.shuffle_seed}) trained the exits ({training['train_split']!r}, shuffle_seed "
            f"{training['shuffle_seed']}): exits are more often right on their training rows, so a scheduler fitted "
            "on them exits too early on new data. Calibrate on held-out rows: another split, or a disjoint slice "
            "with the same `shuffle_seed`."
        )


def parse_arguments(argv: list[str] | None = None):
    return parse_script_arguments((TrainedModelArguments, DatasetArguments, ExitSchedulerArguments), argv)


def main(argv: list[str] | None = None) -> list[dict]:
    """Fit the scheduler; save the model (with its card), tokenizer, budget table and policies; return the table."""
    tune_cpu_allocator()  # keep large CPU tensors' memory in the process (glibc): see hf_eenet.cpu
    model_args, data_args, args = parse_arguments(argv)
    refuse_flags(
        args,
        TRAINING_ONLY_ARGUMENTS,
        "these flags apply to training the exits (scripts/train_exits.py); fitting the scheduler trains no weights.",
    )
    model, processor = load_trained_model(model_args.model_name_or_path)
    prepare_for(args, processor)
    check_max_seq_length(data_args, processor, model.config)
    data, splits, collator = load_processed_splits(
        data_args, processor, roles=("calibration",), label_names=model_label_names(model)
    )
    warn_if_calibrating_on_training_rows(model, data_args, len(splits["calibration"]))
    trainer = ExitSchedulerTrainer(
        model=model,
        args=args,
        eval_dataset=splits["calibration"],
        data_collator=collator,
        processing_class=processor,
    )
    rows = trainer.fit_scheduler(split=data_args.calibration_split)
    card = model.model_card_data
    card.fitting_hyperparameters = {
        **card.fitting_hyperparameters,
        "calibration data": f"{data_args.dataset_name} ({data_args.calibration_split}, {len(splits['calibration'])} "
        "samples)",
        **({"max_seq_length": data_args.max_seq_length} if isinstance(processor, PreTrainedTokenizerBase) else {}),
    }
    trainer.save_model()
    if trainer.is_world_process_zero():
        for round_index, timings in enumerate(trainer.early_exit_cost_timings, 1):
            fractions = {
                row["budget"]: round(1 / row["speedup"], 3) for row in timings["rows"] if row["policy"] != "full model"
            }
            print(
                f"\nRound {round_index}: wall-clock fractions of the early-exit forward on calibration batches "
                f"(measured) {fractions}, with exit costs {[round(c, 4) for c in timings['previous_costs']]}; "
                f"refitted: {[round(c, 4) for c in timings['costs']]}"
            )
        costs = [round(c, 4) for c in model.config.exit_costs]
        segments = model.config.exit_segment_costs
        fixed = f", fixed segment costs {[round(c, 4) for c in segments]}" if segments is not None else ""
        print(f"Exit costs ({model.config.exit_cost_source}): {costs}{fixed}")
        stored = [row for row in rows if row["policy"] in (args.exit_policy, "oracle")]
        print(f"\nStored policy {args.exit_policy!r} on the calibration split (simulated):")
        print(format_budget_table(stored, format="text"))
        choices = model.model_card_data.policy_choices  # recorded by the trainer from the fit
        if choices:
            print("Its choice per budget: " + format_choices(choices))
        table = budget_table_path(args.output_dir, data_args.calibration_split).with_suffix(".md")
        print(f"Every policy's rows: {table} (and .json)")
    return rows


if __name__ == "__main__":
    main()
    end_distributed_run()
