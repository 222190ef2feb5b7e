"""Configurations of the multi-exit (EENet) models.

Every EENet configuration subclasses the configuration of its backbone (so a stock checkpoint's `config.json` loads
into it unchanged) and adds the same early-exit fields through [`EENetConfigMixin`].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from transformers import BertConfig

__all__ = ["EENET_CONFIG_FORMAT", "EENET_VERSION", "EENetConfigMixin", "EENetBertConfig"]

# Version of the package, stamped into every saved config. Kept here (not in `hf_eenet/__init__.py`) so the
# `models/` folder stays importable on its own as Hub remote code.
EENET_VERSION = "0.1.0"
# Version of the early-exit fields' layout. A config written with a newer layout cannot be read safely.
EENET_CONFIG_FORMAT = 1

EXIT_COST_SOURCES = ("flops", "latency")


class EENetConfigMixin:
    r"""
    Early-exit fields shared by every EENet configuration.

    Args:
        exit_layers (`list[int]`, *optional*):
            After how many backbone blocks each exit sits, strictly increasing; the last entry must be the number of
            blocks (the last exit is the backbone's own classifier). Defaults to an exit after every block.
        exit_loss_weights (`list[float]`, *optional*):
            Weight `w_k` of each exit in the multi-exit loss `sum_k w_k CE_k / sum_k w_k`. Defaults to `k + 1`
            (deeper exits weigh more, as in EENet).
        exit_costs (`list[float]`, *optional*):
            Cumulative relative cost of reaching each exit on the early-exit path (all blocks up to the exit plus every
            exit head evaluated on the way), where the plain backbone without exit heads costs 1.0. Computed from
            FLOPs when not given.
        exit_cost_source (`str`, *optional*, defaults to `"flops"`):
            Where `exit_costs` come from: `"flops"` (analytic) or `"latency"` (measured by
            `model.calibrate_exit_costs`).
        default_budget (`float`, *optional*):
            Budget used when `forward` is called without one. `None` runs the full model.
        exit_policy (`dict`, *optional*):
            Type, budget grid and hyperparameters of the fitted exit policy; its tensors live in the model weights.
            `None` when no policy has been fitted.
        hf_eenet_version (`str`, *optional*):
            Version of `hf_eenet` that wrote the config (informational; always re-stamped with the running version).
        eenet_format_version (`int`, *optional*):
            Layout version of the early-exit fields. Configs written by a newer, incompatible layout are refused.
    """

    def _init_early_exit_fields(
        self,
        *,
        num_blocks: int,
        exit_layers: Sequence[int] | None,
        exit_loss_weights: Sequence[float] | None,
        exit_costs: Sequence[float] | None,
        exit_cost_source: str,
        default_budget: float | None,
        exit_policy: dict | None,
        eenet_format_version: int | None,
    ) -> None:
        if eenet_format_version is not None and int(eenet_format_version) > EENET_CONFIG_FORMAT:
            raise ValueError(
                f"This config was written with early-exit config format {eenet_format_version}, but hf_eenet "
                f"{EENET_VERSION} reads formats up to {EENET_CONFIG_FORMAT}. Upgrade hf_eenet to load it."
            )
        self.eenet_format_version = EENET_CONFIG_FORMAT
        self.hf_eenet_version = EENET_VERSION

        exit_layers = list(range(1, num_blocks + 1)) if exit_layers is None else [int(x) for x in exit_layers]
        if not exit_layers or exit_layers[-1] != num_blocks:
            raise ValueError(
                f"`exit_layers` must end with the number of backbone blocks ({num_blocks}) so that the last exit is "
                f"the backbone's own classifier, got {exit_layers}."
            )
        if any(b <= a for a, b in zip(exit_layers, exit_layers[1:])) or exit_layers[0] < 1:
            raise ValueError(
                f"`exit_layers` must be strictly increasing integers in [1, {num_blocks}], got {exit_layers}."
            )
        self.exit_layers = exit_layers
        num_exits = len(exit_layers)

        if exit_loss_weights is None:
            exit_loss_weights = [float(k + 1) for k in range(num_exits)]
        exit_loss_weights = [float(w) for w in exit_loss_weights]
        if (
            len(exit_loss_weights) != num_exits
            or any(not w >= 0 for w in exit_loss_weights)
            or sum(exit_loss_weights) <= 0
        ):
            raise ValueError(
                f"`exit_loss_weights` must hold {num_exits} non-negative numbers with a positive sum (one per exit), "
                f"got {exit_loss_weights}."
            )
        self.exit_loss_weights = exit_loss_weights

        if exit_cost_source not in EXIT_COST_SOURCES:
            raise ValueError(f"`exit_cost_source` must be one of {EXIT_COST_SOURCES}, got {exit_cost_source!r}.")
        self.exit_cost_source = exit_cost_source
        if exit_costs is None:
            exit_costs = self.flops_exit_costs()
            self.exit_cost_source = "flops"
        self.exit_costs = self._validated_exit_costs(exit_costs)

        if default_budget is not None:
            default_budget = validate_budget(default_budget, name="default_budget")
        self.default_budget = default_budget
        if exit_policy is not None and not (isinstance(exit_policy, dict) and "policy_type" in exit_policy):
            raise ValueError(f"`exit_policy` must be a dict with a 'policy_type' key or None, got {exit_policy!r}.")
        self.exit_policy = exit_policy

    @property
    def num_exits(self) -> int:
        return len(self.exit_layers)

    def _validated_exit_costs(self, exit_costs: Sequence[float]) -> list[float]:
        costs = [float(c) for c in exit_costs]
        if len(costs) != len(self.exit_layers):
            raise ValueError(f"`exit_costs` must hold one cost per exit ({len(self.exit_layers)}), got {costs}.")
        if any(not (c > 0 and math.isfinite(c)) for c in costs) or any(b <= a for a, b in zip(costs, costs[1:])):
            raise ValueError(f"`exit_costs` must be finite, positive and strictly increasing, got {costs}.")
        return costs

    # --- analytic costs: a backbone config only says how many FLOPs its blocks and heads take ---------------------
    def block_flops(self) -> list[float]:
        """FLOPs of each backbone block for one sample at the reference input size."""
        raise NotImplementedError

    def exit_head_flops(self) -> list[float]:
        """FLOPs of each exit head for one sample; the last entry is the backbone's own head (pooler + classifier)."""
        raise NotImplementedError

    def stem_flops(self) -> float:
        """FLOPs spent before the first block (embeddings, stem convolution) for one sample."""
        return 0.0

    def flops_exit_costs(self) -> list[float]:
        """Relative cumulative cost of each exit from FLOPs; the plain backbone (no exit heads) costs 1.0."""
        blocks, heads = self.block_flops(), self.exit_head_flops()
        full = self.stem_flops() + sum(blocks) + heads[-1]
        costs, spent, start = [], self.stem_flops(), 0
        for k, end in enumerate(self.exit_layers):
            spent += sum(blocks[start:end]) + heads[k]
            start = end
            costs.append(spent / full)
        # the last head is the backbone's own (part of the plain model); earlier heads are early-exit overhead
        return costs

    def set_exit_costs(self, exit_costs: Sequence[float], source: str) -> None:
        """Replace the exit costs (e.g. after a latency calibration), validating them."""
        if source not in EXIT_COST_SOURCES:
            raise ValueError(f"`source` must be one of {EXIT_COST_SOURCES}, got {source!r}.")
        self.exit_costs = self._validated_exit_costs(exit_costs)
        self.exit_cost_source = source


def validate_budget(budget, *, name: str = "budget") -> float:
    """Check that `budget` is a positive, finite real number and return it as a float."""
    if hasattr(budget, "item") and getattr(budget, "ndim", 1) == 0:
        budget = budget.item()
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(
            f"`{name}` must be a number (the allowed average cost per sample, as a fraction of the full model), "
            f"got {type(budget).__name__}: {budget!r}."
        )
    budget = float(budget)
    if math.isnan(budget) or budget <= 0 or math.isinf(budget):
        raise ValueError(f"`{name}` must be a finite number > 0 (1.0 = the full model), got {budget}.")
    return budget


class EENetBertConfig(EENetConfigMixin, BertConfig):
    r"""
    Configuration of [`EENetBertForSequenceClassification`]: a [`BertConfig`] plus the early-exit fields of
    [`EENetConfigMixin`]. Any BERT `config.json` (e.g. of `bert-base-uncased` or a fine-tuned
    `BertForSequenceClassification`) loads into it; the early-exit fields then take their defaults.

    Args:
        exit_pooling (`str`, *optional*, defaults to `"cls"`):
            How every exit, the last one included, pools the token states before its pooler: `"cls"` (the first
            token, as stock BERT classifiers do) or `"mean"` (the masked mean over tokens, for sentence-transformers
            checkpoints such as all-MiniLM-L6-v2).
        exit_cost_reference_length (`int`, *optional*, defaults to 128):
            Sequence length at which the FLOPs-based exit costs are computed.
        kwargs:
            The [`BertConfig`] arguments and the early-exit fields of [`EENetConfigMixin`].

    Example:

    ```python
    >>> from hf_eenet import EENetBertConfig
    >>> config = EENetBertConfig(num_hidden_layers=6, exit_layers=[2, 4, 6], exit_pooling="mean")
    >>> len(config.exit_costs)
    3
    ```
    """

    model_type = "eenet-bert"

    def __init__(
        self,
        exit_layers: Sequence[int] | None = None,
        exit_loss_weights: Sequence[float] | None = None,
        exit_pooling: str = "cls",
        exit_costs: Sequence[float] | None = None,
        exit_cost_source: str = "flops",
        exit_cost_reference_length: int = 128,
        default_budget: float | None = None,
        exit_policy: dict | None = None,
        hf_eenet_version: str | None = None,
        eenet_format_version: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if exit_pooling not in ("cls", "mean"):
            raise ValueError(f"`exit_pooling` must be 'cls' or 'mean', got {exit_pooling!r}.")
        self.exit_pooling = exit_pooling
        if int(exit_cost_reference_length) < 1:
            raise ValueError(f"`exit_cost_reference_length` must be >= 1, got {exit_cost_reference_length}.")
        self.exit_cost_reference_length = int(exit_cost_reference_length)
        self._init_early_exit_fields(
            num_blocks=self.num_hidden_layers,
            exit_layers=exit_layers,
            exit_loss_weights=exit_loss_weights,
            exit_costs=exit_costs,
            exit_cost_source=exit_cost_source,
            default_budget=default_budget,
            exit_policy=exit_policy,
            eenet_format_version=eenet_format_version,
        )

    def block_flops(self) -> list[float]:
        length, hidden, inter = self.exit_cost_reference_length, self.hidden_size, self.intermediate_size
        projections = 4 * length * hidden * hidden  # query, key, value, output
        attention = 2 * length * length * hidden  # scores and weighted sum
        feed_forward = 2 * length * hidden * inter
        return [2.0 * (projections + attention + feed_forward)] * self.num_hidden_layers

    def exit_head_flops(self) -> list[float]:
        head = 2.0 * (self.hidden_size * self.hidden_size + self.hidden_size * self.num_labels)
        return [head] * len(self.exit_layers)
