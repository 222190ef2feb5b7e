"""Trainers of the multi-exit (EENet) models.

[`EarlyExitTrainer`] is phase 1 of the EENet workflow: it trains the exits of any EENet model (BERT, ViT, ResNet)
with the multi-exit loss, a separate learning rate for the exit heads, optional self-distillation from the last exit
and a *retrofit* mode that trains only the exit heads of an already fine-tuned model. It relies only on what every
EENet model shares: `all_exit_logits` in the output of an all-exits forward and the `exit_heads` module list.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import EvalPrediction, Trainer, TrainingArguments
from transformers.utils import logging

from .models.exit_policies import BUDGET_TOLERANCE, ExitPolicy

__all__ = [
    "EENetModelCardMixin",
    "EarlyExitTrainer",
    "EarlyExitTrainingArguments",
    "ExitSchedulerArguments",
    "ExitSchedulerTrainer",
    "compute_exit_accuracies",
    "end_distributed_run",
    "exit_head_parameters",
]

logger = logging.get_logger(__name__)

EXIT_HEADS_ATTRIBUTE = "exit_heads"


def end_distributed_run() -> None:
    """
    Destroy the default process group of a `torchrun` / `accelerate launch` run, if there is one, so every process
    exits cleanly: left to the interpreter's exit, gloo's threads can abort a process that finished its work
    ("terminate called without an active exception"), failing the whole launch. The scripts call it when they end.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@dataclass
class EarlyExitTrainingArguments(TrainingArguments):
    r"""
    [`~transformers.TrainingArguments`] plus the options of [`EarlyExitTrainer`]. Every field is also a command-line
    flag through [`~transformers.HfArgumentParser`].

    Args:
        exit_head_learning_rate (`float`, *optional*, defaults to 1e-3):
            Initial learning rate of the early-exit heads (the modules under the model's `exit_heads`); the rest of
            the model (backbone and final classifier) uses `learning_rate`. Freshly initialised exit heads on a
            pretrained backbone need a much larger rate than the backbone. `None` uses `learning_rate` for every
            parameter. Both follow the same schedule (`lr_scheduler_type`, warmup).
        exit_loss_weights (`list[float]`, *optional*):
            Weight `w_k` of each exit in the multi-exit loss `sum_k w_k CE_k / sum_k w_k`, one per exit. `None` uses
            the model's `config.exit_loss_weights` (by default `k + 1`, deeper exits weigh more, as in EENet).
        distillation_weight (`float`, *optional*, defaults to 0.0):
            Weight `lambda` of the self-distillation term added to the multi-exit loss once distillation is on:
            `T^2 * sum_{k<K-1} w_k KL(softmax(z_{K-1}/T) || softmax(z_k/T)) / sum_{k<K-1} w_k`, where the last exit's
            logits `z_{K-1}` are detached (the last exit teaches, it is not pulled towards the earlier ones); when
            every early exit's weight `w_k` is 0 they weigh alike. 0 turns self-distillation off.
        distillation_temperature (`float`, *optional*, defaults to 2.0):
            Softmax temperature `T` of self-distillation.
        distillation_start (`float`, *optional*, defaults to 0.5):
            Fraction of the training steps, in `[0, 1)`, after which self-distillation switches on (0 = from the
            first step), so that the last exit is a useful teacher by then.
        retrofit (`bool`, *optional*, defaults to `False`):
            Freeze the backbone and the final classifier (every parameter outside `exit_heads`, which stay
            bit-identical, buffers included: the frozen modules also run in eval mode, so dropout is off and
            batch-norm statistics do not move) and train only the exit heads, e.g. to add exits to an already
            fine-tuned classifier without changing its predictions.
        ddp_find_unused_parameters (`bool`, *optional*, defaults to `False`):
            As in [`~transformers.TrainingArguments`], but off by default: every exit is computed for every sample
            in training, so a multi-exit model has no unused parameters under DDP.
    """

    exit_head_learning_rate: float | None = field(
        default=1e-3,
        metadata={
            "help": "Initial learning rate of the early-exit heads (the rest of the model uses `learning_rate`). "
            "None uses `learning_rate` everywhere."
        },
    )
    exit_loss_weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "Weight of each exit in the multi-exit loss, one per exit. Defaults to the model's "
            "`config.exit_loss_weights` (proportional to exit depth)."
        },
    )
    distillation_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of self-distillation from the last exit into the earlier exits (0 = off)."},
    )
    distillation_temperature: float = field(
        default=2.0, metadata={"help": "Softmax temperature of self-distillation."}
    )
    distillation_start: float = field(
        default=0.5,
        metadata={"help": "Fraction of the training steps after which self-distillation switches on (0 = at once)."},
    )
    retrofit: bool = field(
        default=False,
        metadata={
            "help": "Freeze the backbone and the final classifier (they stay bit-identical) and train only the exit "
            "heads."
        },
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={
            "help": "The `find_unused_parameters` flag passed to `DistributedDataParallel`. Off by default: every "
            "exit runs in training, so no parameter is unused."
        },
    )

    def __post_init__(self):
        if self.exit_head_learning_rate is not None and not self.exit_head_learning_rate > 0:
            raise ValueError(f"`exit_head_learning_rate` must be > 0 or None, got {self.exit_head_learning_rate}.")
        if not (self.distillation_weight >= 0 and math.isfinite(self.distillation_weight)):
            raise ValueError(f"`distillation_weight` must be a finite number >= 0, got {self.distillation_weight}.")
        if not self.distillation_temperature > 0:
            raise ValueError(f"`distillation_temperature` must be > 0, got {self.distillation_temperature}.")
        if not 0.0 <= self.distillation_start < 1.0:
            raise ValueError(
                f"`distillation_start` must lie in [0, 1) (the fraction of training after which distillation is on; "
                f"1 would never switch it on: set `distillation_weight=0` instead), got {self.distillation_start}."
            )
        if self.exit_loss_weights is not None:
            self.exit_loss_weights = _validated_exit_weights(self.exit_loss_weights)
        super().__post_init__()


@functools.cache
def _field_defaults(arguments_class: type) -> dict:
    return {f.name: f.default for f in dataclasses.fields(arguments_class)}


def _option(args: TrainingArguments, name: str, arguments_class: type):
    """An option of `arguments_class`, or its default when the trainer was given plain `TrainingArguments`."""
    return getattr(args, name, _field_defaults(arguments_class)[name])


def _validated_exit_weights(weights: Sequence[float], num_exits: int | None = None) -> list[float]:
    weights = [float(w) for w in weights]
    if (
        not weights
        or any(not (w >= 0 and math.isfinite(w)) for w in weights)
        or sum(weights) <= 0
        or (num_exits is not None and len(weights) != num_exits)
    ):
        expected = f"{num_exits} " if num_exits is not None else ""
        raise ValueError(
            f"`exit_loss_weights` must hold {expected}finite non-negative numbers with a positive sum (one per exit), "
            f"got {weights}."
        )
    return weights


def exit_head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """
    The parameters of a multi-exit model's early-exit heads: those of its `exit_heads` module (the last exit, the
    backbone's own classifier, is not an exit head). A model may instead define an `exit_head_parameters()` method.

    Args:
        model (`torch.nn.Module`): an EENet model (not wrapped in DDP).

    Returns:
        `list[torch.nn.Parameter]`: possibly empty (a model with a single exit).
    """
    method = getattr(model, "exit_head_parameters", None)
    if callable(method):
        return list(method())
    heads = getattr(model, EXIT_HEADS_ATTRIBUTE, None)
    if not isinstance(heads, nn.Module):
        raise ValueError(
            f"{type(model).__name__} has no `{EXIT_HEADS_ATTRIBUTE}` module: EarlyExitTrainer needs a multi-exit "
            "(EENet) model whose early-exit heads live under `exit_heads`."
        )
    return list(heads.parameters())


