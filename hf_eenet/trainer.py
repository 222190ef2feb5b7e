"""Trainers of the multi-exit (EENet) models.

[`EarlyExitTrainer`] is phase 1 of the EENet workflow: it trains the exits of any EENet model (BERT, ViT, ResNet)
with the multi-exit loss, a separate learning rate for the exit heads, optional self-distillation from the last exit
and a *retrofit* mode that trains only the exit heads of an already fine-tuned model. It relies only on what every
EENet model shares: `all_exit_logits` in the output of an all-exits forward and the `exit_heads` module list.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.utils import logging

__all__ = [
    "EENetModelCardMixin",
    "EarlyExitTrainer",
    "EarlyExitTrainingArguments",
    "compute_exit_accuracies",
    "exit_head_parameters",
]

logger = logging.get_logger(__name__)

EXIT_HEADS_ATTRIBUTE = "exit_heads"


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
            logits `z_{K-1}` are detached (the last exit teaches, it is not pulled towards the earlier ones).
            0 turns self-distillation off.
        distillation_temperature (`float`, *optional*, defaults to 2.0):
            Softmax temperature `T` of self-distillation.
        distillation_start (`float`, *optional*, defaults to 0.5):
            Fraction of the training steps after which self-distillation switches on (0 = from the first step), so
            that the last exit is a useful teacher by then.
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
        if not 0.0 <= self.distillation_start <= 1.0:
            raise ValueError(f"`distillation_start` must lie in [0, 1], got {self.distillation_start}.")
        if self.exit_loss_weights is not None:
            self.exit_loss_weights = _validated_exit_weights(self.exit_loss_weights)
        super().__post_init__()


# Defaults of the early-exit options, used when an `EarlyExitTrainer` is given plain `TrainingArguments`.
_EARLY_EXIT_DEFAULTS = {
    "exit_head_learning_rate": 1e-3,
    "exit_loss_weights": None,
    "distillation_weight": 0.0,
    "distillation_temperature": 2.0,
    "distillation_start": 0.5,
    "retrofit": False,
}


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
        data.model_id = data.model_id or getattr(self, "hub_model_id", None)
        model.model_card_data = data
        write_model_card(model, self.args.output_dir, overwrite=True)


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
    >>> from hf_eenet.trainer import EarlyExitTrainer, EarlyExitTrainingArguments
    >>> args = EarlyExitTrainingArguments("out", learning_rate=5e-5, exit_head_learning_rate=1e-3)
    >>> trainer = EarlyExitTrainer(model=model, args=args, train_dataset=train, data_collator=collator)
    >>> trainer.train()
    ```
    """

    def __init__(self, model: nn.Module | None = None, args: TrainingArguments | None = None, **kwargs):
        if args is not None and not isinstance(args, EarlyExitTrainingArguments):
            logger.info("EarlyExitTrainer got plain TrainingArguments: the early-exit options take their defaults.")
        if getattr(args, "retrofit", False) and kwargs.get("model_init") is not None:
            raise ValueError("Retrofit mode needs a `model` (it freezes it once); it does not support `model_init`.")
        super().__init__(model=model, args=args, **kwargs)
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

    @property
    def _head_param_ids(self) -> set[int]:
        """Ids of the exit-head parameters of the current model."""
        return {id(p) for p in exit_head_parameters(self.accelerator.unwrap_model(self.model))}

    # --- options --------------------------------------------------------------------------------------------------
    def _option(self, name: str):
        return getattr(self.args, name, _EARLY_EXIT_DEFAULTS[name])

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
