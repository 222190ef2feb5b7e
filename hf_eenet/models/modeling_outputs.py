"""Output types of the multi-exit models."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

__all__ = ["EarlyExitClassifierOutput"]


@dataclass
class EarlyExitClassifierOutput(ModelOutput):
    r"""
    Output of every EENet classifier, whichever way it ran (all exits, early exit under a budget, or the plain full
    model).

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is provided):
            Multi-exit loss `sum_k w_k CE_k / sum_k w_k` with the weights of `config.exit_loss_weights`.
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
            Logits of the exit each sample took (the last exit when all exits are computed).
        exit_index (`torch.LongTensor` of shape `(batch_size,)`):
            Index (0-based, into `config.exit_layers`) of the exit each sample took.
        exit_cost (`torch.FloatTensor` of shape `(batch_size,)`):
            Relative cost each sample paid (`config.exit_costs` of its exit plus, with `config.exit_segment_costs`,
            an equal share of the fixed cost of each segment it ran among the samples of the batch that ran it; 1.0
            for the plain full model; the cost of the last exit when all exits are computed).
        all_exit_logits (`torch.FloatTensor` of shape `(batch_size, num_exits, num_labels)`, *optional*):
            Logits of every exit, returned when all exits are computed (training, `labels` given,
            `output_all_exits=True` or `output_exit_features=True`).
        all_exit_features (`tuple[torch.FloatTensor]`, *optional*):
            One tensor of shape `(batch_size, feature_size_k)` per exit: the pooled representation each exit head
            received. Returned with `output_exit_features=True` (which computes all exits).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    exit_index: torch.LongTensor | None = None
    exit_cost: torch.FloatTensor | None = None
    all_exit_logits: torch.FloatTensor | None = None
    all_exit_features: tuple[torch.FloatTensor, ...] | None = None