def compute_exit_accuracies(eval_prediction) -> dict[str, float]:
    """
    A `compute_metrics` for [`EarlyExitTrainer`]: the accuracy of every exit (`exit_{k}_accuracy`) and of the last
    one (`accuracy`).

    With labels, the trainer's predictions are the model's output fields in order (`logits`, `exit_index`,
    `exit_cost`, `all_exit_logits`); the per-exit logits are the one array of shape `(N, num_exits, num_labels)`.

    Args:
        eval_prediction ([`~transformers.EvalPrediction`]): predictions and `label_ids`.
    """
    predictions = eval_prediction.predictions
    arrays = predictions if isinstance(predictions, (tuple, list)) else (predictions,)
    all_exit_logits = next((np.asarray(a) for a in arrays if np.ndim(a) == 3), None)
    if all_exit_logits is None:
        raise ValueError("No per-exit logits of shape (N, num_exits, num_labels) among the predictions.")
    labels = np.asarray(eval_prediction.label_ids)
    correct = all_exit_logits.argmax(-1) == labels[:, None]
    metrics = {f"exit_{k}_accuracy": float(correct[:, k].mean()) for k in range(correct.shape[1])}
    metrics["accuracy"] = metrics[f"exit_{correct.shape[1] - 1}_accuracy"]
    return metrics


def refuse_full_eval_casts(args: TrainingArguments, consequence: str) -> None:
    """
    Refuse `fp16_full_eval` / `bf16_full_eval`, with which the Trainer casts the model's weights to half precision in
    place to evaluate; `consequence` says what that would break.
    """
    for flag in ("fp16_full_eval", "bf16_full_eval"):
        if getattr(args, flag, False):
            raise ValueError(
                f"`{flag}=True` makes the Trainer cast the model's weights to half precision in place for "
                f"evaluation: {consequence}. Evaluate with mixed precision (`fp16` / `bf16`) or in float32, or load "
                "the model in half precision (`from_pretrained(..., dtype=torch.bfloat16)`)."
            )


def _check_distributed_launch(args: TrainingArguments) -> None:
    """
    A clear error when several processes were launched (`torchrun`, `accelerate launch`) but the arguments do not run
    distributed: Trainer would then let each process shard the data without gathering it, so every process would
    train or fit on a part of the split and write its own result.
    """
    import torch.distributed as dist

    launched = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if launched > 1 and args.world_size == 1:
        raise ValueError(
            f"{launched} processes were launched, but these arguments run a single process ({args.parallel_mode}). "
            "On a machine without an accelerator, pass `--use_cpu` (`use_cpu=True`) with `--ddp_backend gloo`."
        )


class EENetModelCardMixin:
    """`Trainer.create_model_card` writing hf_eenet's card (stock Trainer would write its own generic one)."""

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """
        Write the model's hf_eenet card (`README.md`, card data, plot) into `output_dir`, as `trainer.push_to_hub()`
        uploads it. The stock arguments update the card data when given.
        """
        if not self.is_world_process_zero():
            return
        from .model_card import EENetModelCardData, write_model_card

        model = self.accelerator.unwrap_model(self.model)
        data = getattr(model, "model_card_data", None) or EENetModelCardData()
        updates = {"language": language, "license": license, "model_name": model_name, "base_model": finetuned_from}
        for name, value in updates.items():
            if value is not None:
                setattr(data, name, value)
        if dataset_tags is not None:
            data.dataset_id = dataset_tags if isinstance(dataset_tags, str) else dataset_tags[0]
        if tags is not None:
            extra = [tags] if isinstance(tags, str) else list(tags)
            data.tags = list(dict.fromkeys([*data.tags, *extra]))
        model.model_card_data = data
        # the repo the Trainer pushes to, named in the card without being stored in its data (as `push_to_hub` does)
        write_model_card(model, self.args.output_dir, overwrite=True, model_id=getattr(self, "hub_model_id", None))


