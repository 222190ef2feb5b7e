"""Configurations of the multi-exit (EENet) models.

Every EENet configuration subclasses the configuration of its backbone (so a stock checkpoint's `config.json` loads
into it unchanged) and adds the same early-exit fields through [`EENetConfigMixin`].
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Sequence
from typing import ClassVar

from transformers import BertConfig, PreTrainedConfig, ResNetConfig, ViTConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = [
    "EENET_CONFIG_FORMAT",
    "EENET_VERSION",
    "EENetConfigMixin",
    "EENetBertConfig",
    "EENetResNetConfig",
    "EENetViTConfig",
]

# Version of the package, stamped into every saved config. Kept here (not in `hf_eenet/__init__.py`) so the
# `models/` folder stays importable on its own as Hub remote code.
EENET_VERSION = "0.1.0"
# Newest layout of the early-exit fields this version reads. A config is stamped with the oldest layout that describes
# it (format 1 unless it uses a field added later), so older readers refuse only configs they would misread.
# 2: `exit_head_pooling` (BERT), which a format-1 reader would ignore.
# 3: `exit_segment_costs` and `exit_cost_batch_size`, without which a reader would misprice the early-exit forward.
EENET_CONFIG_FORMAT = 3

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
        exit_segment_costs (`list[float]`, *optional*):
            Fixed cost of running each segment after exit 0 on a batch at all (one per exit but the first), as a
            fraction of the full forward of the batch that runs it, on top of the per-sample `exit_costs` (see
            [`~hf_eenet.models.exit_cost_model.ExitCostModel`]). Measured by
            `model.calibrate_exit_costs(..., segment_costs=True)`; `None` prices the early-exit forward per sample only.
        exit_cost_batch_size (`int`, *optional*):
            The batch size the fixed segment costs are priced for (policies are fitted for batches of this size);
            set exactly when `exit_segment_costs` is.
        default_budget (`float`, *optional*):
            Budget used when `forward` is called without one. `None` runs the full model (or a stored policy that
            decides its own cost, such as patience, which never takes a budget).
        exit_policy (`dict`, *optional*):
            Type, budget grid and hyperparameters of the fitted exit policy; its tensors live in the model weights.
            `None` when no policy has been fitted.
        hf_eenet_version (`str`, *optional*):
            Version of `hf_eenet` that wrote the config (informational; always re-stamped with the running version).
        eenet_format_version (`int`, *optional*):
            Layout version of the early-exit fields (re-stamped with the oldest layout that describes the config).
            Configs written in a newer layout than this version reads are refused.
    """

    # A plain `Trainer` evaluating with labels predicts the logits alone, as for a stock classifier (`EarlyExitTrainer`
    # keeps every field, for per-exit metrics).
    keys_to_ignore_at_inference: ClassVar[list[str]] = [
        "exit_index",
        "exit_cost",
        "all_exit_logits",
        "all_exit_features",
    ]

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
        exit_segment_costs: Sequence[float] | None = None,
        exit_cost_batch_size: int | None = None,
    ) -> None:
        if eenet_format_version is not None:
            if isinstance(eenet_format_version, bool) or not isinstance(eenet_format_version, int):
                raise ValueError(
                    f"`eenet_format_version` must be a whole number (the early-exit config format, up to "
                    f"{EENET_CONFIG_FORMAT}), got {eenet_format_version!r}: the config was edited or is not an EENet "
                    "config."
                )
            if eenet_format_version > EENET_CONFIG_FORMAT:
                raise ValueError(
                    f"This config was written with early-exit config format {eenet_format_version}, but hf_eenet "
                    f"{EENET_VERSION} reads formats up to {EENET_CONFIG_FORMAT}. Upgrade hf_eenet to load it."
                )
        self.hf_eenet_version = EENET_VERSION

        exit_layers = list(range(1, num_blocks + 1)) if exit_layers is None else [int(x) for x in exit_layers]
        if not exit_layers or exit_layers[-1] != num_blocks:
            raise ValueError(
                f"`exit_layers` must end with the number of backbone {self.exit_layer_units_name} ({num_blocks}) so "
                f"that the last exit is the backbone's own classifier, got {exit_layers}."
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
        self.exit_segment_costs, self.exit_cost_batch_size = validate_segment_costs(
            exit_segment_costs, exit_cost_batch_size, num_exits
        )
        self.eenet_format_version = self._config_format()

        if default_budget is not None:
            default_budget = validate_budget(default_budget, name="default_budget")
        self.default_budget = default_budget
        if exit_policy is not None and not (isinstance(exit_policy, dict) and "policy_type" in exit_policy):
            raise ValueError(f"`exit_policy` must be a dict with a 'policy_type' key or None, got {exit_policy!r}.")
        self.exit_policy = exit_policy

    def _config_format(self) -> int:
        """The oldest early-exit config format that describes this config (see `EENET_CONFIG_FORMAT`)."""
        return 3 if self.exit_segment_costs is not None else 1

    @staticmethod
    def _refuse_fields(kwargs: dict, names: Sequence[str], reason: str) -> None:
        """A clear error for early-exit fields of other EENet models (they would be stored and silently ignored)."""
        for name in names:
            if kwargs.get(name) is not None:
                raise ValueError(f"`{name}` does not apply to this model: {reason}")

    @property
    def exit_layer_units_name(self) -> str:
        """What `exit_layers` counts, in words (e.g. "layers")."""
        return "blocks"

    @property
    def num_exits(self) -> int:
        return len(self.exit_layers)

    def _validated_exit_costs(self, exit_costs: Sequence[float]) -> list[float]:
        costs = [float(c) for c in exit_costs]
        if len(costs) != len(self.exit_layers):
            raise ValueError(f"`exit_costs` must hold one cost per exit ({len(self.exit_layers)}), got {costs}.")
        return validate_exit_costs(costs)

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

    def set_exit_costs(
        self,
        exit_costs: Sequence[float],
        source: str,
        segment_costs: Sequence[float] | None = None,
        batch_size: int | None = None,
    ) -> None:
        """
        Replace the exit costs (e.g. after a latency calibration), validating them; `segment_costs` and `batch_size`
        replace `exit_segment_costs` and `exit_cost_batch_size` (`None`: per-sample costs only).
        """
        if source not in EXIT_COST_SOURCES:
            raise ValueError(f"`source` must be one of {EXIT_COST_SOURCES}, got {source!r}.")
        costs = self._validated_exit_costs(exit_costs)
        self.exit_segment_costs, self.exit_cost_batch_size = validate_segment_costs(
            segment_costs, batch_size, len(costs)
        )
        self.exit_costs = costs
        self.exit_cost_source = source
        self.eenet_format_version = self._config_format()

    # --- loading --------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """
        As `PreTrainedConfig.from_dict`, but early-exit and backbone arguments given as keyword arguments (e.g.
        `from_pretrained(path, exit_layers=[4, 8, 12])` or `num_hidden_layers=6`) reach `__init__`, so they are
        validated and the fields derived from them (default exits, FLOPs-based costs, ...) are recomputed; transformers
        would set them afterwards, leaving those stale. Saved exits after every block follow a backbone of another
        size; other saved exits must then be given too. A changed exit layout or class count drops the stored exit
        policy, with a warning.
        A stock checkpoint's `model_type` (e.g. `"vit"`) is replaced by this class's own.
        """
        config_dict = {key: value for key, value in config_dict.items() if key != "model_type"}
        num_exits = config_dict.pop("num_exits", None)  # derived from `exit_layers`, never stored
        overrides = {key: kwargs.pop(key) for key in list(kwargs) if key in cls._init_argument_names()}
        if overrides:
            cls._drop_derived_fields(config_dict, overrides)
            config_dict.update(overrides)
        num_labels = kwargs.get("num_labels") or len(kwargs.get("id2label") or {}) or None
        if num_labels is not None and config_dict.get("exit_policy") is not None:
            # transformers writes no `id2label` for its default two labels
            saved_labels = len(config_dict.get("id2label") or {}) or config_dict.get("num_labels") or 2
            if num_labels != saved_labels:
                logger.warning(
                    f"`num_labels` changed from {saved_labels} to {num_labels}: the stored exit policy was fitted on "
                    f"{saved_labels} classes and is dropped. Train the exits and fit the scheduler again."
                )
                config_dict.pop("exit_policy")
        loaded = super().from_dict(config_dict, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        if num_exits is not None and num_exits != config.num_exits:
            raise ValueError(
                f"The config says `num_exits` {num_exits!r}, but its `exit_layers` {config.exit_layers} give "
                f"{config.num_exits} exits; `num_exits` follows from `exit_layers`: edit those instead."
            )
        return loaded

    @classmethod
    def _init_argument_names(cls) -> set[str]:
        """
        The arguments `__init__` validates and derives fields from: the early-exit ones and the backbone's (e.g.
        `num_hidden_layers`, which the default `exit_layers` and the FLOPs-based costs follow), not those of every
        `PreTrainedConfig` (transformers sets those itself).
        """
        names = set()
        for klass in cls.__mro__:
            if klass is PreTrainedConfig:
                break
            if "__init__" in vars(klass):
                parameters = inspect.signature(klass.__init__).parameters.items()
                names |= {name for name, p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        return names - set(inspect.signature(PreTrainedConfig.__init__).parameters)

    @classmethod
    def _block_count(cls, values: dict) -> int | None:
        """How many blocks `exit_layers` counts in a config with these `values` (`None` if they do not say)."""
        return values.get("num_hidden_layers")

    @classmethod
    def _drop_derived_fields(cls, config_dict: dict, overrides: dict) -> None:
        """Remove the saved fields that `overrides` invalidate, so `__init__` derives them again."""
        saved_exits = list(config_dict.get("exit_layers") or ())
        blocks = cls._block_count({**config_dict, **overrides})
        if "exit_layers" not in overrides and saved_exits and blocks is not None and blocks != saved_exits[-1]:
            # a backbone of another size (e.g. `num_hidden_layers=6`): saved exits after every block follow it
            if saved_exits != list(range(1, saved_exits[-1] + 1)):
                raise ValueError(
                    f"The overrides {sorted(overrides)} give the backbone {blocks} blocks, but the saved `exit_layers` "
                    f"{saved_exits} end at block {saved_exits[-1]}: pass `exit_layers` for the new backbone too."
                )
            overrides["exit_layers"] = list(range(1, blocks + 1))
        if "exit_layers" in overrides and "exit_layers" in config_dict:
            if list(overrides["exit_layers"] or ()) == list(config_dict["exit_layers"]):
                overrides.pop("exit_layers")  # the saved exits: nothing to derive again
        if "exit_layers" in overrides:  # per-exit fields of another exit layout no longer apply
            if config_dict.get("exit_policy") is not None and "exit_policy" not in overrides:
                logger.warning(
                    f"`exit_layers` changed from {config_dict.get('exit_layers')} to {list(overrides['exit_layers'])}: "
                    "the stored exit policy and exit costs were fitted for the saved exits and are dropped. Train the "
                    "new exits and fit the scheduler again."
                )
            for key in (
                "exit_costs",
                "exit_cost_source",
                "exit_segment_costs",
                "exit_cost_batch_size",
                "exit_loss_weights",
                "exit_policy",
            ):
                if key not in overrides:
                    config_dict.pop(key, None)
        elif (
            "exit_costs" not in overrides
            and overrides.get("exit_cost_source", config_dict.get("exit_cost_source", "flops")) == "flops"
        ):  # FLOPs costs follow the config (an override of `exit_cost_source` to "flops" recomputes them)
            config_dict.pop("exit_costs", None)
        if "exit_segment_costs" not in overrides and ("exit_costs" in overrides or "exit_costs" not in config_dict):
            # segment costs were measured together with the saved exit costs, which are replaced or recomputed
            config_dict.pop("exit_segment_costs", None)
            config_dict.pop("exit_cost_batch_size", None)
        changed = [
            k for k in ("exit_pooling", "exit_head_pooling") if k in overrides and overrides[k] != config_dict.get(k)
        ]
        if changed and config_dict.get("exit_policy") is not None and "exit_policy" not in overrides:
            logger.warning(
                f"{', '.join(f'`{k}`' for k in changed)} changed: the stored exit policy was fitted for the exit "
                "heads as they pooled before and is dropped. Train the exits and fit the scheduler again."
            )
            config_dict.pop("exit_policy")


def validate_exit_costs(exit_costs: Sequence[float]) -> list[float]:
    """`exit_costs` as floats; a clear error unless they are finite, positive and strictly increasing."""
    costs = [float(c) for c in exit_costs]
    if any(not (c > 0 and math.isfinite(c)) for c in costs) or any(b <= a for a, b in zip(costs, costs[1:])):
        raise ValueError(f"`exit_costs` must be finite, positive and strictly increasing, got {costs}.")
    return costs


def validate_segment_costs(
    segment_costs: Sequence[float] | None, batch_size: int | None, num_exits: int
) -> tuple[list[float] | None, int | None]:
    """
    `segment_costs` as floats and `batch_size` as an int; a clear error unless both are `None` or the costs are
    `num_exits - 1` finite non-negative numbers and `batch_size` a positive integer.
    """
    if segment_costs is None and batch_size is None:
        return None, None
    if segment_costs is None or batch_size is None:
        raise ValueError(
            "`exit_segment_costs` and `exit_cost_batch_size` go together (the fixed segment costs are priced for "
            f"batches of that size), got {segment_costs} and {batch_size}."
        )
    costs = [float(c) for c in segment_costs]
    if len(costs) != num_exits - 1 or any(not (c >= 0 and math.isfinite(c)) for c in costs):
        raise ValueError(
            f"`exit_segment_costs` must hold {num_exits - 1} finite non-negative costs (one per exit after the first), "
            f"got {costs}."
        )
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or int(batch_size) < 1:
        raise ValueError(f"`exit_cost_batch_size` must be a positive integer, got {batch_size!r}.")
    return costs, int(batch_size)


def strictly_increasing(costs: Sequence[float]) -> list[float]:
    """
    `costs` with every exit costing more than the one before it: an exit that measured no dearer than its predecessor
    (a tie of medians, or noise) is raised to `1 + 1e-6` times its predecessor's cost.
    """
    costs = [float(c) for c in costs]
    for k in range(1, len(costs)):
        costs[k] = max(costs[k], costs[k - 1] * (1 + 1e-6))
    return costs


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
            How the last exit, and the early exits unless `exit_head_pooling` says otherwise, pool the token states
            before their pooler: `"cls"` (the first token, as stock BERT classifiers do) or `"mean"` (the masked mean
            over tokens, for sentence-transformers checkpoints such as all-MiniLM-L6-v2).
        exit_head_pooling (`str`, *optional*):
            How the early exits' heads pool the token states, when not as `exit_pooling`: `"cls"`, `"mean"` or
            `"attention"` (a softmax attention over the non-padding tokens with a learned scorer per head, so a
            shallow exit can weigh the words that carry the label instead of averaging them). The last exit always
            pools as `exit_pooling`, so a stock classifier stays as it was trained.
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
        exit_head_pooling: str | None = None,
        exit_costs: Sequence[float] | None = None,
        exit_cost_source: str = "flops",
        exit_segment_costs: Sequence[float] | None = None,
        exit_cost_batch_size: int | None = None,
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
        if exit_head_pooling not in (None, "cls", "mean", "attention"):
            raise ValueError(
                f"`exit_head_pooling` must be 'cls', 'mean', 'attention' or None (as `exit_pooling`), got "
                f"{exit_head_pooling!r}."
            )
        self.exit_head_pooling = exit_head_pooling
        if int(exit_cost_reference_length) < 1:
            raise ValueError(f"`exit_cost_reference_length` must be >= 1, got {exit_cost_reference_length}.")
        self.exit_cost_reference_length = int(exit_cost_reference_length)
        self._init_early_exit_fields(
            num_blocks=self.num_hidden_layers,
            exit_layers=exit_layers,
            exit_loss_weights=exit_loss_weights,
            exit_costs=exit_costs,
            exit_cost_source=exit_cost_source,
            exit_segment_costs=exit_segment_costs,
            exit_cost_batch_size=exit_cost_batch_size,
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

    def _config_format(self) -> int:
        return max(super()._config_format(), 2 if self.exit_head_pooling is not None else 1)

    @property
    def head_pooling(self) -> str:
        """How the early exits' heads pool the token states: `exit_head_pooling`, else `exit_pooling`."""
        return self.exit_head_pooling or self.exit_pooling

    def exit_head_flops(self) -> list[float]:
        head = 2.0 * (self.hidden_size * self.hidden_size + self.hidden_size * self.num_labels)
        scorer = 2.0 * self.exit_cost_reference_length * self.hidden_size if self.head_pooling == "attention" else 0.0
        return [head + scorer] * (len(self.exit_layers) - 1) + [head]


def _pair(size) -> tuple[int, int]:
    """`(height, width)` of an int or a two-item sequence."""
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


class EENetViTConfig(EENetConfigMixin, ViTConfig):
    r"""
    Configuration of [`EENetViTForImageClassification`]: a [`ViTConfig`] plus the early-exit fields of
    [`EENetConfigMixin`]. Any ViT `config.json` (e.g. of `google/vit-base-patch16-224` or a fine-tuned
    `ViTForImageClassification`) loads into it; the early-exit fields then take their defaults (an exit after every
    transformer layer).

    The FLOPs-based exit costs are computed at `image_size` (`(image_size / patch_size)**2` patches plus the CLS token),
    counting the matrix multiplications of the patch embedding, the transformer layers and the heads.

    Args:
        exit_pooling (`str`, *optional*, defaults to `"cls"`):
            How every exit, the last one included, pools the token states before its layer norm and linear
            classifier: `"cls"` (the CLS token, as stock [`ViTForImageClassification`] does) or `"mean"` (the mean over
            the patch tokens, CLS excluded, as BEiT-style mean pooling does: mean first, then the layer norm).
        kwargs:
            The [`ViTConfig`] arguments and the early-exit fields of [`EENetConfigMixin`].

    Example:

    ```python
    >>> from hf_eenet import EENetViTConfig
    >>> config = EENetViTConfig(image_size=32, patch_size=4, num_hidden_layers=6, exit_layers=[2, 4, 6])
    >>> len(config.exit_costs)
    3
    ```
    """

    model_type = "eenet-vit"

    def __init__(
        self,
        exit_layers: Sequence[int] | None = None,
        exit_loss_weights: Sequence[float] | None = None,
        exit_pooling: str = "cls",
        exit_costs: Sequence[float] | None = None,
        exit_cost_source: str = "flops",
        exit_segment_costs: Sequence[float] | None = None,
        exit_cost_batch_size: int | None = None,
        default_budget: float | None = None,
        exit_policy: dict | None = None,
        hf_eenet_version: str | None = None,
        eenet_format_version: int | None = None,
        **kwargs,
    ):
        self._refuse_fields(kwargs, ["exit_head_pooling"], "every exit of a ViT pools as `exit_pooling`.")
        super().__init__(**kwargs)
        if exit_pooling not in ("cls", "mean"):
            raise ValueError(f"`exit_pooling` must be 'cls' or 'mean', got {exit_pooling!r}.")
        self.exit_pooling = exit_pooling
        self._init_early_exit_fields(
            num_blocks=self.num_hidden_layers,
            exit_layers=exit_layers,
            exit_loss_weights=exit_loss_weights,
            exit_costs=exit_costs,
            exit_cost_source=exit_cost_source,
            exit_segment_costs=exit_segment_costs,
            exit_cost_batch_size=exit_cost_batch_size,
            default_budget=default_budget,
            exit_policy=exit_policy,
            eenet_format_version=eenet_format_version,
        )

    @property
    def num_patches(self) -> int:
        (height, width), (patch_height, patch_width) = _pair(self.image_size), _pair(self.patch_size)
        return (height // patch_height) * (width // patch_width)

    def stem_flops(self) -> float:
        patch_height, patch_width = _pair(self.patch_size)
        return 2.0 * self.num_patches * self.num_channels * patch_height * patch_width * self.hidden_size

    def block_flops(self) -> list[float]:
        tokens, hidden, inter = self.num_patches + 1, self.hidden_size, self.intermediate_size
        projections = 4 * tokens * hidden * hidden  # query, key, value, output
        attention = 2 * tokens * tokens * hidden  # scores and weighted sum
        feed_forward = 2 * tokens * hidden * inter
        return [2.0 * (projections + attention + feed_forward)] * self.num_hidden_layers

    def exit_head_flops(self) -> list[float]:
        pooling = self.num_patches * self.hidden_size if self.exit_pooling == "mean" else 0
        head = pooling + 2.0 * self.hidden_size * self.num_labels  # layer norm + linear classifier
        return [head] * len(self.exit_layers)


class EENetResNetConfig(EENetConfigMixin, ResNetConfig):
    r"""
    Configuration of [`EENetResNetForImageClassification`]: a [`ResNetConfig`] plus the early-exit fields of
    [`EENetConfigMixin`]. Any ResNet `config.json` (e.g. of `microsoft/resnet-50`) loads into it; the early-exit
    fields then take their defaults.

    Exits sit after *stages* (`len(depths)` of them): `exit_layers` counts stages, and its last entry is the number of
    stages (the stock pooler and classifier). With `exit_layer_unit="block"`, `exit_layers` counts residual blocks
    instead (`sum(depths)` of them), so an exit can also sit inside a stage: e.g. after the first block, where the
    first stage is a large share of the time on devices that run its high-resolution, narrow convolutions slowly. An
    early exit's head is a 3x3 convolution (stride `exit_head_strides[k]`) with batch norm and ReLU, a global average
    pool giving the exit's features, and a linear classifier. The convolution keeps the width of its stage's own 3x3
    convolutions: `hidden_sizes[s]` channels for `"basic"` layers, `hidden_sizes[s] // 4` for `"bottleneck"` layers,
    so a head costs about one 3x3 convolution of its stage (a quarter of one when it downsamples).

    The FLOPs-based exit costs count the convolutions and linear layers (batch norm, activations, pooling and residual
    additions are negligible) for a square input of `exit_cost_reference_size` pixels.

    Args:
        exit_cost_reference_size (`int`, *optional*, defaults to 224):
            Side of the square input at which the FLOPs-based exit costs are computed and at which the default
            `exit_head_strides` are chosen: 224 for ImageNet checkpoints such as `microsoft/resnet-50`; set it to the
            resolution the model actually sees (e.g. 32 for CIFAR-10 images fed unresized).
        exit_layer_unit (`str`, *optional*, defaults to `"stage"`):
            What `exit_layers` counts: `"stage"` or `"block"` (residual blocks, across stages).
        exit_head_strides (`list[int]`, *optional*):
            Stride (1 or 2) of each early exit's 3x3 convolution (one per exit but the last). Defaults to 2 where the
            exit's feature map at `exit_cost_reference_size` is larger than 4x4, else 1. Stored in the config, so the
            architecture does not change if `exit_cost_reference_size` is edited later.
        stem_kernel_size (`int`, *optional*, defaults to 7), stem_stride (`int`, *optional*, defaults to 2),
        stem_pooling (`bool`, *optional*, defaults to `True`):
            The stem: a `stem_kernel_size` convolution with stride `stem_stride`, then (with `stem_pooling`) a 3x3 max
            pool with stride 2. The defaults are the stock (ImageNet) stem every ResNet checkpoint has; small images
            such as CIFAR-10's 32x32 want the CIFAR stem `stem_kernel_size=3, stem_stride=1, stem_pooling=False`
            (models trained from scratch only: a stock checkpoint's 7x7 stem does not fit it).
        kwargs:
            The [`ResNetConfig`] arguments and the early-exit fields of [`EENetConfigMixin`].

    Example:

    ```python
    >>> from hf_eenet import EENetResNetConfig
    >>> config = EENetResNetConfig(layer_type="basic", hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2])
    >>> config.exit_layers
    [1, 2, 3, 4]
    ```
    """

    model_type = "eenet-resnet"
    EXIT_LAYER_UNITS = ("stage", "block")
    # the fields the default `exit_head_strides` are derived from
    _EXIT_HEAD_STRIDE_INPUTS = frozenset({"exit_layers", "exit_cost_reference_size", "exit_layer_unit"})

    def __init__(
        self,
        exit_layers: Sequence[int] | None = None,
        exit_loss_weights: Sequence[float] | None = None,
        exit_costs: Sequence[float] | None = None,
        exit_cost_source: str = "flops",
        exit_segment_costs: Sequence[float] | None = None,
        exit_cost_batch_size: int | None = None,
        exit_cost_reference_size: int = 224,
        exit_layer_unit: str = "stage",
        exit_head_strides: Sequence[int] | None = None,
        stem_kernel_size: int = 7,
        stem_stride: int = 2,
        stem_pooling: bool = True,
        default_budget: float | None = None,
        exit_policy: dict | None = None,
        hf_eenet_version: str | None = None,
        eenet_format_version: int | None = None,
        **kwargs,
    ):
        self._refuse_fields(
            kwargs,
            ["exit_pooling", "exit_head_pooling"],
            "a ResNet's exit heads pool their feature maps by global average (there are no tokens to pool).",
        )
        super().__init__(**kwargs)
        for name, value in (("stem_kernel_size", stem_kernel_size), ("stem_stride", stem_stride)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
        if stem_kernel_size % 2 == 0:
            raise ValueError(f"`stem_kernel_size` must be odd (same padding), got {stem_kernel_size}.")
        self.stem_kernel_size, self.stem_stride, self.stem_pooling = stem_kernel_size, stem_stride, bool(stem_pooling)
        if len(self.hidden_sizes) != len(self.depths):
            raise ValueError(
                f"`hidden_sizes` and `depths` must have one entry per stage, got {self.hidden_sizes} and {self.depths}."
            )
        if isinstance(exit_cost_reference_size, bool) or int(exit_cost_reference_size) < 1:
            raise ValueError(f"`exit_cost_reference_size` must be an integer >= 1, got {exit_cost_reference_size}.")
        self.exit_cost_reference_size = int(exit_cost_reference_size)
        if exit_layer_unit not in self.EXIT_LAYER_UNITS:
            raise ValueError(f"`exit_layer_unit` must be one of {self.EXIT_LAYER_UNITS}, got {exit_layer_unit!r}.")
        self.exit_layer_unit = exit_layer_unit
        # set before `_init_early_exit_fields`, which computes the FLOPs-based costs (and so needs the strides)
        self.exit_head_strides = None if exit_head_strides is None else [int(s) for s in exit_head_strides]
        self._init_early_exit_fields(
            num_blocks=len(self.exit_units()),
            exit_layers=exit_layers,
            exit_loss_weights=exit_loss_weights,
            exit_costs=exit_costs,
            exit_cost_source=exit_cost_source,
            exit_segment_costs=exit_segment_costs,
            exit_cost_batch_size=exit_cost_batch_size,
            default_budget=default_budget,
            exit_policy=exit_policy,
            eenet_format_version=eenet_format_version,
        )
        self._resolve_exit_head_strides()

    @property
    def exit_layer_units_name(self) -> str:
        return "stages" if self.exit_layer_unit == "stage" else "residual blocks"

    def _resolve_exit_head_strides(self) -> list[int]:
        """Fill in the default strides (once `exit_layers` is validated) and check them."""
        if self.exit_head_strides is None:
            sizes = self.unit_output_sizes()
            self.exit_head_strides = [2 if sizes[end - 1] > 4 else 1 for end in self.exit_layers[:-1]]
        strides = self.exit_head_strides
        if len(strides) != len(self.exit_layers) - 1 or any(s not in (1, 2) for s in strides):
            raise ValueError(
                f"`exit_head_strides` must hold one stride (1 or 2) per early exit ({len(self.exit_layers) - 1}), "
                f"got {strides}."
            )
        return strides

    @classmethod
    def _drop_derived_fields(cls, config_dict: dict, overrides: dict) -> None:
        super()._drop_derived_fields(config_dict, overrides)
        if "exit_head_strides" not in overrides and cls._EXIT_HEAD_STRIDE_INPUTS & overrides.keys():
            config_dict.pop("exit_head_strides", None)

    @classmethod
    def _block_count(cls, values: dict) -> int | None:
        depths = values.get("depths")
        if depths is None:
            return None
        return sum(depths) if values.get("exit_layer_unit", "stage") == "block" else len(depths)

    def exit_units(self) -> list[tuple[int, range]]:
        """What `exit_layers` counts, in order: `(stage, its residual blocks in that unit)` per stage or per block."""
        if self.exit_layer_unit == "stage":
            return [(stage, range(depth)) for stage, depth in enumerate(self.depths)]
        return [(stage, range(layer, layer + 1)) for stage, depth in enumerate(self.depths) for layer in range(depth)]

    def exit_input_channels(self) -> list[int]:
        """Channels of the feature map each early exit's head receives (its stage's width)."""
        units = self.exit_units()
        return [self.hidden_sizes[units[end - 1][0]] for end in self.exit_layers[:-1]]

    def exit_head_channels(self) -> list[int]:
        """Width of each early exit's 3x3 convolution (= the size of its pooled features)."""
        reduction = 4 if self.layer_type == "bottleneck" else 1
        return [max(1, channels // reduction) for channels in self.exit_input_channels()]

    # --- analytic costs -------------------------------------------------------------------------------------------
    @staticmethod
    def _conv_output_size(size: int, kernel: int, stride: int) -> int:
        return (size + 2 * (kernel // 2) - kernel) // stride + 1

    @staticmethod
    def _conv_flops(out_size: int, kernel: int, in_channels: int, out_channels: int) -> float:
        return 2.0 * out_size * out_size * kernel * kernel * in_channels * out_channels

    def _stem_output_size(self) -> int:
        size = self._conv_output_size(self.exit_cost_reference_size, self.stem_kernel_size, self.stem_stride)
        return self._conv_output_size(size, 3, 2) if self.stem_pooling else size  # 3x3 max pool, stride 2

    def _layer_flops_and_size(self, stage: int, layer: int, size: int) -> tuple[float, int]:
        """FLOPs of one residual block (`layer` of `stage`) at input side `size`, and its output side."""
        out_channels = self.hidden_sizes[stage]
        stage_in = self.embedding_size if stage == 0 else self.hidden_sizes[stage - 1]
        stage_stride = 2 if stage > 0 or self.downsample_in_first_stage else 1
        layer_in, layer_stride = (stage_in, stage_stride) if layer == 0 else (out_channels, 1)
        out_size = self._conv_output_size(size, 3, layer_stride)
        flops = 0.0
        if layer_in != out_channels or layer_stride != 1:  # 1x1 projection shortcut
            flops += self._conv_flops(out_size, 1, layer_in, out_channels)
        if self.layer_type == "basic":
            flops += self._conv_flops(out_size, 3, layer_in, out_channels)
            flops += self._conv_flops(out_size, 3, out_channels, out_channels)
        else:
            reduced = out_channels // 4
            first_size = out_size if self.downsample_in_bottleneck else size
            flops += self._conv_flops(first_size, 1, layer_in, reduced)
            flops += self._conv_flops(out_size, 3, reduced, reduced)
            flops += self._conv_flops(out_size, 1, reduced, out_channels)
        return flops, out_size

    def _block_flops_and_sizes(self) -> list[tuple[float, int]]:
        """FLOPs and output side of every residual block, in order, for the reference input."""
        blocks, size = [], self._stem_output_size()
        for stage, depth in enumerate(self.depths):
            for layer in range(depth):
                flops, size = self._layer_flops_and_size(stage, layer, size)
                blocks.append((flops, size))
        return blocks

    def _unit_flops_and_sizes(self) -> list[tuple[float, int]]:
        """FLOPs and output side of every unit `exit_layers` counts (see `exit_units`), for the reference input."""
        blocks, units, start = self._block_flops_and_sizes(), [], 0
        for _, layers in self.exit_units():
            end = start + len(layers)
            units.append((sum(flops for flops, _ in blocks[start:end]), blocks[end - 1][1]))
            start = end
        return units

    def stage_output_sizes(self) -> list[int]:
        """Side of each stage's output feature map for the reference input."""
        blocks = self._block_flops_and_sizes()
        return [blocks[end - 1][1] for end in itertools.accumulate(self.depths)]

    def unit_output_sizes(self) -> list[int]:
        """Side of the feature map after each unit `exit_layers` counts (a stage or a block) for the reference input."""
        return [size for _, size in self._unit_flops_and_sizes()]

    def stem_flops(self) -> float:
        stem_size = self._conv_output_size(self.exit_cost_reference_size, self.stem_kernel_size, self.stem_stride)
        return self._conv_flops(stem_size, self.stem_kernel_size, self.num_channels, self.embedding_size)

    def block_flops(self) -> list[float]:
        return [flops for flops, _ in self._unit_flops_and_sizes()]

    def exit_head_flops(self) -> list[float]:
        sizes, strides = self.unit_output_sizes(), self._resolve_exit_head_strides()
        heads = []
        exits = zip(self.exit_layers[:-1], self.exit_input_channels(), self.exit_head_channels())
        for k, (end, stage_channels, channels) in enumerate(exits):
            out_size = self._conv_output_size(sizes[end - 1], 3, strides[k])
            heads.append(self._conv_flops(out_size, 3, stage_channels, channels) + 2.0 * channels * self.num_labels)
        heads.append(2.0 * self.hidden_sizes[-1] * self.num_labels)  # the stock pooler + linear classifier
        return heads