class EarlyExitTrainer(EENetModelCardMixin, Trainer):
    r"""
    A [`~transformers.Trainer`] for the exits of an EENet model (phase 1 of the EENet workflow).

    It overrides only documented hooks:

    - [`~EarlyExitTrainer.compute_loss`]: every exit runs on every sample and the loss is
      `sum_k w_k CE_k / sum_k w_k` (with `label_smoothing_factor` if set) plus, once switched on, self-distillation
      from the last exit (see [`EarlyExitTrainingArguments`]). In evaluation the loss is the multi-exit loss alone,
      so evaluation losses stay comparable over training. Per-exit training losses are logged as `exit_{k}_loss`
      (and `distillation_loss`), averaged over the logging interval on the main process.
    - [`~EarlyExitTrainer.create_optimizer`]: two learning rates, `exit_head_learning_rate` for the exit heads and
      `learning_rate` for the rest, each with the usual weight-decay / no-decay split.

    In retrofit mode the parameters outside `exit_heads` are frozen when the trainer is built, and the frozen modules
    run in eval mode during training.

    Evaluation with labels returns the model's output fields as predictions (`logits` of the last exit, `exit_index`,
    `exit_cost`, `all_exit_logits`); [`compute_exit_accuracies`] turns them into per-exit accuracies.

    Args:
        model ([`PreTrainedModel`]):
            An EENet model (e.g. [`EENetBertForSequenceClassification`]).
        args ([`EarlyExitTrainingArguments`], *optional*):
            Plain [`~transformers.TrainingArguments`] are accepted too; the early-exit options then take their
            defaults.
        kwargs:
            The other arguments of [`~transformers.Trainer`].

    Example:

    ```python
    >>> from hf_eenet.trainer import EarlyExitTrainer, EarlyExitTrainingArguments, compute_exit_accuracies
    >>> args = EarlyExitTrainingArguments("out", learning_rate=5e-5, exit_head_learning_rate=1e-3)
    >>> trainer = EarlyExitTrainer(
    ...     model=model, args=args, train_dataset=train, eval_dataset=dev, data_collator=collator,
    ...     compute_metrics=compute_exit_accuracies,  # every exit's accuracy (eval_exit_{k}_accuracy)
    ... )
    >>> trainer.train()
    >>> trainer.evaluate()
    ```
    """

    def __init__(self, model: nn.Module | None = None, args: TrainingArguments | None = None, **kwargs):
        if args is not None and not isinstance(args, EarlyExitTrainingArguments):
            logger.info("EarlyExitTrainer got plain TrainingArguments: the early-exit options take their defaults.")
        if getattr(args, "retrofit", False) and kwargs.get("model_init") is not None:
            raise ValueError("Retrofit mode needs a `model` (it freezes it once); it does not support `model_init`.")
        super().__init__(model=model, args=args, **kwargs)
        _check_distributed_launch(self.args)
        if self.args.ddp_find_unused_parameters is None:
            # every exit runs in training, so no parameter is unused: spare DDP its search (and its warning)
            self.args.ddp_find_unused_parameters = False
        # our loss is a per-batch mean: the Trainer divides it by the gradient accumulation steps
        self.loss_is_scaled_for_ga = False
        unwrapped = self.accelerator.unwrap_model(self.model)
        config = getattr(unwrapped, "config", None)
        num_exits = getattr(config, "num_exits", None)
        if num_exits is None:
            raise ValueError(
                f"EarlyExitTrainer needs a multi-exit (EENet) model whose config has `num_exits`, got "
                f"{type(unwrapped).__name__}."
            )
        weights = self._option("exit_loss_weights")
        self.exit_loss_weights = _validated_exit_weights(
            weights if weights is not None else config.exit_loss_weights, num_exits
        )
        exit_head_parameters(unwrapped)  # fails early for a model without exit heads
        self._logged_losses: dict[str, torch.Tensor] = {}
        self._logged_steps = 0
        self._retrofit_eval_modules: list[nn.Module] | None = None
        if self._option("retrofit"):
            self._freeze_for_retrofit(unwrapped)

    def train(self, *args, **kwargs):
        """
        [`~transformers.Trainer.train`]. An exit policy stored in the model (and its `default_budget`) is dropped first,
        with a warning: it was fitted on the exits as they were, and training changes them. Fit the scheduler again
        afterwards ([`ExitSchedulerTrainer`]).
        """
        model = self.accelerator.unwrap_model(self.model)
        if getattr(model, "exit_policy", None) is not None:
            logger.warning(
                f"The model's stored {model.exit_policy.policy_type!r} exit policy was fitted on its exits before this "
                "training, which changes them: it is dropped (with `default_budget`). Fit the scheduler again."
            )
            model.set_exit_policy(None)
            model.config.default_budget = None
            if getattr(model, "model_card_data", None) is not None:
                model.model_card_data.forget_policy_results()
        self._logged_losses, self._logged_steps = {}, 0  # per-exit losses of an earlier `train()` call
        return super().train(*args, **kwargs)

    @property
    def _head_param_ids(self) -> set[int]:
        """Ids of the exit-head parameters of the current model."""
        return {id(p) for p in exit_head_parameters(self.accelerator.unwrap_model(self.model))}

    # --- options --------------------------------------------------------------------------------------------------
    def _option(self, name: str):
        return _option(self.args, name, EarlyExitTrainingArguments)

    @property
    def distillation_active(self) -> bool:
        """Whether self-distillation is part of the training loss at the current step."""
        weight = self._option("distillation_weight")
        if not weight:
            return False
        start = self._option("distillation_start")
        if start == 0:
            return True
        return self.state.max_steps > 0 and self.state.global_step >= start * self.state.max_steps

    # --- retrofit -------------------------------------------------------------------------------------------------
    def _freeze_for_retrofit(self, model: nn.Module) -> None:
        head_ids = self._head_param_ids
        if not head_ids:
            raise ValueError(
                "Retrofit mode trains only the early-exit heads, but this model has none (a single exit)."
            )
        for parameter in model.parameters():
            parameter.requires_grad_(id(parameter) in head_ids)
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info(f"Retrofit mode: {frozen:,} parameters frozen, {trained:,} exit-head parameters trained.")

    def _frozen_modules_to_eval(self, model: nn.Module) -> None:
        """In retrofit mode, run every module outside the exit heads in eval mode (dropout, batch-norm statistics)."""
        if self._retrofit_eval_modules is None:
            head_ids, modules = self._head_param_ids, []

            def visit(module: nn.Module) -> None:
                parameters = list(module.parameters())
                if parameters and all(id(p) in head_ids for p in parameters):
                    return  # an exit head (with its dropout): stays in train mode
                if not any(id(p) in head_ids for p in parameters):
                    modules.append(module)
                    return
                for child in module.children():
                    visit(child)

            for child in model.children():
                visit(child)
            self._retrofit_eval_modules = modules
        for module in self._retrofit_eval_modules:
            module.eval()

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """
        As [`~transformers.Trainer.prediction_step`], but the predictions keep every output field (the config's
        `keys_to_ignore_at_inference` trims them to the logits for a plain `Trainer`).
        """
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys or [])

    # --- loss -----------------------------------------------------------------------------------------------------
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """
        The multi-exit loss (plus self-distillation in training once it is on) of one batch.

        Args:
            model (`torch.nn.Module`): the (possibly wrapped) EENet model.
            inputs (`dict[str, torch.Tensor]`): a batch with `labels`.
            return_outputs (`bool`, *optional*, defaults to `False`): also return the model's output.
            num_items_in_batch: unused (the loss is a mean over the batch).

        Returns:
            `torch.Tensor` or `tuple[torch.Tensor, EarlyExitClassifierOutput]`.
        """
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if labels is None:
            raise ValueError("EarlyExitTrainer needs `labels` in every batch to compute the multi-exit loss.")
        if model.training and self._option("retrofit"):
            self._frozen_modules_to_eval(self.accelerator.unwrap_model(model))
        outputs = model(**inputs, output_all_exits=True, return_dict=True)
        all_exit_logits = outputs.all_exit_logits
        if all_exit_logits is None:
            raise ValueError("The model returned no `all_exit_logits`: EarlyExitTrainer needs an EENet model.")
        labels = labels.to(all_exit_logits.device)
        per_exit = self.per_exit_losses(all_exit_logits, labels)
        weights = per_exit.new_tensor(self.exit_loss_weights)
        loss = (per_exit * weights).sum() / weights.sum()
        if model.training:
            self._accumulate_for_logging({f"exit_{k}_loss": value for k, value in enumerate(per_exit)})
            if self.distillation_active:
                distillation = self.distillation_loss(all_exit_logits)
                loss = loss + self._option("distillation_weight") * distillation
                self._accumulate_for_logging({"distillation_loss": distillation})
            self._logged_steps += 1
        return (loss, outputs) if return_outputs else loss

    def per_exit_losses(self, all_exit_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """
        Cross-entropy of every exit, averaged over the batch.

        Args:
            all_exit_logits (`torch.FloatTensor` of shape `(batch_size, num_exits, num_labels)`)
            labels (`torch.LongTensor` of shape `(batch_size,)`)

        Returns:
            `torch.FloatTensor` of shape `(num_exits,)`.
        """
        batch_size, num_exits, num_labels = all_exit_logits.shape
        return (
            F.cross_entropy(
                all_exit_logits.reshape(batch_size * num_exits, num_labels).float(),
                labels.repeat_interleave(num_exits),
                reduction="none",
                label_smoothing=self.args.label_smoothing_factor,
            )
            .view(batch_size, num_exits)
            .mean(0)
        )

    def distillation_loss(self, all_exit_logits: torch.Tensor) -> torch.Tensor:
        """
        Self-distillation from the last exit into the earlier ones:
        `T^2 * sum_{k<K-1} w_k KL(softmax(z_{K-1}/T) || softmax(z_k/T)) / sum_{k<K-1} w_k`, the teacher detached.

        Args:
            all_exit_logits (`torch.FloatTensor` of shape `(batch_size, num_exits, num_labels)`)

        Returns:
            `torch.FloatTensor` of shape `()` (0 for a model with a single exit).
        """
        temperature = self._option("distillation_temperature")
        logits = all_exit_logits.float() / temperature
        teacher = F.log_softmax(logits[:, -1].detach(), dim=-1)
        students = F.log_softmax(logits[:, :-1], dim=-1)
        if students.shape[1] == 0:
            return logits.new_zeros(())
        # KL(teacher || student) per sample and exit, averaged over the batch
        kl = (teacher.exp().unsqueeze(1) * (teacher.unsqueeze(1) - students)).sum(-1).mean(0)
        weights = kl.new_tensor(self.exit_loss_weights[:-1])
        if weights.sum() <= 0:
            weights = torch.ones_like(kl)
        return temperature**2 * (kl * weights).sum() / weights.sum()

    # --- logging --------------------------------------------------------------------------------------------------
    def _accumulate_for_logging(self, values: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            value = value.detach()
            self._logged_losses[name] = self._logged_losses[name] + value if name in self._logged_losses else value

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the per-exit (and distillation) training losses averaged since the last log to training logs."""
        if "loss" in logs and self._logged_steps:
            for name, total in self._logged_losses.items():
                logs[name] = round(float(total) / self._logged_steps, 4)
            self._logged_losses, self._logged_steps = {}, 0
        super().log(logs, start_time)

    # --- optimizer ------------------------------------------------------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """
        Build the optimizer with the exit heads at `exit_head_learning_rate` and the rest at `learning_rate`, each
        split into a weight-decay and a no-decay group (frozen parameters left out). Falls back to the stock
        optimizer (one learning rate) for optimizers that build their own parameter groups.
        """
        opt_model = self.model if model is None else model
        head_lr = self._option("exit_head_learning_rate")
        if self.optimizer is not None:
            return self.optimizer
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs = dict(optimizer_kwargs)
        custom_groups = {"params", "model", "optimizer_dict"} & optimizer_kwargs.keys()
        is_optimizer_class = isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)
        if not is_optimizer_class or custom_groups or "bitsandbytes" in str(optimizer_cls):
            if head_lr is not None and head_lr != self.args.learning_rate:
                logger.warning(
                    f"The {self.args.optim} optimizer builds its own parameter groups: `exit_head_learning_rate` is "
                    "ignored and every parameter uses `learning_rate`."
                )
            return super().create_optimizer(model)
        groups = self.get_parameter_groups(opt_model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def get_parameter_groups(self, model: nn.Module) -> list[dict]:
        """
        The optimizer's parameter groups: backbone (everything outside `exit_heads`) and exit heads, each with and
        without weight decay; empty groups and frozen parameters are left out.

        Returns:
            `list[dict]`: groups with `params`, `weight_decay`, `lr` and a `name`.
        """
        decay = set(self.get_decay_parameter_names(model))
        head_lr = self._option("exit_head_learning_rate")
        head_lr = self.args.learning_rate if head_lr is None else head_lr
        head_ids = {id(p) for p in exit_head_parameters(model)}
        named: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                named.setdefault((id(parameter) in head_ids, name in decay), []).append(parameter)
        groups = []
        for is_head in (False, True):
            for decays in (True, False):
                params = named.get((is_head, decays))
                if params:
                    groups.append(
                        {
                            "params": params,
                            "weight_decay": self.args.weight_decay if decays else 0.0,
                            "lr": head_lr if is_head else self.args.learning_rate,
                            "name": ("exit_heads" if is_head else "backbone") + ("" if decays else "_no_decay"),
                        }
                    )
        if not groups:
            raise ValueError("The model has no trainable parameters.")
        return groups


# --- phase 2: the exit scheduler -------------------------------------------------------------------------------------
BUDGET_TABLE_FILE = "budget_table"  # + f"_{split}.json" (every row) and f"_{split}.md" (rendered)


def _warn_if_sorted_by_label(labels: torch.Tensor, split: str) -> None:
    """Warn that timings on `split` are unrepresentative when its labels are sorted (one or two classes per batch)."""
    if labels.unique().numel() > 1 and bool((labels[1:] >= labels[:-1]).all()):
        logger.warning(
            f"The {split} split is sorted by label, so every measured batch holds one or two classes, unlike "
            "deployment traffic: how many samples leave together at each exit, and so the measured times, then "
            "differ from mixed batches. Shuffle the split (e.g. `--shuffle_seed 0`) for representative timings."
        )


def split_file_stem(split: str) -> str:
    """
    A split name made safe for file names, keeping a row slice's two bounds apart: `train[90%:]` becomes
    `train_from_90pct_to_end` and `train[:90%]` `train_from_start_to_90pct`, so complementary slices never share a file.
    """
    sliced = re.fullmatch(r"(.*?)\[\s*([^:\]]*?)\s*:\s*([^:\]]*?)\s*\]", split)
    if sliced:
        name, start, end = sliced.groups()
        split = f"{name}_from_{start or 'start'}_to_{end or 'end'}"
    return re.sub(r"[^\w.-]+", "_", split.replace("%", "pct"))


def budget_table_path(directory: str | Path, split: str) -> Path:
    """Where the budget table of a split is saved: `budget_table_<split>.json` (and `.md` beside it)."""
    return Path(directory) / f"{BUDGET_TABLE_FILE}_{split_file_stem(split)}.json"


@dataclass
class ExitSchedulerArguments(TrainingArguments):
    r"""
    [`~transformers.TrainingArguments`] plus the options of [`ExitSchedulerTrainer`] (only the evaluation-side
    arguments of `TrainingArguments` matter: `per_device_eval_batch_size`, devices, dataloader options, `seed`,
    `output_dir`). Every field is also a command-line flag through [`~transformers.HfArgumentParser`].

    Args:
        exit_policy (`str`, *optional*, defaults to `"eenet"`):
            The policy stored in the model: `"eenet"` (ours), `"eenet-paper"`, or a baseline of the budget table
            (`"max-prob (global)"`, `"max-prob (geometric)"`, `"entropy (global)"`, `"entropy (geometric)"`).
        budgets (`list[float]`, *optional*):
            The budget grid every budget-matched policy is fitted for (ascending, in `(0, 1)`). Defaults to 0.2, 0.25,
            ..., 0.95, from the cost of the cheapest exit.
        fit_baselines (`bool`, *optional*, defaults to `True`):
            Also fit the other policies of the budget table (the baselines and the other EENet variant) so the table
            compares them; `False` fits the stored policy alone.
        default_budget (`float`, *optional*):
            Stored as `config.default_budget`: the budget of a plain `model(**inputs)` call. `None` keeps the full
            model as the default.
        policy_kwargs (`dict` or `str`, *optional*):
            Keyword arguments of the stored policy's constructor (a JSON string on the command line), e.g.
            `'{"restarts": 3}'` for EENet.
        policy_seed (`int`, *optional*):
            Seed of the policies' fitting. Defaults to `seed`.
        latency_costs_batch_size (`int`, *optional*):
            Before fitting, measure the exit costs on this device with
            [`~EarlyExitMixin.calibrate_exit_costs`] on the first calibration batch of this size and store them in the
            config (`exit_cost_source="latency"`): budgets then are fractions of the full model's wall-clock time here,
            exit heads and per-call overheads included, instead of FLOPs fractions. Use the batch size of deployment.
            `None` keeps the config's costs.
        latency_segment_costs (`bool`, *optional*, defaults to `False`):
            With `latency_costs_batch_size`: also measure the fixed cost of running each segment after exit 0 on a
            batch at all (`calibrate_exit_costs(..., segment_costs=True)`), and fit every policy for batches of
            `latency_costs_batch_size` with that cost model (see [`~hf_eenet.models.exit_cost_model.ExitCostModel`]).
            Where a segment on a few survivors costs nearly as much as on the whole batch (convolutions on CPU), this
            lets low budgets send only as many samples on as the batch can afford, instead of pricing every exit as
            if each sample paid its share of a full segment.
        latency_costs_early_exit_batches (`int`, *optional*):
            With `latency_costs_batch_size`: after a first fit, time the stored policy's real early-exit forward
            beside the full model at every fitted budget on this many calibration batches (of
            `latency_costs_batch_size` samples), refit the exit costs to those times
            ([`~hf_eenet.evaluation.exit_costs_from_measured_rows`]) and fit every policy again with them. Costs
            timed on uniform batches leave out what the early-exit forward adds on mixed batches (the policy's
            decisions, the compaction, blocks running on fewer samples), so the wall clock overshoots the budget by
            that much; these costs price it in. `None` (default) skips this step.
        latency_costs_early_exit_rounds (`int`, *optional*, defaults to 1):
            How many times to time, refit the costs and fit the policies again. A refit changes the policies' mixes of
            exits, and with them how many samples run the later blocks together; another round times the mixes the
            refitted policies produce. Without `latency_segment_costs` the costs stay per sample, while a block run on
            a few survivors costs about as much as on many, so a round whose low budgets mix exits can raise the
            cheapest exit's cost above what batches leaving there whole take (measured on the CIFAR-10 ResNet
            reference: 0.295 to 0.341 of the full model, with such batches at 0.286): one round is the default.
        timing_batches_per_turn (`int`, *optional*, defaults to 1):
            When the early-exit forward is timed beside the full model (the refit of
            `latency_costs_early_exit_batches`, and `evaluate_budgets`' measured rows), how many consecutive batches
            each configuration runs before the next one takes its turn
            ([`~hf_eenet.evaluation.measured_budget_table`]'s `batches_per_turn`). With 1 every call follows another
            configuration's; with a few, each configuration runs mostly after itself, as it does when serving.
        channels_last (`bool`, *optional*, defaults to `False`):
            Run a convolutional model (e.g. ResNet) in the channels-last memory format
            (`model.to(memory_format=torch.channels_last)`; it then takes its images channels-last too), usually
            the faster layout for convolutions on CPU and GPU, so the measured exit costs and the timed rows are those
            of that layout. A model without convolutions is refused. The saved weights do not depend on the layout.
    """

    exit_policy: str = field(
        default="eenet",
        metadata={
            "help": "Policy stored in the model: 'eenet', 'eenet-paper' or a baseline such as 'max-prob (global)'."
        },
    )
    budgets: list[float] | None = field(
        default=None,
        metadata={
            "help": "Budget grid the policies are fitted for (default: 0.2, 0.25, ..., 0.95, from the cheapest "
            "exit's cost up)."
        },
    )
    fit_baselines: bool = field(
        default=True, metadata={"help": "Also fit every baseline policy so the budget table compares them."}
    )
    default_budget: float | None = field(
        default=None, metadata={"help": "Budget of a plain `model(**inputs)` call, stored in the config."}
    )
    policy_kwargs: dict | str | None = field(
        default=None, metadata={"help": "JSON dict of keyword arguments of the stored policy's constructor."}
    )
    policy_seed: int | None = field(default=None, metadata={"help": "Seed of the policy fitting (default: `seed`)."})
    latency_costs_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Measure the exit costs on this device at this batch size before fitting (budgets become "
            "wall-clock fractions); default: keep the config's costs."
        },
    )
    latency_segment_costs: bool = field(
        default=False,
        metadata={
            "help": "With --latency_costs_batch_size: also measure each segment's fixed cost per batch and fit the "
            "policies for batches of that size with it."
        },
    )
    latency_costs_early_exit_batches: int | None = field(
        default=None,
        metadata={
            "help": "With --latency_costs_batch_size: after a first fit, time the stored policy's early-exit forward "
            "at every budget on this many calibration batches, refit the exit costs to those times and fit again."
        },
    )
    latency_costs_early_exit_rounds: int = field(
        default=1,
        metadata={
            "help": "How many times to time the early-exit forward, refit the costs and fit the policies again."
        },
    )
    timing_batches_per_turn: int = field(
        default=1,
        metadata={
            "help": "When the early-exit forward is timed beside the full model, how many consecutive batches each "
            "configuration runs before the next one takes its turn."
        },
    )
    channels_last: bool = field(
        default=False,
        metadata={
            "help": "Run a convolutional model (e.g. ResNet) in the channels-last memory format, usually the faster "
            "layout for convolutions; exit costs and timings are then those of that layout."
        },
    )

    def __post_init__(self):
        if self.timing_batches_per_turn < 1:
            raise ValueError(f"`timing_batches_per_turn` must be >= 1, got {self.timing_batches_per_turn}.")
        if self.latency_costs_early_exit_rounds < 1:
            raise ValueError(
                f"`latency_costs_early_exit_rounds` must be >= 1, got {self.latency_costs_early_exit_rounds}."
            )
        if self.latency_costs_batch_size is not None and self.latency_costs_batch_size < 1:
            raise ValueError(f"`latency_costs_batch_size` must be >= 1, got {self.latency_costs_batch_size}.")
        if self.latency_costs_early_exit_batches is not None:
            if self.latency_costs_early_exit_batches < 1:
                raise ValueError(
                    f"`latency_costs_early_exit_batches` must be >= 1, got {self.latency_costs_early_exit_batches}."
                )
            if self.latency_costs_batch_size is None:
                raise ValueError(
                    "`latency_costs_early_exit_batches` refits measured latency costs: set `latency_costs_batch_size` "
                    "(the batch size of deployment) too."
                )
        if self.latency_segment_costs and (self.latency_costs_batch_size or 0) < 2:
            raise ValueError(
                "`latency_segment_costs` measures what a segment costs on one sample against a batch: set "
                f"`latency_costs_batch_size` to the deployment batch size (>= 2), got {self.latency_costs_batch_size}."
            )
        if isinstance(self.policy_kwargs, str):
            try:
                self.policy_kwargs = json.loads(self.policy_kwargs)
            except json.JSONDecodeError as error:
                raise ValueError(f"`policy_kwargs` must be a JSON object, got {self.policy_kwargs!r}.") from error
        if self.policy_kwargs is not None and not isinstance(self.policy_kwargs, dict):
            raise ValueError(f"`policy_kwargs` must be a dict, got {self.policy_kwargs!r}.")
        if self.budgets is not None:
            budgets = [float(b) for b in self.budgets]
            if not budgets or any(not 0 < b < 1 for b in budgets) or sorted(set(budgets)) != budgets:
                raise ValueError(f"`budgets` must be strictly increasing numbers in (0, 1), got {self.budgets}.")
            self.budgets = budgets
        if self.default_budget is not None and not 0 < self.default_budget <= 1:
            raise ValueError(f"`default_budget` must lie in (0, 1], got {self.default_budget}.")
        super().__post_init__()


def _use_channels_last(model: nn.Module) -> None:
    """Move a convolutional model's weights to the channels-last memory format; refuse a model without convolutions."""
    if not any(isinstance(module, nn.Conv2d) for module in model.modules()):
        raise ValueError(
            f"`channels_last` is a memory format for convolutions, and {type(model).__name__} has none; leave it off."
        )
    model.to(memory_format=torch.channels_last)


class ExitSchedulerTrainer(EENetModelCardMixin, Trainer):
    r"""
    Phase 2 of the EENet workflow: fit the exit scheduler of a trained multi-exit model.

    [`~ExitSchedulerTrainer.fit_scheduler`] runs the model over the calibration split (`eval_dataset`) with
    Trainer's prediction loop (batching, devices, distributed gathering), caches every exit's logits and pooled
    features, fits every policy of the budget table (EENet, paper-faithful EENet, the confidence-threshold
    baselines for the budget grid; patience and static exits) on them, stores the chosen one in the model
    (`model.set_exit_policy`, so `save_model` / `save_pretrained` keep it), logs the budget table, writes it to
    `output_dir` (`budget_table_{split}.json` / `.md`, the fitted policies in `exit_policies.*`) and returns it. The
    backbone and the exits are not touched: only the policy's tensors are new.

    [`~ExitSchedulerTrainer.evaluate_budgets`] then reports a split (test): simulated rows for every fitted policy
    and the oracle, and measured rows from the real early-exit forward, timed side by side with the full model.

    `train()` is `fit_scheduler()` (there is no gradient training in this phase).

    Args:
        model ([`PreTrainedModel`]): an EENet model with trained exits.
        args ([`ExitSchedulerArguments`], *optional*): plain `TrainingArguments` are accepted too (the scheduler
            options then take their defaults).
        policies (`Mapping[str, ExitPolicy]`, *optional*): the policies to fit (or already fitted ones to evaluate),
            by display name. Defaults to `hf_eenet.evaluation.standard_policies`.
        kwargs: the other arguments of [`~transformers.Trainer`] (`eval_dataset` is the calibration split).

    Example:

    ```python
    >>> from hf_eenet.trainer import ExitSchedulerArguments, ExitSchedulerTrainer
    >>> args = ExitSchedulerArguments("out", per_device_eval_batch_size=64)
    >>> trainer = ExitSchedulerTrainer(model=model, args=args, eval_dataset=dev, data_collator=collator)
    >>> table = trainer.fit_scheduler()
    >>> trainer.save_model()
    >>> model(**inputs, budget=0.5)
    ```
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: TrainingArguments | None = None,
        policies: Mapping[str, ExitPolicy] | None = None,
        **kwargs,
    ):
        if kwargs.get("train_dataset") is not None:
            raise ValueError(
                "ExitSchedulerTrainer fits the scheduler on the calibration split: pass it as `eval_dataset` (a "
                "held-out labelled split that looks like deployment data, not the training split)."
            )
        calibration = kwargs.get("eval_dataset")
        if isinstance(calibration, Mapping):  # `Trainer`'s named evaluation sets: the scheduler is fitted on one
            if len(calibration) != 1:
                raise ValueError(
                    f"ExitSchedulerTrainer fits the scheduler on one calibration split, but `eval_dataset` names "
                    f"{len(calibration)}: {sorted(map(str, calibration))}. Pass that split itself (or a dict of one)."
                )
            kwargs["eval_dataset"] = next(iter(calibration.values()))
        if args is not None:
            refuse_full_eval_casts(args, "the model would be fitted, measured and saved with its weights rounded")
            if args.dataloader_drop_last:
                raise ValueError(
                    "`dataloader_drop_last=True` would leave the last calibration (and test) samples out of the cached "
                    "exit outputs, so the policies would be fitted, and simulated rows computed, on fewer samples than "
                    "the measured rows; set it to False."
                )
            if not args.eval_do_concat_batches:
                raise ValueError(
                    "`eval_do_concat_batches=False` would keep the cached exit outputs as separate batches; fitting "
                    "and simulating need them concatenated: set it to True."
                )
        super().__init__(model=model, args=args, **kwargs)
        _check_distributed_launch(self.args)
        unwrapped = self.accelerator.unwrap_model(self.model)
        config = getattr(unwrapped, "config", None)
        if getattr(config, "num_exits", None) is None or not hasattr(unwrapped, "set_exit_policy"):
            raise ValueError(f"ExitSchedulerTrainer needs a multi-exit (EENet) model, got {type(unwrapped).__name__}.")
        self.num_exits = config.num_exits
        if self._option("channels_last"):
            _use_channels_last(unwrapped)
        name = self._option("exit_policy")
        self.policies: dict[str, ExitPolicy] = dict(policies) if policies is not None else self._standard_policies()
        if name not in self.policies:
            raise ValueError(f"`exit_policy` {name!r} is not among the policies: {list(self.policies)}.")
        stored = self.policies[name]
        if not (stored.persistable and stored.requires_budget):
            raise ValueError(f"`exit_policy` must name a budget-matched policy, got {name!r}.")
        if policies is None:
            self.policies[name] = self._with_policy_kwargs(name, stored)
            if not self._option("fit_baselines"):
                self.policies = {name: self.policies[name]}
        for policy_name, policy in self.policies.items():
            if policy.num_exits != self.num_exits:
                raise ValueError(
                    f"Policy {policy_name!r} has {policy.num_exits} exits but the model has {self.num_exits}."
                )
        self.budget_table: list[dict] | None = None
        self.early_exit_cost_timings: list[dict] = []

    def _option(self, name: str):
        return _option(self.args, name, ExitSchedulerArguments)

    def _shows_progress(self) -> bool:
        """Progress bars for the scheduler's own long work, as Trainer shows them (`disable_tqdm`, main process)."""
        return not self.args.disable_tqdm and self.is_local_process_zero()

    def _standard_policies(self) -> dict[str, ExitPolicy]:
        from .evaluation import standard_policies

        seed = self._option("policy_seed")
        seed = self.args.seed if seed is None else seed
        return standard_policies(self.num_exits, eenet_kwargs={"seed": seed}, eenet_paper_kwargs={"seed": seed})

    def _with_policy_kwargs(self, name: str, policy: ExitPolicy) -> ExitPolicy:
        """The stored policy rebuilt with `policy_kwargs` on top of its hyperparameters."""
        kwargs = self._option("policy_kwargs")
        if not kwargs:
            return policy
        try:
            return type(policy)(self.num_exits, **{**policy.hyperparameters(), **kwargs})
        except TypeError as error:
            raise ValueError(f"`policy_kwargs` {kwargs} do not fit the {name!r} policy: {error}") from error

    # --- caching the calibration outputs with the prediction loop ------------------------------------------------
    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[None, tuple[torch.Tensor, ...], torch.Tensor | None]:
        """
        All exits of one batch: returns `(None, (all_exit_logits, *exit_features), labels)`, the logits of shape
        `(batch, num_exits, num_labels)` and one `(batch, d_k)` pooled-feature tensor per exit (float32).
        """
        inputs = dict(self._prepare_inputs(inputs))
        labels = inputs.pop("labels", None)
        with torch.no_grad():
            outputs = model(**inputs, output_all_exits=True, output_exit_features=True, return_dict=True)
        features = tuple(f.float() for f in outputs.all_exit_features)
        return None, (outputs.all_exit_logits.float(), *features), labels

    def cache_exit_outputs(self, dataset=None, description: str = "Caching exit outputs") -> dict:
        """
        Run the model over `dataset` (default: `eval_dataset`) with the prediction loop and return the cached exit
        outputs as CPU tensors: `exit_logits` `(N, K, C)`, `labels` `(N,)` (or `None`) and `exit_features` (`K`
        tensors `(N, d_k)`). Under DDP every process gets the whole gathered split.
        """
        dataset = dataset if dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("ExitSchedulerTrainer needs a calibration split: pass `eval_dataset`.")
        if hasattr(dataset, "__len__") and len(dataset) == 0:
            raise ValueError("The calibration split is empty.")
        output = self.evaluation_loop(
            self.get_eval_dataloader(dataset), description=description, prediction_loss_only=False
        )
        predictions = output.predictions
        if not isinstance(predictions, (tuple, list)) or len(predictions) != self.num_exits + 1:
            raise ValueError("The prediction loop returned no per-exit logits and features.")
        labels = output.label_ids
        return {
            "exit_logits": torch.as_tensor(predictions[0]),
            "labels": None if labels is None else torch.as_tensor(labels).long(),
            "exit_features": [torch.as_tensor(f) for f in predictions[1:]],
        }

    # --- fitting --------------------------------------------------------------------------------------------------
    def fit_scheduler(self, calibration_dataset=None, split: str = "calibration") -> list[dict]:
        """
        Fit every policy on the calibration split, store the chosen one in the model, and log, save and return the
        simulated budget table of the calibration split. With `latency_costs_batch_size`, the exit costs are first
        measured on this device; with `latency_costs_early_exit_batches` too, they are then refitted to the timed
        early-exit forward of the stored policy ([`~ExitSchedulerTrainer.refit_exit_costs_on_early_exit_path`]) and
        every policy is fitted again for them.

        Args:
            calibration_dataset (`datasets.Dataset`, *optional*): overrides `eval_dataset`.
            split (`str`, *optional*, defaults to `"calibration"`): the split's name in the model card (e.g. `"dev"`).

        Returns:
            `list[dict]`: the budget-table rows (see `hf_eenet.evaluation.simulated_budget_table`).
        """
        from .evaluation import describe_choices, fit_policies, format_choices, save_policies, simulated_budget_table
        from .models.exit_policies import default_budget_grid

        model = self.accelerator.unwrap_model(self.model)
        cached = self.cache_exit_outputs(calibration_dataset, description="Caching calibration exit outputs")
        if cached["labels"] is None:
            raise ValueError(
                "Fitting the exit scheduler needs labels in the calibration split: a `label` (or `labels`) column of "
                "class ids (the scripts rename and encode the `--label_column` for you)."
            )
        labels, num_labels = cached["labels"], cached["exit_logits"].shape[-1]
        if labels.min() < 0 or labels.max() >= num_labels:
            raise ValueError(
                f"Calibration labels must be class ids in [0, {num_labels - 1}], found {labels.min()}..{labels.max()} "
                "(an unlabelled split such as GLUE's test uses -1)."
            )
        self.early_exit_cost_timings = []
        if self._option("latency_costs_batch_size") is not None:
            _warn_if_sorted_by_label(labels, split)
            self.measure_exit_costs(calibration_dataset)
        name = self._option("exit_policy")

        def fit():
            exit_costs = model.exit_cost_model()
            budgets = self._option("budgets") or default_budget_grid(exit_costs)
            if min(budgets) < exit_costs.cheapest - BUDGET_TOLERANCE:
                raise ValueError(
                    f"The smallest budget {min(budgets)} is below the cost of the cheapest exit "
                    f"({exit_costs.cheapest:.4f})."
                )
            logger.info(f"Fitting {len(self.policies)} exit policies for budgets {budgets} on {len(labels)} samples.")
            fit_policies(
                self.policies, **cached, exit_costs=exit_costs, budgets=budgets, progress=self._shows_progress()
            )
            model.set_exit_policy(self.policies[name])

        fit()
        if self._option("latency_costs_early_exit_batches") is not None:
            grid = list(model.exit_policy.budgets)
            for _ in range(self._option("latency_costs_early_exit_rounds")):
                self.refit_exit_costs_on_early_exit_path(calibration_dataset)
                fit()
            dropped = [budget for budget in grid if budget not in model.exit_policy.budgets]
            if dropped:
                logger.warning(
                    f"Budgets {dropped} are below the cheapest exit once its cost is measured on the early-exit path "
                    f"({model.config.exit_costs[0]:.4f} of the full model's time): the policies are fitted without "
                    "them, and a call with such a budget is refused."
                )
        exit_costs = model.exit_cost_model()
        default_budget = self._option("default_budget")
        if default_budget is not None:
            smallest = model.exit_policy.budgets[0]
            if default_budget < 1 and default_budget < smallest - BUDGET_TOLERANCE:
                raise ValueError(
                    f"`default_budget` {default_budget} is below the smallest fitted budget {smallest} (the cheapest "
                    f"exit costs {exit_costs.cheapest:.4f}): a plain call would be refused. Use a budget of at least "
                    f"{smallest}."
                )
            model.config.default_budget = default_budget
        rows = simulated_budget_table(self.policies, **cached, exit_costs=exit_costs)
        self.budget_table = rows
        if getattr(model, "model_card_data", None) is not None:
            model.model_card_data.forget_policy_results()  # the tables of an earlier fit describe another policy
        self._record_card_table(model, "simulated", split, rows)
        model.model_card_data.calibration_split = split
        choices = {f"{budget:g}": text for budget, text in describe_choices(self.policies[name]).items()}
        model.model_card_data.policy_choices = choices
        if choices:
            logger.info(f"The {name} policy's choice per budget: " + format_choices(choices))
        accuracies = compute_exit_accuracies(EvalPrediction(cached["exit_logits"].numpy(), cached["labels"].numpy()))
        metrics = {f"calibration_{key}": value for key, value in accuracies.items()}
        for row in rows:
            if row["policy"] == name:
                metrics[f"calibration_accuracy_at_budget_{row['budget']:g}"] = row["accuracy"]
                metrics[f"calibration_cost_at_budget_{row['budget']:g}"] = row["cost"]
        self.log(metrics)
        if self.is_world_process_zero():
            self.save_budget_table(rows, split)
            save_policies(self.policies, self.args.output_dir)
        return rows

    def train(self, *args, **kwargs):
        """Same as [`~ExitSchedulerTrainer.fit_scheduler`] (this phase trains no weights); returns a `TrainOutput`."""
        from transformers.trainer_utils import TrainOutput

        if args or any(v is not None for v in kwargs.values()):
            raise ValueError("ExitSchedulerTrainer.train() takes no arguments; it calls `fit_scheduler()`.")
        rows = self.fit_scheduler()
        return TrainOutput(global_step=0, training_loss=0.0, metrics={"budget_table_rows": len(rows)})

    # --- reporting ------------------------------------------------------------------------------------------------
    def evaluate_budgets(
        self,
        dataset,
        split: str = "test",
        measured: bool = True,
        measured_policies: Sequence[str] | None = None,
        measured_budgets: Sequence[float] | None = None,
        num_warmup_batches: int = 1,
        tracked_policies: Sequence[str] = (),
        batches_per_turn: int | None = None,
    ) -> list[dict]:
        """
        The budget table of a labelled split: simulated rows for every fitted policy and the oracle, and (with
        `measured=True`) measured rows of the real early-exit forward beside the full model, timed in one run on the
        main process. Saved as `budget_table_{split}.json` / `.md` in `output_dir` and recorded for the model card.

        Args:
            dataset (`datasets.Dataset`): the split, processed like the calibration split.
            split (`str`, *optional*, defaults to `"test"`): its name in files, logs and the model card.
            measured (`bool`, *optional*, defaults to `True`): also time the real forward.
            measured_policies (`Sequence[str]`, *optional*): policies to measure (default: the stored one; pass
                every name of `policies` to measure all of them).
            measured_budgets (`Sequence[float]`, *optional*): budgets to measure (default: the fitted grid).
            num_warmup_batches (`int`, *optional*, defaults to 1): leading batches run through every measured
                configuration, untimed, before the timed pass (see `hf_eenet.evaluation.measured_budget_table`).
            tracked_policies (`Sequence[str]`, *optional*): measured policies whose budgets are also served with a
                [`BudgetTracker`] over the split in order (rows `"<name> (budget tracked)"`).
            batches_per_turn (`int`, *optional*): consecutive batches each measured configuration runs per turn
                (default: `timing_batches_per_turn`).

        Returns:
            `list[dict]`: simulated rows, then measured rows.
        """
        from .evaluation import (
            check_measured_budgets,
            check_tracked_policies,
            measured_budget_table,
            simulated_budget_table,
        )

        model = self.accelerator.unwrap_model(self.model)
        if any(policy.requires_budget and not policy.is_fitted for policy in self.policies.values()):
            raise ValueError("Fit the scheduler first (`fit_scheduler`) or pass fitted `policies`.")
        names = list(measured_policies) if measured_policies is not None else [self._option("exit_policy")]
        unknown = [n for n in names if n not in self.policies]
        if measured and unknown:
            raise ValueError(f"Unknown policies to measure {unknown}; fitted policies: {list(self.policies)}.")
        tracked_policies = check_tracked_policies(tracked_policies, names if measured else [])
        if measured:  # before the split is run: a budget the model cannot serve fails now, not after the tables
            check_measured_budgets(model, {n: self.policies[n] for n in names}, measured_budgets)
        cached = self.cache_exit_outputs(dataset, description=f"Caching {split} exit outputs")
        if cached["labels"] is None:
            raise ValueError(f"Evaluating budgets needs labels in the {split} split.")
        simulated = simulated_budget_table(self.policies, **cached, exit_costs=model.exit_cost_model())
        rows = simulated
        if measured and self.is_world_process_zero():
            _warn_if_sorted_by_label(cached["labels"], split)
            self._warn_if_timed_beside_other_processes(f"The measured rows of the {split} split")
            device = model.device
            policies = {n: self.policies[n].to(device) for n in names}
            batches = list(self._plain_dataloader(dataset))
            measured_rows = measured_budget_table(
                model,
                batches,
                policies,
                budgets=measured_budgets,
                num_warmup_batches=num_warmup_batches,
                tracked_policies=tracked_policies,
                batches_per_turn=(
                    self._option("timing_batches_per_turn") if batches_per_turn is None else batches_per_turn
                ),
                progress=self._shows_progress(),
            )
            rows = rows + measured_rows
        self._record_card_table(model, "simulated", split, simulated)
        if len(rows) > len(simulated):
            self._record_card_table(model, "measured", split, rows[len(simulated) :])
        if self.is_world_process_zero():
            self.save_budget_table(rows, split)
        return rows

    def _warn_if_timed_beside_other_processes(self, what: str) -> None:
        """Timings on the CPU under several processes are not those of one process serving alone: say so."""
        if self.args.world_size > 1 and self.accelerator.unwrap_model(self.model).device.type == "cpu":
            logger.warning(
                f"{what} are timed in the main process while {self.args.world_size} processes share this machine's "
                f"CPU (torch uses {torch.get_num_threads()} thread(s) per process here, e.g. 1 under torchrun): the "
                "times are not those of one process serving alone. Measure in a single process for deployment costs."
            )

    def measure_exit_costs(self, dataset=None) -> list[float]:
        """
        Set the model's exit costs to latencies measured on this device ([`~EarlyExitMixin.calibrate_exit_costs`])
        on the first batch of `latency_costs_batch_size` samples of `dataset` (default: `eval_dataset`), with the
        fixed segment costs too under `latency_segment_costs`. Under DDP the main process measures and every process
        takes its costs. Returns the new (per-sample) exit costs.
        """
        model = self.accelerator.unwrap_model(self.model)
        dataset = dataset if dataset is not None else self.eval_dataset

        def measure():
            self._warn_if_timed_beside_other_processes("The exit costs")
            batch_size = self._option("latency_costs_batch_size")
            batch = next(iter(self._plain_dataloader(dataset, batch_size)))
            inputs = {name: value for name, value in batch.items() if name not in ("labels", "label")}
            size = len(next(iter(inputs.values())))
            if batch_size is not None and size < batch_size:
                logger.warning(
                    f"The calibration split has {size} samples, fewer than `latency_costs_batch_size` {batch_size}: the "
                    f"exit costs are timed, and stored, for batches of {size}."
                )
            previous = model.config.exit_costs
            costs = model.calibrate_exit_costs(inputs, segment_costs=self._option("latency_segment_costs"))
            segments = model.config.exit_segment_costs
            fixed = f" and fixed segment costs {[round(c, 4) for c in segments]}" if segments is not None else ""
            logger.info(f"Measured exit costs {[round(c, 4) for c in costs]}{fixed} (were {previous}).")
            return model.exit_cost_model().to_dict()

        return self._set_latency_costs(self._on_main_process(measure))

    def _set_latency_costs(self, cost_model: dict) -> list[float]:
        """Store a measured cost model (`ExitCostModel.to_dict()`) in the config; returns its exit costs."""
        model = self.accelerator.unwrap_model(self.model)
        model.config.set_exit_costs(
            cost_model["exit_costs"],
            source="latency",
            segment_costs=cost_model["exit_segment_costs"],
            batch_size=cost_model["exit_cost_batch_size"],
        )
        return model.config.exit_costs

    def refit_exit_costs_on_early_exit_path(
        self, dataset=None, num_batches: int | None = None, batch_size: int | None = None
    ) -> list[float]:
        """
        Time the stored policy's real early-exit forward beside the full model at every fitted budget on the first
        batches of `dataset`, and set the model's exit costs to those that explain the times
        ([`~hf_eenet.evaluation.exit_costs_from_measured_rows`]). The policies must then be fitted again for the new
        costs (`fit_scheduler` does). Under DDP the main process measures and every process takes its costs.

        Every timed batch first runs through every configuration untimed, so the costs are those of the steady state
        of long-running traffic: a first pass over new survivor counts runs slower (kernels and their plans are built
        for each new input shape, on the CPU as on a GPU).

        Args:
            dataset (`datasets.Dataset`, *optional*): the calibration split (default: `eval_dataset`).
            num_batches (`int`, *optional*): how many batches to time (default: `latency_costs_early_exit_batches`).
            batch_size (`int`, *optional*): their size, that of deployment (default: `latency_costs_batch_size`, else
                `per_device_eval_batch_size`).

        Returns:
            `list[float]`: the new costs. On the main process, `early_exit_cost_timings` gets what they came from:
            the previous costs, the new ones and the measured rows (one entry per call, cleared by `fit_scheduler`).
        """
        from .evaluation import exit_costs_from_measured_rows, measured_budget_table

        model = self.accelerator.unwrap_model(self.model)
        if model.exit_policy is None or not model.exit_policy.requires_budget:
            raise ValueError("Refitting the exit costs on the early-exit path needs a stored, budget-matched policy.")
        num_batches = num_batches if num_batches is not None else self._option("latency_costs_early_exit_batches")
        if num_batches is None or num_batches < 1:
            raise ValueError(
                f"Pass `num_batches` >= 1 (or set `latency_costs_early_exit_batches`), got {num_batches}: the number "
                "of calibration batches to time."
            )
        batch_size = batch_size if batch_size is not None else self._option("latency_costs_batch_size")
        dataset = dataset if dataset is not None else self.eval_dataset
        budgets = self._option("budgets")

        def measure():
            batches = []
            for batch in self._plain_dataloader(dataset, batch_size):
                batches.append({key: value for key, value in batch.items() if key != "label"})
                if len(batches) == num_batches:
                    break
            if len(batches) < num_batches:
                logger.warning(
                    f"The calibration split holds {len(batches)} batch(es) of {batch_size or 'the evaluation batch size'}"
                    f", fewer than the {num_batches} asked (`latency_costs_early_exit_batches`): timing those."
                )
            rows = measured_budget_table(
                model,
                batches,
                {"stored": model.exit_policy},
                num_warmup_batches=len(batches),
                batches_per_turn=self._option("timing_batches_per_turn"),
                progress=self._shows_progress(),
            )
            previous = model.config.exit_costs
            costs = exit_costs_from_measured_rows(rows, model.exit_cost_model())
            if budgets and min(budgets) < costs[0] - BUDGET_TOLERANCE:
                raise ValueError(
                    f"Refitted on the early-exit path, the cheapest exit costs {costs[0]:.4f} of the full model's time "
                    f"(was {previous[0]:.4f}), above the smallest of `budgets` {budgets}: this device cannot meet "
                    "that budget on the clock. Drop the budgets below it, or leave out "
                    "`latency_costs_early_exit_batches`."
                )
            fractions = {row["budget"]: 1 / row["speedup"] for row in rows if row["policy"] != "full model"}
            slower = [budget for budget, fraction in fractions.items() if fraction >= 1.0]
            if slower:
                logger.warning(
                    f"At budgets {slower} the early-exit forward took as long as the full model or longer: the blocks "
                    "between exits are too cheap for early exits to save time on this device at this batch size, or "
                    "the machine was busy while timing."
                )
            self.early_exit_cost_timings.append({"previous_costs": previous, "costs": costs, "rows": rows})
            logger.info(
                f"Wall-clock fractions of the early-exit forward at each budget "
                f"({', '.join(f'{b:g}: {f:.3f}' for b, f in fractions.items())}); exit costs refitted to them: "
                f"{[round(c, 4) for c in costs]} (were {[round(c, 4) for c in previous]})."
            )
            return {**model.exit_cost_model().to_dict(), "exit_costs": costs}

        return self._set_latency_costs(self._on_main_process(measure))

    def _on_main_process(self, measure):
        """
        `measure()` on the main process alone, its result broadcast to every process. An error there is raised on every
        process (the others would otherwise wait for the broadcast until the timeout).
        """
        from accelerate.utils import broadcast_object_list

        payload, failure = [None, None], None
        if self.is_world_process_zero():
            try:
                payload = [measure(), None]
            except Exception as error:
                if self.args.world_size == 1:
                    raise
                payload, failure = [None, f"{type(error).__name__}: {error}"], error
        if self.args.world_size > 1:
            payload = broadcast_object_list(payload)
        if payload[1] is not None:
            if failure is not None:
                raise failure
            raise RuntimeError(f"Measuring on the main process failed: {payload[1]}")
        return payload[0]

    def _plain_dataloader(self, dataset, batch_size: int | None = None):
        """The split in evaluation batches on this process alone (timing must not depend on other processes)."""
        from torch.utils.data import DataLoader

        dataset = self._remove_unused_columns(dataset, description="measurement")
        return DataLoader(
            dataset,
            batch_size=batch_size or self.args.per_device_eval_batch_size,
            collate_fn=self.data_collator,
            shuffle=False,
        )

    def save_budget_table(self, rows: Sequence[Mapping], split: str) -> Path:
        """Write `rows` to `output_dir` as `budget_table_{split}.json` and a markdown rendering; returns the json."""
        from .evaluation import format_budget_table

        path = budget_table_path(self.args.output_dir, split)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"split": split, "rows": list(rows)}, indent=2) + "\n")
        path.with_suffix(".md").write_text(format_budget_table(rows) + "\n")
        logger.info(
            f"Budget table on {split} (every policy), saved to {path}:\n{format_budget_table(rows, format='text')}"
        )
        return path

    def _record_card_table(self, model, kind: str, split: str, rows: Sequence[Mapping]) -> None:
        """Keep the stored policy's rows (and the full model's, and the stored policy's budget-tracked ones) for the card."""
        from .evaluation import TRACKED_SUFFIX
        from .model_card import EENetModelCardData

        stored = (model.config.exit_policy or {}).get("policy_type")
        name = self._option("exit_policy")
        card_names = {
            name: stored,
            f"{name} {TRACKED_SUFFIX}": f"{stored} {TRACKED_SUFFIX}",
            "full model": "full model",
        }
        card_rows = []
        for row in rows:
            if row["policy"] in card_names:
                card_row = {
                    "policy": card_names[row["policy"]],
                    "budget": 1.0 if row["budget"] is None else row["budget"],
                    "accuracy": row["accuracy"],
                    "cost": row["cost"],
                }
                if kind == "measured":
                    card_row["ms_per_sample"] = round(1000 * row["seconds_per_sample"], 3)
                card_rows.append(card_row)
        data = model.model_card_data = getattr(model, "model_card_data", None) or EENetModelCardData()
        if card_rows:
            data.add_budget_table(kind, split, card_rows)
