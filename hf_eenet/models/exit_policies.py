"""Exit policies: per-sample exit decisions for a given budget.

A policy is a `torch.nn.Module` whose tensors (one slice per fitted budget) are saved with the model's weights and
whose type, budget grid and hyperparameters are saved in `config.exit_policy`, so `from_pretrained` reproduces every
decision. Policies know nothing about backbones, Trainer or pipelines: they are fitted on cached exit logits and asked
at inference, exit by exit, which of the still-active samples stop.

Conventions:
- exit logits are batch-first: `(num_samples, num_exits, num_labels)` when cached, `(batch, num_labels)` at one exit;
- a budget is the allowed average cost per sample relative to the full model; a call-time budget uses the nearest
  fitted budget **not above** it (never overspending);
- per-sample state (e.g. earlier scores, patience counters) is a dict of batch-first tensors that the engine compacts
  together with the batch, so a policy never sees samples that already left.

Policies (`policy_type`):
- `"confidence-threshold"` ([`ConfidenceThresholdPolicy`]): max-prob or entropy confidence with a global
  (DeeBERT / FastBERT / BranchyNet) or geometric (MSDNet) threshold allocation, budget-matched;
- `"eenet-paper"` ([`EENetPaperPolicy`]): EENet as published (Ilhan et al., WACV 2024), with the fixes of the design;
- `"eenet"` ([`EENetPolicy`]): our default EENet (optimised allocation, richer features, held-out guard);
- `"patience"` ([`PatiencePolicy`], PABEE) and `"static"` ([`StaticExitPolicy`]): not budget-matched, their cost is
  whatever their hyperparameter gives;
- [`ForcedExitPolicy`]: given exits, for tests and timing (not storable).

The oracle (first correct exit) needs labels, so it is not a policy: see `hf_eenet.evaluation.oracle_exits`.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_eenet import validate_budget
from .exit_cost_model import ExitCostModel

# Budgets are kept to six decimals (`fit` rounds them: a float32 0.7 is 0.699999988): two budgets closer than half a
# unit of the sixth decimal are the same budget.
BUDGET_DECIMALS = 6
BUDGET_TOLERANCE = 0.5 * 10**-BUDGET_DECIMALS

__all__ = [
    "EXIT_POLICY_CLASSES",
    "ConfidenceThresholdPolicy",
    "EENetPaperPolicy",
    "EENetPolicy",
    "ExitPolicy",
    "ForcedExitPolicy",
    "PatiencePolicy",
    "StaticExitPolicy",
    "check_class_labels",
    "default_budget_grid",
    "exit_policy_from_config",
    "exit_fractions",
    "expected_gain_scoring_functions",
    "first_exit_over_threshold",
    "geometric_exit_fractions",
    "global_thresholds",
    "match_thresholds",
    "register_exit_policy",
    "regret_scoring_functions",
    "search_exit_fractions",
    "thresholds_for_exit_fractions",
    "tilt_exit_fractions",
]

EXIT_POLICY_CLASSES: dict[str, type[ExitPolicy]] = {}


def register_exit_policy(cls: type[ExitPolicy]) -> type[ExitPolicy]:
    """Class decorator registering a policy under its `policy_type` so saved configs can rebuild it."""
    EXIT_POLICY_CLASSES[cls.policy_type] = cls
    return cls


def exit_policy_from_config(config: dict) -> ExitPolicy:
    """Rebuild an (unfitted-valued) policy from `config.exit_policy`; its tensors are then loaded from the weights."""
    if not isinstance(config, dict) or "policy_type" not in config:
        raise ValueError(f"An exit policy config must be a dict with a 'policy_type' key, got {config!r}.")
    config = dict(config)
    policy_type = config.pop("policy_type")
    if policy_type not in EXIT_POLICY_CLASSES:
        raise ValueError(f"Unknown exit policy type {policy_type!r}; known types: {sorted(EXIT_POLICY_CLASSES)}.")
    cls = EXIT_POLICY_CLASSES[policy_type]
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]  # without `self`
    named = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    accepted = [p.name for p in named]
    missing = [p.name for p in named if p.default is p.empty and p.name not in config]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters)
    unknown = [] if takes_any else sorted(set(config) - set(accepted))
    if unknown or missing:
        problems = [f"unknown hyperparameters {unknown}"] * bool(unknown) + [f"no {missing}"] * bool(missing)
        raise ValueError(
            f"The {policy_type!r} exit policy config has {' and '.join(problems)} (a config from another hf_eenet "
            f"version, or edited?); {cls.__name__} takes {accepted}."
        )
    return cls(**config)


def default_budget_grid(
    exit_costs: ExitCostModel | Sequence[float], start: float = 0.2, stop: float = 0.95, step: float = 0.05
):
    """
    Budgets `start, start + step, ..., stop` (rounded), clipped to those that tell the exits apart: from the cheapest
    exit's cost to the cost of sending every sample to the last exit (measured costs can put the last exit below 1.0,
    and a budget above it is met by sending every sample there). `exit_costs` are per-sample exit costs or an
    [`~hf_eenet.models.exit_cost_model.ExitCostModel`].
    """
    costs = ExitCostModel.of(exit_costs)
    if not (math.isfinite(step) and step > 0) or not (0 < start <= stop <= 1):
        raise ValueError(f"Need 0 < start <= stop <= 1 and step > 0, got start={start}, stop={stop}, step={step}.")
    count = math.floor((stop - start) / step + 1e-9) + 1  # never past `stop`
    grid = [round(start + i * step, BUDGET_DECIMALS) for i in range(count)]
    feasible = [b for b in grid if costs.cheapest - BUDGET_TOLERANCE <= b <= costs.deepest + BUDGET_TOLERANCE]
    if not feasible:
        raise ValueError(
            f"No budget in {grid} lies between the cheapest exit's cost ({costs.cheapest:.3f}) and the cost of "
            f"sending every sample to the last exit ({costs.deepest:.3f})."
        )
    return feasible


def exit_fractions(exit_index: torch.Tensor, num_exits: int) -> torch.Tensor:
    """Share of the samples that leave at each exit, from their exits `exit_index` of shape `(num_samples,)`."""
    return torch.bincount(exit_index, minlength=num_exits).float() / exit_index.numel()


def first_exit_over_threshold(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """
    Exit each sample takes when it leaves at the first exit whose score reaches the threshold.

    Args:
        scores (`torch.Tensor` of shape `(..., num_samples, num_exits)`): per-exit exit scores.
        thresholds (`torch.Tensor` of shape `(..., num_exits)`): thresholds; the last exit always takes the rest.

    Returns:
        `torch.LongTensor` of shape `(..., num_samples)`.
    """
    over = scores[..., :-1] >= thresholds[..., None, :-1]  # (..., N, K-1)
    over = torch.cat([over, torch.ones_like(over[..., :1])], dim=-1)
    return over.to(torch.int8).argmax(-1)  # first True


def geometric_exit_fractions(exit_costs: ExitCostModel | Sequence[float], budget: float) -> torch.Tensor:
    """
    MSDNet's budgeted allocation: exit fractions proportional to `q**k`, with `q` solved (bisection) so that the
    expected cost equals `budget` exactly (for a budget above the cost of sending every sample to the last exit,
    that cost: every allocation meets it).
    """
    costs = ExitCostModel.of(exit_costs)
    if budget < costs.cheapest - BUDGET_TOLERANCE:
        raise ValueError(f"budget {budget} is below the cheapest exit's cost {costs.cheapest:.4f}.")
    budget = min(float(budget), costs.deepest)
    return tilt_exit_fractions(torch.ones(len(costs), dtype=torch.float64), costs, budget).to(torch.float32)


def tilt_exit_fractions(fractions: torch.Tensor, exit_costs, budgets) -> torch.Tensor:
    """
    Exponentially tilt exit fractions so their expected cost equals the budget: `f'_k ∝ f_k q**k` with `q` solved by
    bisection (`q > 1` moves mass to later exits, `q < 1` to earlier ones). With uniform `fractions` this is MSDNet's
    geometric allocation. Budgets are clipped to the reachable range `[c_0, c_{K-1}]`; every exit keeps a tiny mass
    (1e-9) so any budget in that range is reachable.

    Args:
        fractions (`torch.Tensor` of shape `(..., num_exits)`): non-negative exit fractions (need not sum to 1).
        exit_costs (`ExitCostModel` or `Sequence[float]`): the cost model, or cumulative per-sample exit costs.
        budgets (`float` or `torch.Tensor` broadcastable to `fractions.shape[:-1]`): target expected costs.

    Returns:
        `torch.Tensor` like `fractions`, summing to 1 along the last dimension.
    """
    dtype = fractions.dtype
    fractions = fractions.to(torch.float64)
    costs = ExitCostModel.of(exit_costs)
    budgets = torch.as_tensor(budgets, dtype=torch.float64, device=fractions.device)
    budgets = budgets.clamp(costs.cheapest, costs.deepest).expand(fractions.shape[:-1])
    base = fractions.clamp_min(0) / fractions.clamp_min(0).sum(-1, keepdim=True).clamp_min(1e-300) + 1e-9
    log_base = base.log()
    powers = torch.arange(len(costs), dtype=torch.float64, device=fractions.device)

    def tilted(log_q: torch.Tensor) -> torch.Tensor:
        return torch.softmax(log_base + log_q[..., None] * powers, dim=-1)

    low = torch.full(budgets.shape, -80.0, dtype=torch.float64, device=fractions.device)
    high = torch.full(budgets.shape, 80.0, dtype=torch.float64, device=fractions.device)
    for _ in range(100):  # the expected cost increases with log q
        mid = 0.5 * (low + high)
        over = costs.of_fractions(tilted(mid)) > budgets
        high = torch.where(over, mid, high)
        low = torch.where(over, low, mid)
    return tilted(low).to(dtype)


def global_thresholds(scores: torch.Tensor, costs: ExitCostModel | Sequence[float], budget: float) -> torch.Tensor:
    """
    The highest single threshold (the most samples sent on), shared by every exit but the last, whose cost on the
    samples of `scores` `(N, K)` stays within `budget` (exact search over the scores); the last exit takes the rest.
    """
    costs = ExitCostModel.of(costs)
    candidates = torch.unique(scores[:, :-1])  # sorted ascending; cost is non-decreasing in the threshold
    num_exits = scores.shape[1]

    def cost_at(threshold: torch.Tensor) -> float:  # in float64: the same for any order of the samples
        return float(costs.of_exits(first_exit_over_threshold(scores, threshold.expand(num_exits)), torch.float64))

    if cost_at(candidates[-1] + 1.0) <= budget + 1e-9:  # everyone can go to the last exit
        thresholds = torch.full((num_exits,), math.inf, device=scores.device)
        thresholds[-1] = -math.inf
        return thresholds
    low, high = 0, candidates.numel() - 1  # the lowest candidate sends everyone to exit 0: always affordable
    while low < high:
        mid = (low + high + 1) // 2
        if cost_at(candidates[mid]) <= budget + 1e-9:
            low = mid
        else:
            high = mid - 1
    # every score >= candidates[low] leaves; put the threshold half-way to the next lower score
    threshold = 0.5 * (candidates[low] + candidates[low - 1]) if low > 0 else torch.tensor(-math.inf)
    thresholds = threshold.to(scores.device).expand(num_exits).clone()
    thresholds[-1] = -math.inf
    return thresholds


def match_thresholds(scores: torch.Tensor, fractions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Quantile-matched thresholds for many score sets and fraction vectors at once: walk the exits in order over the
    samples not yet assigned and set `t_k` so that (at least) `ceil(F_k * N)` samples have left by exit `k`, where
    `F_k` is the cumulative fraction; the last exit takes the rest (threshold `-inf`).

    Rounding up the cumulative counts sends samples earlier, never later, so the realized cost on these samples never
    exceeds the expected cost of `fractions`. Thresholds sit half-way between the last score that leaves and the next
    lower one, so float noise in recomputed scores smaller than half that gap does not flip decisions (two adjacent
    float32 scores have no half-way point between them: their gap is the only margin there).

    Args:
        scores (`torch.Tensor` of shape `(S, num_samples, num_exits)`): `S` score sets (e.g. one per budget).
        fractions (`torch.Tensor` of shape `(S, Q, num_exits)`): `Q` target fraction vectors per score set.

    Returns:
        `(thresholds, exits)`: `torch.Tensor` of shape `(S, Q, num_exits)` and the exit every sample takes,
        `torch.LongTensor` of shape `(S, Q, num_samples)`.
    """
    num_sets, num_samples, num_exits = scores.shape
    num_q = fractions.shape[1]
    device = scores.device
    by_exit = scores.transpose(1, 2).contiguous()  # (S, K, N): sort along contiguous memory
    sorted_scores, order = by_exit.sort(dim=-1, descending=True, stable=True)
    # the slack absorbs float noise in `fractions` (a count of 300.00001 stays 300), yet rounds down a sample only
    # where that adds at most 4e-7 to the cost, below the budget tolerance (it bounds the fraction a sample may miss)
    slack = min(1e-3, 4e-7 * num_samples)
    counts = torch.ceil(fractions.double().cumsum(-1) * num_samples - slack).clamp(0, num_samples).long()
    thresholds = torch.full((num_sets, num_q, num_exits), -math.inf, dtype=scores.dtype, device=device)
    exits = torch.full((num_sets, num_q, num_samples), num_exits - 1, dtype=torch.long, device=device)
    remaining = torch.ones(num_sets, num_q, num_samples, dtype=torch.bool, device=device)
    assigned = torch.zeros(num_sets, num_q, dtype=torch.long, device=device)
    shape = (num_sets, num_q, num_samples)
    for k in range(num_exits - 1):
        target = counts[..., k] - assigned  # (S, Q): how many of the remaining samples must leave here
        left = remaining.sum(-1)
        remaining_sorted = remaining.gather(2, order[:, None, k].expand(shape))
        cumulative = remaining_sorted.cumsum(-1, dtype=torch.int32)
        position = (cumulative < target[..., None]).sum(-1).clamp(max=num_samples - 1)  # the target-th remaining
        sorted_k = sorted_scores[:, None, k].expand(shape)
        value = sorted_k.gather(2, position[..., None]).squeeze(-1)
        lower = remaining_sorted & (sorted_k < value[..., None])
        next_value = sorted_k.gather(2, lower.to(torch.int8).argmax(-1, keepdim=True)).squeeze(-1)
        threshold = torch.where(lower.any(-1), 0.5 * (value + next_value), -math.inf)
        threshold = torch.where(target >= left, -math.inf, threshold)  # every remaining sample leaves
        threshold = torch.where(target <= 0, math.inf, threshold)  # nobody leaves
        thresholds[..., k] = threshold
        leaving = remaining & (by_exit[:, None, k] >= threshold[..., None])
        exits = torch.where(leaving, k, exits)
        remaining &= ~leaving
        assigned += leaving.sum(-1)
    return thresholds, exits


def thresholds_for_exit_fractions(scores: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """
    Quantile-matched thresholds for one score set (see [`match_thresholds`]).

    Args:
        scores (`torch.Tensor` of shape `(num_samples, num_exits)`)
        fractions (`torch.Tensor` of shape `(num_exits,)`): target fraction of all samples leaving at each exit.

    Returns:
        `torch.Tensor` of shape `(num_exits,)`.
    """
    fractions = torch.as_tensor(fractions, device=scores.device)
    return match_thresholds(scores[None], fractions[None, None])[0][0, 0]


def check_class_labels(labels, num_samples: int, num_labels: int, matching: str = "`exit_logits`") -> None:
    """
    A clear error unless `labels` is a tensor of `num_samples` integer class indices in `[0, num_labels - 1]`
    (`matching` names what gives `num_samples`).
    """
    if not torch.is_tensor(labels) or labels.shape != (num_samples,):
        shape = tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__
        raise ValueError(f"`labels` must have shape ({num_samples},) to match {matching}, got {shape}.")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"`labels` must be integer class indices, got dtype {labels.dtype}.")
    if int(labels.min()) < 0 or int(labels.max()) >= num_labels:
        raise ValueError(
            f"`labels` must lie in [0, {num_labels - 1}] for {num_labels} classes, got values in "
            f"[{int(labels.min())}, {int(labels.max())}]."
        )


def looks_like_probabilities(exit_logits: torch.Tensor) -> bool:
    """Whether `exit_logits` `(N, K, C)`, with `C >= 2`, are softmax outputs (rows in [0, 1] summing to 1)."""
    if exit_logits.shape[-1] < 2 or exit_logits.numel() == 0:
        return False
    values = exit_logits.detach().float()
    in_unit_interval = bool(((values >= 0) & (values <= 1)).all())
    return in_unit_interval and bool(torch.allclose(values.sum(-1), torch.ones((), device=values.device), atol=1e-3))


def _check_is_budget_grid(budgets) -> None:
    if any(not (0 < b <= 1) for b in budgets):
        raise ValueError(
            f"`budgets` must lie in (0, 1] (fractions of the full model's cost; 1.0 runs it whole), got {list(budgets)}."
        )


def _check_fittable_budgets(budgets) -> None:
    """A fit's budgets lie below 1.0: a budget of 1.0 or more runs the full model, whatever a policy would decide."""
    if any(b >= 1 - BUDGET_TOLERANCE for b in budgets):  # (1.0 once rounded to six decimals)
        raise ValueError(
            f"`budgets` to fit must lie in (0, 1), got {list(budgets)}: a budget of 1.0 runs the full model (every "
            "sample to the last exit, no policy involved), so there is nothing to fit for it."
        )


def _fit_outside_inference_mode(fit):
    """
    Run a policy's `fit` with inference mode off: a fit right after caching the exit outputs under
    `torch.inference_mode()` would otherwise fill the policy with inference tensors, which no later `load_state_dict`
    can update in place. (The caller's `no_grad` stays; fits that train enable gradients themselves.)
    """

    @functools.wraps(fit)
    def fit_with_ordinary_tensors(self, *args, **kwargs):
        with torch.inference_mode(False):
            return fit(self, *args, **kwargs)

    return fit_with_ordinary_tensors


class ExitPolicy(nn.Module):
    r"""
    Base class of exit policies.

    Subclasses set `policy_type`, create their tensors with a leading budget dimension in `__init__` (sized from
    `budgets`, so `from_pretrained` can rebuild them before loading the weights), implement `fit` and `decide`, and
    list their hyperparameters in `hyperparameters()`.

    Args:
        num_exits (`int`): number of exits of the model.
        budgets (`Sequence[float]`, *optional*): the fitted budget grid, ascending; empty until fitted.
    """

    policy_type: ClassVar[str] = ""
    # Whether the policy needs a budget at call time (a fitted, budget-matched policy) or decides on its own.
    requires_budget: ClassVar[bool] = True
    # Whether the policy can be stored in a model (forced exits for tests and benchmarks cannot).
    persistable: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "fit" in vars(cls):
            cls.fit = _fit_outside_inference_mode(cls.fit)

    def __init__(self, num_exits: int, budgets: Sequence[float] | None = None):
        super().__init__()
        if isinstance(num_exits, bool) or not isinstance(num_exits, int) or num_exits < 1:
            raise ValueError(f"`num_exits` must be an integer >= 1, got {num_exits!r}.")
        self.num_exits = int(num_exits)
        self.budgets = [float(b) for b in (budgets or [])]
        _check_is_budget_grid(self.budgets)
        if any(b <= a for a, b in zip(self.budgets, self.budgets[1:])):
            raise ValueError(f"`budgets` must be strictly increasing, got {self.budgets}.")

    def _apply(self, fn, recurse=True):
        """
        Move with the model (`.to(device)`, `.cuda()`), but keep float32 whatever the model's dtype (`.half()`,
        `.to(torch.bfloat16)`): thresholds and scoring weights were fitted in float32, and decisions must stay those
        of the fitted policy. `decide` computes in float32 on half-precision logits and features.
        """

        def keep_dtype(tensor: torch.Tensor) -> torch.Tensor:
            moved = fn(tensor)
            if moved.dtype != tensor.dtype and tensor.is_floating_point():
                return tensor.to(moved.device)  # the original values: a round trip through half would lose bits
            return moved

        return super()._apply(keep_dtype, recurse)

    @property
    def device(self) -> torch.device | None:
        """Where the policy's tensors are (`None` for a policy without tensors, e.g. patience)."""
        tensor = next(self.buffers(), None)
        return None if tensor is None else tensor.device

    # --- configuration ----------------------------------------------------------------------------------------------
    def hyperparameters(self) -> dict:
        """Hyperparameters that, with the budget grid, rebuild this policy (saved in `config.exit_policy`)."""
        return {}

    def get_config(self) -> dict:
        if not self.persistable:
            raise ValueError(f"A {type(self).__name__} cannot be stored in a model.")
        return {
            "policy_type": self.policy_type,
            "num_exits": self.num_exits,
            "budgets": list(self.budgets),
            **self.hyperparameters(),
        }

    def extra_repr(self) -> str:
        return f"num_exits={self.num_exits}, budgets={self.budgets}, " + ", ".join(
            f"{k}={v!r}" for k, v in self.hyperparameters().items()
        )

    @property
    def is_fitted(self) -> bool:
        return len(self.budgets) > 0

    def budget_index(self, budget: float) -> int:
        """Index of the largest fitted budget not above `budget`; a clear error when there is none."""
        if not self.requires_budget:
            raise ValueError(
                f"The {self.policy_type} exit policy ({self.extra_repr()}) is not budget-matched, so it cannot honour "
                f"budget {budget}: call the model without `budget` (stored in the model, it runs as it is; otherwise "
                "pass it as `exit_policy=`), or use a budget-matched policy (e.g. 'eenet' or 'confidence-threshold')."
            )
        if not self.is_fitted:
            raise ValueError(f"The {self.policy_type} exit policy has not been fitted: it has no budgets.")
        budget = validate_budget(budget)
        index = -1
        for i, fitted in enumerate(self.budgets):
            if fitted <= budget + BUDGET_TOLERANCE:
                index = i
        if index < 0:
            raise ValueError(
                f"budget {budget} is below the smallest fitted budget {self.budgets[0]:g} of the "
                f"{self.policy_type} exit policy; use a budget >= {self.budgets[0]:g} (or 1.0 for the full model)."
            )
        return index

    # --- fitting ----------------------------------------------------------------------------------------------------
    def fit(
        self,
        exit_logits: torch.Tensor,
        labels: torch.Tensor,
        exit_costs: ExitCostModel | Sequence[float],
        budgets: Sequence[float],
        exit_features: Sequence[torch.Tensor] | None = None,
    ) -> ExitPolicy:
        """
        Fit the policy for every budget of the grid at once.

        Args:
            exit_logits (`torch.Tensor` of shape `(num_samples, num_exits, num_labels)`): cached logits of every exit
                on the calibration split.
            labels (`torch.LongTensor` of shape `(num_samples,)`): calibration labels.
            exit_costs (`ExitCostModel` or `Sequence[float]`): the model's cost model
                (`ExitCostModel.from_config(config)`), or per-sample exit costs (`config.exit_costs`).
            budgets (`Sequence[float]`): the budgets to fit, each >= the cheapest exit's cost and below 1.0 (a
                budget of 1.0 runs the full model).
            exit_features (`Sequence[torch.Tensor]`, *optional*): per exit, the pooled features `(num_samples, d_k)`
                the exit head received (for policies that use them).

        Returns:
            The fitted policy (`self`).
        """
        raise NotImplementedError

    def _check_exit_outputs(self, exit_logits, exit_features=None) -> None:
        """The shapes `fit` and `simulate` share: logits `(N, num_exits, C)`, one `(N, F_k)` feature tensor per exit."""
        if not torch.is_tensor(exit_logits) or exit_logits.ndim != 3 or exit_logits.shape[1] != self.num_exits:
            shape = tuple(exit_logits.shape) if torch.is_tensor(exit_logits) else type(exit_logits).__name__
            raise ValueError(
                f"`exit_logits` must have shape (num_samples, {self.num_exits}, num_labels), got {shape}."
            )
        if looks_like_probabilities(exit_logits):
            raise ValueError(
                "`exit_logits` look like probabilities (every row lies in [0, 1] and sums to 1), but exit policies take "
                "the exits' logits (or log-probabilities): they apply the softmax themselves. Pass the logits, or "
                "`probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny).log()` (a probability of 0 would "
                "give -inf)."
            )
        if exit_features is None:
            return
        if len(exit_features) != self.num_exits:
            raise ValueError(
                f"`exit_features` must hold one tensor per exit ({self.num_exits}), got {len(exit_features)}."
            )
        for k, features in enumerate(exit_features):
            if not torch.is_tensor(features) or features.ndim != 2 or features.shape[0] != exit_logits.shape[0]:
                shape = tuple(features.shape) if torch.is_tensor(features) else type(features).__name__
                raise ValueError(
                    f"`exit_features[{k}]` must have shape ({exit_logits.shape[0]}, feature_size), got {shape}."
                )

    def _check_calibration_data(self, exit_logits, labels, exit_costs, exit_features=None) -> ExitCostModel:
        """Every check of `fit`'s inputs but the budgets'; returns the cost model."""
        if not torch.is_tensor(exit_logits) or not exit_logits.is_floating_point():
            raise TypeError(f"`exit_logits` must be a floating-point tensor, got {type(exit_logits).__name__}.")
        self._check_exit_outputs(exit_logits, exit_features)
        if exit_logits.shape[0] == 0:
            raise ValueError("Cannot fit an exit policy on zero samples.")
        if not torch.isfinite(exit_logits).all():
            raise ValueError("`exit_logits` contains NaN or infinite values.")
        check_class_labels(labels, exit_logits.shape[0], exit_logits.shape[-1])
        costs = ExitCostModel.of(exit_costs)
        if len(costs) != self.num_exits:
            raise ValueError(f"`exit_costs` must hold {self.num_exits} costs, got {costs.exit_costs}.")
        for k, features in enumerate(exit_features or ()):
            if not torch.isfinite(features).all():
                raise ValueError(f"`exit_features[{k}]` contains NaN or infinite values.")
        return costs

    def _check_fit_inputs(
        self, exit_logits, labels, exit_costs, budgets, exit_features=None
    ) -> tuple[ExitCostModel, list[float]]:
        costs = self._check_calibration_data(exit_logits, labels, exit_costs, exit_features)
        if hasattr(budgets, "tolist"):  # a tensor or an array
            budgets = budgets.tolist()
        if isinstance(budgets, (str, bytes)) or not isinstance(budgets, Sequence):
            raise TypeError(
                f"`budgets` must be a sequence of budgets (e.g. [0.3, 0.5]), got {type(budgets).__name__}: {budgets!r}."
            )
        budgets = [validate_budget(budget, name="budgets") for budget in budgets]
        if not budgets:
            raise ValueError("`budgets` must hold at least one budget.")
        _check_fittable_budgets(budgets)
        if min(budgets) < costs.cheapest - BUDGET_TOLERANCE:
            raise ValueError(
                f"budget {min(budgets)} is below the cheapest exit's cost {costs.cheapest:.4f}: no policy can meet "
                f"it; the smallest budget allowed is {costs.cheapest:.4f}."
            )
        # to six decimals, never below the cheapest exit's cost (a budget at that cost stays meetable)
        budgets = sorted(max(round(float(b), BUDGET_DECIMALS), costs.cheapest) for b in budgets)
        if len(set(budgets)) != len(budgets):
            raise ValueError(f"`budgets` must not repeat a budget, got {budgets}.")
        return costs, budgets

    # --- inference --------------------------------------------------------------------------------------------------
    def initial_state(self, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Per-sample state at the start of a batch (batch-first tensors)."""
        return {}

    def decide(
        self,
        exit_index: int,
        logits: torch.Tensor,
        features: torch.Tensor | None,
        state: dict[str, torch.Tensor],
        budget_index: int | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """
        Which of the active samples leave at exit `exit_index` (never called for the last exit, which takes all).

        Args:
            exit_index (`int`): the exit just computed.
            logits (`torch.FloatTensor` of shape `(batch, num_labels)`): its logits for the active samples.
            features (`torch.FloatTensor` of shape `(batch, d)`, *optional*): the pooled features its head received.
            state (`dict[str, torch.Tensor]`): per-sample state of the active samples.
            budget_index (`int`, *optional*): index into `self.budgets`.

        Returns:
            A `torch.BoolTensor` of shape `(batch,)` (True = exit here) and the updated state.
        """
        raise NotImplementedError

    @torch.no_grad()
    def simulate(
        self,
        exit_logits: torch.Tensor,
        budget_index: int | None,
        exit_features: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """
        The exit every sample takes, from cached exit logits `(num_samples, num_exits, num_labels)`, using the same
        `decide` calls as the early-exit engine, so simulated and real decisions agree whenever the engine's exit
        outputs equal the cached ones (a backbone run on a compacted batch may differ in the last bits). The decisions
        run where the policy's tensors are (e.g. a policy stored in a model on the GPU, with exit outputs cached on the
        CPU); the exits come back on `exit_logits`' device.
        """
        self._check_exit_outputs(exit_logits, exit_features)
        if self.requires_budget:
            if not self.is_fitted:
                raise ValueError(f"The {self.policy_type} exit policy has not been fitted: it has no budgets.")
            if (
                budget_index is None
                or isinstance(budget_index, bool)
                or not isinstance(budget_index, numbers.Integral)
                or not 0 <= budget_index < len(self.budgets)
            ):
                raise ValueError(
                    f"`budget_index` must be an index of the fitted budgets, 0..{len(self.budgets) - 1}, got "
                    f"{budget_index} (`budget_index(budget)` gives the one of a budget)."
                )
        device = self.device
        if device is not None and {exit_logits.device, *(f.device for f in exit_features or ())} != {device}:
            features = None if exit_features is None else [f.to(device) for f in exit_features]
            return self.simulate(exit_logits.to(device), budget_index, features).to(exit_logits.device)
        num_samples = exit_logits.shape[0]
        exits = torch.full((num_samples,), self.num_exits - 1, dtype=torch.long, device=exit_logits.device)
        active = torch.ones(num_samples, dtype=torch.bool, device=exit_logits.device)
        state = self.initial_state(num_samples, exit_logits.device)
        for k in range(self.num_exits - 1):
            features = exit_features[k] if exit_features is not None else None
            with torch.autocast(exit_logits.device.type, enabled=False):  # as the engine decides: in float32
                leave, state = self.decide(k, exit_logits[:, k], features, state, budget_index)
            leave = leave & active
            exits[leave] = k
            active &= ~leave
        return exits


CONFIDENCE_SCORES = ("max_prob", "entropy")


def _probability_confidence(probs: torch.Tensor, score: str) -> torch.Tensor:
    """Confidence `(...)` of probabilities `(..., C)`: `max p` (`"max_prob"`) or `1 - H(p)/log C` (`"entropy"`)."""
    if score == "max_prob":
        return probs.amax(-1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
    return 1.0 - entropy / math.log(max(probs.shape[-1], 2))


def _confidence(logits: torch.Tensor, score: str) -> torch.Tensor:
    """Confidence `(...)` of logits `(..., C)` (see `_probability_confidence`)."""
    return _probability_confidence(logits.float().softmax(-1), score)


@register_exit_policy
class ConfidenceThresholdPolicy(ExitPolicy):
    r"""
    Exit at the first exit whose confidence reaches a per-exit threshold.

    Args:
        num_exits (`int`): number of exits.
        budgets (`Sequence[float]`, *optional*): fitted budget grid.
        score (`str`, *optional*, defaults to `"max_prob"`):
            Confidence score: `"max_prob"` (largest softmax probability) or `"entropy"` (`1 - H(p) / log C`).
        allocation (`str`, *optional*, defaults to `"global"`):
            How thresholds are matched to a budget on the calibration split: `"global"` (one threshold shared by all
            exits, the highest whose calibration cost stays within the budget: DeeBERT / FastBERT / BranchyNet) or
            `"geometric"` (MSDNet: exit fractions proportional to `q**k` with expected cost equal to the budget,
            thresholds by quantile matching, counts rounded so the calibration cost never exceeds the budget).

    Thresholds lie half-way between neighbouring calibration scores, so float noise smaller than half their gap does
    not flip decisions.
    """

    policy_type = "confidence-threshold"

    def __init__(
        self,
        num_exits: int,
        budgets: Sequence[float] | None = None,
        score: str = "max_prob",
        allocation: str = "global",
    ):
        super().__init__(num_exits, budgets)
        if score not in CONFIDENCE_SCORES:
            raise ValueError(f"`score` must be 'max_prob' or 'entropy', got {score!r}.")
        if allocation not in ("global", "geometric"):
            raise ValueError(f"`allocation` must be 'global' or 'geometric', got {allocation!r}.")
        self.score, self.allocation = score, allocation
        self.register_buffer("thresholds", torch.zeros(len(self.budgets), self.num_exits, dtype=torch.float32))

    def hyperparameters(self) -> dict:
        return {"score": self.score, "allocation": self.allocation}

    def confidence(self, logits: torch.Tensor) -> torch.Tensor:
        """Confidence score of logits `(..., num_labels)`."""
        return _confidence(logits, self.score)

    def fit(self, exit_logits, labels, exit_costs, budgets, exit_features=None):
        costs, budgets = self._check_fit_inputs(exit_logits, labels, exit_costs, budgets)
        scores = self.confidence(exit_logits.detach())  # (N, K)
        if self.allocation == "global":
            thresholds = torch.stack([global_thresholds(scores, costs, b) for b in budgets])
        else:
            fractions = torch.stack([geometric_exit_fractions(costs, min(b, costs.deepest)) for b in budgets]).to(
                scores.device
            )
            thresholds = match_thresholds(scores.expand(len(budgets), *scores.shape), fractions[:, None])[0][:, 0]
        self.budgets = budgets
        self.thresholds = thresholds.to(self.thresholds.device)
        return self

    def decide(self, exit_index, logits, features, state, budget_index):
        return self.confidence(logits) >= self.thresholds[budget_index, exit_index], state


class ForcedExitPolicy(ExitPolicy):
    r"""
    Sends each sample to a given exit, whatever its predictions: for tests, benchmarks and timing given exit
    distributions through the real early-exit path. Pass it as `model(**inputs, exit_policy=ForcedExitPolicy(...))`.

    Args:
        exit_indices (`torch.LongTensor` of shape `(batch,)`): the exit of every sample of the next batch.
    """

    policy_type = "forced"
    requires_budget = False
    persistable = False

    def __init__(self, exit_indices: torch.Tensor):
        exit_indices = torch.as_tensor(exit_indices, dtype=torch.long)
        if exit_indices.ndim != 1:
            raise ValueError(
                f"`exit_indices` must be 1-D (one exit per sample), got shape {tuple(exit_indices.shape)}."
            )
        super().__init__(num_exits=int(exit_indices.max()) + 1 if exit_indices.numel() else 1)
        if exit_indices.numel() and int(exit_indices.min()) < 0:
            raise ValueError(f"`exit_indices` must be >= 0, got {exit_indices.tolist()}.")
        self.exit_indices = exit_indices

    def initial_state(self, batch_size, device):
        if self.exit_indices.numel() != batch_size:
            raise ValueError(
                f"ForcedExitPolicy holds {self.exit_indices.numel()} exit indices but the batch has {batch_size} samples."
            )
        return {"target_exit": self.exit_indices.to(device)}

    def decide(self, exit_index, logits, features, state, budget_index):
        return state["target_exit"] <= exit_index, state


class _UnbudgetedPolicy(ExitPolicy):
    """A storable policy that is not budget-matched: it needs no fitting and its cost is whatever it gives."""

    requires_budget = False

    @property
    def is_fitted(self) -> bool:
        return True

    def fit(self, exit_logits, labels, exit_costs, budgets=(), exit_features=None):
        """Nothing to fit (checks the inputs only, so it can run in the same harness as the other policies)."""
        self._check_calibration_data(exit_logits, labels, exit_costs, exit_features)
        return self


@register_exit_policy
class PatiencePolicy(_UnbudgetedPolicy):
    r"""
    PABEE (Zhou et al., 2020): exit once the argmax prediction has stayed the same for `patience` consecutive exits
    (exit `k` leaves when the predictions of exits `k - patience .. k` agree). Not budget-matched: its cost is
    whatever `patience` gives on the data (evaluation tables list one row per `patience`, without a budget).
    `patience = num_exits - 1` never exits early.

    Args:
        num_exits (`int`): number of exits.
        patience (`int`, *optional*, defaults to 1): consecutive agreeing exits needed, `1 .. num_exits - 1`.
        budgets: ignored (kept for the common config format; must be empty).
    """

    policy_type = "patience"

    def __init__(self, num_exits: int, patience: int = 1, budgets: Sequence[float] | None = None):
        super().__init__(num_exits)
        if budgets:
            raise ValueError(
                f"The patience exit policy is not budget-matched: `budgets` must be empty, got {budgets}."
            )
        if self.num_exits < 2:
            raise ValueError(f"The patience exit policy needs at least 2 exits, got num_exits={num_exits}.")
        if isinstance(patience, bool) or not isinstance(patience, int) or not 1 <= patience <= self.num_exits - 1:
            raise ValueError(f"`patience` must be an integer in [1, {self.num_exits - 1}], got {patience!r}.")
        self.patience = patience

    def hyperparameters(self) -> dict:
        return {"patience": self.patience}

    def initial_state(self, batch_size, device):
        return {
            "previous_prediction": torch.full((batch_size,), -1, dtype=torch.long, device=device),
            "agreements": torch.zeros(batch_size, dtype=torch.long, device=device),
        }

    def decide(self, exit_index, logits, features, state, budget_index):
        prediction = logits.argmax(-1)
        same = prediction == state["previous_prediction"]
        agreements = torch.where(same, state["agreements"] + 1, torch.zeros_like(state["agreements"]))
        return agreements >= self.patience, {"previous_prediction": prediction, "agreements": agreements}


@register_exit_policy
class StaticExitPolicy(_UnbudgetedPolicy):
    r"""
    Every sample leaves at exit `exit` (a smaller static model). Not budget-matched: its cost is `exit_costs[exit]`
    (plus the fixed costs of the segments up to it, with segment costs).

    Args:
        num_exits (`int`): number of exits.
        exit (`int`, *optional*, defaults to 0): the exit every sample takes, `0 .. num_exits - 1`.
        budgets: ignored (kept for the common config format; must be empty).
    """

    policy_type = "static"

    def __init__(self, num_exits: int, exit: int = 0, budgets: Sequence[float] | None = None):
        super().__init__(num_exits)
        if budgets:
            raise ValueError(f"The static exit policy is not budget-matched: `budgets` must be empty, got {budgets}.")
        if isinstance(exit, bool) or not isinstance(exit, int) or not 0 <= exit < self.num_exits:
            raise ValueError(f"`exit` must be an integer in [0, {self.num_exits - 1}], got {exit!r}.")
        self.exit = exit

    def hyperparameters(self) -> dict:
        return {"exit": self.exit}

    def decide(self, exit_index, logits, features, state, budget_index):
        # shaped after the logits rather than `torch.full` with a Python bool, which the ONNX export cannot trace
        fill = torch.ones_like if exit_index >= self.exit else torch.zeros_like
        return fill(logits[:, 0], dtype=torch.bool), state


_LOSS_WEIGHTS = {"kl": 1e-3, "budget": 1e-2}


@dataclass
class _Choice:
    """
    What an EENet fit chose per budget: `model` `(M,)` indexes the fitted candidates, `fractions` `(M, K)` are the
    exit fractions to quantile-match, `thresholds` `(M, K)` (optional) replace the matched ones of every budget whose
    row holds no NaN, `heldout_hits` `(M, N)` (optional) are the chosen solutions' correctness on held-out samples,
    and `details` holds per-budget lists for `fit_summary_`.
    """

    model: torch.Tensor
    fractions: torch.Tensor
    details: dict
    thresholds: torch.Tensor | None = None
    heldout_hits: torch.Tensor | None = None


@register_exit_policy
class EENetPaperPolicy(ExitPolicy):
    r"""
    EENet's exit scheduler as published (Ilhan et al., "Adaptive Deep Neural Network Inference Optimization with
    EENet", WACV 2024), with the fixes its released code needs, fitted for a whole budget grid at once.

    Per exit `k` and sample `i`, with `p_k` the softmax of exit `k` over `C` classes:

    1. features `x_k = [p_k, max p_k, 1 - H(p_k) / log C, s_0 .. s_{k-1}]`, the `s_j` being the (clamped,
       detached) scores of the earlier exits;
    2. a linear scoring function `s_k = g_k(x_k)`, initialised to `s_k = max p_k` and trained as P(exit k is right);
    3. assignment MLPs `h_k(x_k)` (hidden size `assignment_hidden_ratio * dim(x)`, used only while fitting) giving
       the soft exit distribution `pi_i = softmax_k h_k(x_k)`;
    4. losses on a minibatch of `batch_size`: (a) BCE between the clamped `s_k` and the correctness of exit `k`, each
       sample weighted by its detached `pi_ik` normalised over the batch; (b) KL from `tau_ik ∝ clamped s_ik` to
       `pi_i` (weight 1e-3); (c) `|sum_k mean_i(pi_ik) c_k - b| / b` (weight 1e-2); alternating every
       `phase_epochs` epochs between (a) alone and (b) + (c). Gradients are zeroed every step and the best state
       is copied (the released code does neither). Early stopping on the total loss (epoch mean over the fitting
       data): a state counts as an improvement when its budget term is below `budget_tolerance` and its total
       loss is 0.2 % below the best so far; a model stops once both phases have run and it has not improved for
       `patience` epochs; fitting ends when every model (budget x restart) has stopped or after `max_epochs`;
    5. thresholds by quantile matching of the learned fractions `f_k = mean_i pi_ik` (see below);
    6. `restarts` restarts (the assignment heads' initialisation and a small perturbation of `g`); the restart with
       the best calibration accuracy is kept;
    7. every budget of the grid is fitted at once: every parameter has a leading (budget x restart) dimension and one
       batched optimisation trains them all.

    Choices and deviations (measured with `benchmarks/bench_policy_fitting.py`, 10,000 synthetic samples, 6 exits):
    - **AdamW** (decoupled weight decay 1e-2) instead of Adam's coupled L2: with the 1e-3 / 1e-2 loss weights, the
      coupled decay gradient outweighs the KL and budget gradients, so the assignment heads stay near zero and the
      learned fractions near uniform (the under-spending the design reports): the median budget error stayed at
      26 % for 120 epochs with Adam, and fell below 1 % within 10 epochs of the first (b) + (c) phase with AdamW;
    - learning rate 1e-2 (the authors use 3e-5, which barely moves the max-prob initialisation): 1e-3 reached the
      same test accuracy in about twice the epochs;
    - `assignment_hidden_ratio` 0.5 (the paper's vision setting) for every modality: the assignment MLPs dominate
      the fitting time, and the text setting (2.0) was about 4x slower for no accuracy we could measure;
    - step 5 tilts the fractions `f_k ∝ f_k q**k` so that `sum_k f_k c_k = b` exactly (the paper only rescales when
      over budget), so a budget is spent rather than wasted; counts are rounded so the calibration cost never
      exceeds the budget;
    - step 6 also considers the fitted solutions of the smaller budgets of the grid (they meet the larger budget
      too): a budget keeps a smaller budget's solution when that one is correct on significantly more calibration
      samples (a paired sign test at 2 standard deviations; on SST-2's 872 dev sentences, keeping any solution that
      was merely more accurate on dev made budgets 0.55-0.95 spend 0.5 and lose test accuracy to every baseline).
      Such a budget then spends less than it may; `fit_summary_` says so in `solution_of_budget`.

    At inference the state is the earlier scores; a sample leaves at the first exit with `s_k >= t_k` (unclamped
    linear score; the last exit takes the rest).

    Args:
        num_exits (`int`): number of exits.
        budgets (`Sequence[float]`, *optional*): fitted budget grid (set by `fit`).
        num_labels (`int`, *optional*): number of classes (set by `fit`; needed to rebuild a fitted policy).
        learning_rate (`float`, *optional*, defaults to 1e-2): Adam learning rate.
        weight_decay (`float`, *optional*, defaults to 1e-2): AdamW (decoupled) weight decay.
        batch_size (`int`, *optional*, defaults to 512): minibatch size.
        max_epochs (`int`, *optional*, defaults to 1000): epoch limit.
        patience (`int`, *optional*, defaults to 10): early-stopping patience in epochs.
        phase_epochs (`int`, *optional*, defaults to 10): epochs per phase of the alternating optimisation.
        restarts (`int`, *optional*, defaults to 2): restarts per budget.
        assignment_hidden_ratio (`float`, *optional*, defaults to 0.5): hidden size of the assignment MLPs relative
            to the feature dimension (the paper: 2 for text, 0.5 for vision).
        budget_tolerance (`float`, *optional*, defaults to 0.05): relative budget error below which a state may be
            kept as the best one.
        seed (`int`, *optional*, defaults to 0): seed of the fitting (initialisation and minibatch order).
    """

    policy_type = "eenet-paper"
    num_rich_features: ClassVar[int] = 0

    def __init__(
        self,
        num_exits: int,
        budgets: Sequence[float] | None = None,
        num_labels: int | None = None,
        learning_rate: float = 1e-2,
        weight_decay: float = 1e-2,
        batch_size: int = 512,
        max_epochs: int = 1000,
        patience: int = 10,
        phase_epochs: int = 10,
        restarts: int = 2,
        assignment_hidden_ratio: float = 0.5,
        budget_tolerance: float = 0.05,
        seed: int = 0,
    ):
        super().__init__(num_exits, budgets)
        for name, value, minimum in (
            ("batch_size", batch_size, 1),
            ("max_epochs", max_epochs, 1),
            ("patience", patience, 1),
            ("phase_epochs", phase_epochs, 1),
            ("restarts", restarts, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
        for name, value in (
            ("learning_rate", learning_rate),
            ("assignment_hidden_ratio", assignment_hidden_ratio),
            ("budget_tolerance", budget_tolerance),
        ):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}.")
        if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"`weight_decay` must be a finite number >= 0, got {weight_decay!r}.")
        if num_labels is not None and (
            isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2
        ):
            raise ValueError(f"`num_labels` must be an integer >= 2, got {num_labels!r}.")
        if self.budgets and num_labels is None:
            raise ValueError(f"A fitted {self.policy_type} policy (budgets {self.budgets}) needs `num_labels`.")
        self.num_labels = num_labels
        self.learning_rate, self.weight_decay, self.batch_size = float(learning_rate), float(weight_decay), batch_size
        self.max_epochs, self.patience, self.phase_epochs, self.restarts = max_epochs, patience, phase_epochs, restarts
        self.assignment_hidden_ratio, self.budget_tolerance = float(assignment_hidden_ratio), float(budget_tolerance)
        self.seed = int(seed)
        self.fit_summary_: list[dict] = []
        self._allocate_buffers()

    def _allocate_buffers(self) -> None:
        num_budgets, num_features = len(self.budgets), self.num_features if self.num_labels else 0
        for name, shape in (
            ("score_weight", (num_budgets, self.num_exits, num_features)),
            ("score_bias", (num_budgets, self.num_exits)),
            ("thresholds", (num_budgets, self.num_exits)),
        ):
            device = getattr(self, name).device if hasattr(self, name) else None
            self.register_buffer(name, torch.zeros(shape, dtype=torch.float32, device=device))

    def hyperparameters(self) -> dict:
        return {
            "num_labels": self.num_labels,
            "learning_rate": self.learning_rate,
            "weight_decay": self.weight_decay,
            "batch_size": self.batch_size,
            "max_epochs": self.max_epochs,
            "patience": self.patience,
            "phase_epochs": self.phase_epochs,
            "restarts": self.restarts,
            "assignment_hidden_ratio": self.assignment_hidden_ratio,
            "budget_tolerance": self.budget_tolerance,
            "seed": self.seed,
        }

    # --- features and scores (shared by fitting and inference) -------------------------------------------------------
    @property
    def fitted_with_features(self) -> bool:
        """Whether the policy uses the exits' pooled features (then `decide` needs them)."""
        return False

    @property
    def num_static_features(self) -> int:
        """Features of `x_k` computed from the exits' outputs (everything but the earlier scores)."""
        return self.num_labels + 2 + self.num_rich_features

    @property
    def num_features(self) -> int:
        return self.num_static_features + self.num_exits - 1

    def _check_exit_inputs(self, exit_index: int, logits: torch.Tensor, features: torch.Tensor | None) -> None:
        """What `decide` needs of exit `exit_index`'s outputs (the logits' classes; subclasses: the features)."""
        if logits.shape[-1] != self.num_labels:
            raise ValueError(
                f"The exit logits have {logits.shape[-1]} classes but the policy was fitted on {self.num_labels}."
            )

    def _static_features(
        self, exit_index: int, logits: torch.Tensor, features: torch.Tensor | None, state: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`[p_k, max p_k, 1 - H(p_k)/log C]` for a batch `(B, C)` of exit `exit_index`'s logits."""
        self._check_exit_inputs(exit_index, logits, features)
        probs = logits.float().softmax(-1)
        confidences = [_probability_confidence(probs, score)[:, None] for score in CONFIDENCE_SCORES]
        return torch.cat([probs, *confidences], dim=-1), state

    def initial_state(self, batch_size, device):
        return {"scores": torch.zeros(batch_size, self.num_exits - 1, device=device)}

    def _exit_score(self, exit_index: int, static: torch.Tensor, earlier: torch.Tensor, budget_index: int):
        """
        Unclamped linear score `g_k(x_k)` `(B,)` of one fitted budget. An element-wise product summed per row, not a
        matrix-vector product, whose summation order (and so its last bit) can depend on the number of rows: a sample's
        score is the same in a batch of one as in the whole calibration split.
        """
        weight = self.score_weight[budget_index, exit_index].float()
        inputs = torch.cat([static, earlier], dim=-1)
        return (inputs * weight).sum(-1) + self.score_bias[budget_index, exit_index].float()

    def _load_from_state_dict(self, *args, **kwargs):
        self.__dict__.pop("_confidence_rules_cache", None)  # `decide`'s rules of the weights replaced now
        super()._load_from_state_dict(*args, **kwargs)

    def _confidence_rules(self, budget_index: int) -> list[tuple[int, float]] | None:
        """
        For a budget whose scoring functions each weigh a single confidence feature (`max p_k` or the entropy
        confidence: the confidence rules EENet's guard may keep), that feature (its index in `CONFIDENCE_SCORES`)
        and its weight per exit; `None` for any other budget. `decide` then skips the other features, giving the same
        scores. Cached until the weights change (a fit, a state-dict load, or an in-place edit that bumps their version;
        edits through `.data` do not, and must be followed by another load).
        """
        weight = self.score_weight
        try:
            key = (weight.data_ptr(), weight._version)
        except RuntimeError:  # a tensor made under `torch.inference_mode` tracks no version: nothing is cached
            key = None
        if key is None or getattr(self, "_confidence_rules_cache", (None,))[0] != key:
            self._confidence_rules_cache = (key, {})
        rules = self._confidence_rules_cache[1]
        if budget_index not in rules:
            weights = weight[budget_index].float().cpu()
            columns = (self.num_labels, self.num_labels + 1)
            nonzero = [set(torch.nonzero(row).flatten().tolist()) for row in weights]
            if all(len(used) == 1 and used <= set(columns) for used in nonzero):
                rules[budget_index] = [
                    (columns.index(column), float(row[column])) for (column,), row in zip(nonzero, weights)
                ]
            else:
                rules[budget_index] = None
        return rules[budget_index]

    def decide(self, exit_index, logits, features, state, budget_index):
        if budget_index is None:
            raise ValueError(f"The {self.policy_type} exit policy needs a budget (a `budget_index`).")
        if not self.is_fitted:
            raise ValueError(f"The {self.policy_type} exit policy has not been fitted.")
        # (a traced decision, e.g. for ONNX, keeps the general path: its budget index is an input there)
        rule = None if torch.jit.is_tracing() else self._confidence_rules(int(budget_index))
        if rule is not None:  # this budget scores with one confidence feature only: nothing else to compute
            self._check_exit_inputs(exit_index, logits, features)
            column, weight = rule[exit_index]
            score = _confidence(logits, CONFIDENCE_SCORES[column]) * weight
            score = score + self.score_bias[budget_index, exit_index].float()
            return score >= self.thresholds[budget_index, exit_index], state
        static, state = self._static_features(exit_index, logits, features, state)
        score = self._exit_score(exit_index, static, state["scores"], budget_index)
        leave = score >= self.thresholds[budget_index, exit_index]
        scores = state["scores"].clone()
        scores[:, exit_index] = score.clamp(0.0, 1.0)
        return leave, {**state, "scores": scores}

    @torch.no_grad()
    def exit_scores(
        self, exit_logits: torch.Tensor, budget_index: int, exit_features: Sequence[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Unclamped scores `(num_samples, num_exits)` of every exit for one fitted budget (what `decide` compares)."""
        static = self._all_static_features(exit_logits, exit_features)
        return self._scores_from_static(static, budget_index)

    def _all_static_features(self, exit_logits, exit_features) -> torch.Tensor:
        state = self.initial_state(exit_logits.shape[0], exit_logits.device)
        static = []
        for k in range(self.num_exits):
            features = exit_features[k] if exit_features is not None else None
            values, state = self._static_features(k, exit_logits[:, k], features, state)
            static.append(values)
        return torch.stack(static, dim=1)  # (N, K, Fs)

    def _scores_from_static(self, static: torch.Tensor, budget_index: int) -> torch.Tensor:
        earlier = static.new_zeros(static.shape[0], self.num_exits - 1)
        scores = []
        for k in range(self.num_exits):
            score = self._exit_score(k, static[:, k], earlier, budget_index)
            scores.append(score)
            if k < self.num_exits - 1:
                earlier = earlier.clone()
                earlier[:, k] = score.clamp(0.0, 1.0)
        return torch.stack(scores, dim=1)

    # --- fitting -------------------------------------------------------------------------------------------------------
    def _prepare_features(self, exit_features, fit_index: torch.Tensor) -> None:
        """Hook for subclasses that use the pooled features (fitted on the fitting slice)."""

    def _after_allocation(self) -> None:
        """Hook for subclasses that fill buffers prepared by `_prepare_features`."""

    def _variant_masks(self) -> torch.Tensor:
        """`(V, K, F)` masks of the scoring weights each variant may use (earlier scores: only `j < k`)."""
        mask = torch.ones(1, self.num_exits, self.num_features)
        static = self.num_static_features
        mask[0, :, static:] = torch.tril(torch.ones(self.num_exits, self.num_exits - 1), diagonal=-1)
        return mask

    def _split(self, num_samples: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        return torch.arange(num_samples), None

    def fit(self, exit_logits, labels, exit_costs, budgets, exit_features=None):
        costs, budgets = self._check_fit_inputs(exit_logits, labels, exit_costs, budgets, exit_features)
        self.__dict__.pop("_confidence_rules_cache", None)  # the weights are fitted anew
        if self.num_exits < 2:
            raise ValueError(f"The {self.policy_type} exit policy needs at least 2 exits, got {self.num_exits}.")
        if exit_logits.shape[-1] < 2:
            raise ValueError(
                f"The {self.policy_type} exit policy needs at least 2 classes, got {exit_logits.shape[-1]}."
            )
        device = exit_logits.device
        exit_logits = exit_logits.detach().float()
        labels = labels.to(device)
        exit_features = [f.detach().float().to(device) for f in exit_features] if exit_features is not None else None
        generator = torch.Generator().manual_seed(self.seed)
        self.budgets, self.num_labels = budgets, int(exit_logits.shape[-1])
        correct = (exit_logits.argmax(-1) == labels[:, None]).float()  # (N, K)
        budget_tensor = torch.tensor(budgets, dtype=torch.float64, device=device)  # exact: 0.65 is not 0.6499999762
        static, trained, chosen = self._fit_and_choose(
            exit_logits, exit_features, correct, costs, budget_tensor, generator
        )
        with torch.no_grad():
            self.score_weight.copy_(trained["weight"][chosen.model])
            self.score_bias.copy_(trained["bias"][chosen.model])
            scores = torch.stack([self._scores_from_static(static, m) for m in range(len(budgets))])  # (M, N, K)
            thresholds, exits = match_thresholds(scores, chosen.fractions[:, None])
            thresholds, exits = thresholds[:, 0], exits[:, 0]
            if chosen.thresholds is not None:  # budgets whose choice brings its own thresholds
                thresholds, exits = _keep_own_thresholds(scores, thresholds, exits, chosen.thresholds)
            self.thresholds.copy_(thresholds)
            hits = correct[torch.arange(correct.shape[0], device=device), exits]  # (M, N)
            cost = costs.of_exits(exits)
            # a larger budget keeps a smaller one's solution only if clearly better (held out, where it was measured)
            evidence = chosen.heldout_hits if chosen.heldout_hits is not None else hits.clone()
            copied_from = list(range(len(budgets)))
            for m in range(1, len(budgets)):
                if _significantly_better(evidence[m - 1], evidence[m]):
                    for buffer in (self.score_weight, self.score_bias, self.thresholds):
                        buffer[m] = buffer[m - 1]
                    hits[m], cost[m], copied_from[m] = hits[m - 1], cost[m - 1], copied_from[m - 1]
                    evidence[m] = evidence[m - 1]
            accuracy = hits.mean(-1)
        self.fit_summary_ = [
            {
                "budget": budget,
                "calibration_accuracy": float(accuracy[m]),
                "calibration_cost": float(cost[m]),
                "solution_of_budget": budgets[copied_from[m]],
                "epochs": trained["epochs"],
                **{key: value[copied_from[m]] for key, value in chosen.details.items()},
            }
            for m, budget in enumerate(budgets)
        ]
        return self

    def _fit_candidates(
        self, exit_logits, exit_features, correct, costs, budgets, fit_index, validation_index, generator
    ):
        """
        Fit every candidate on the fitting slice `fit_index` (`validation_index`, if any, stops the training early):
        the pooled-feature projection, the scoring functions of every variant and restart for every budget, and the
        closed-form candidates. Returns `(static, trained)`: the exits' features `(N, K, Fs)` and the candidates.
        """
        self._prepare_features(exit_features, fit_index)
        self._allocate_buffers()
        self._after_allocation()
        self.to(exit_logits.device)
        with torch.no_grad():
            static = self._all_static_features(exit_logits, exit_features)  # (N, K, Fs)
        # the scoring functions are trained by gradient descent, also when the caller fits under `torch.no_grad()`
        # (every fit runs outside inference mode: `_fit_outside_inference_mode`)
        with torch.enable_grad():
            trained = _train_eenet(
                static,
                correct,
                costs,
                budgets,
                self._variant_masks().to(static.device),
                fit_index,
                validation_index,
                restarts=self.restarts,
                learning_rate=self.learning_rate,
                weight_decay=self.weight_decay,
                batch_size=self.batch_size,
                max_epochs=self.max_epochs,
                patience=self.patience,
                phase_epochs=self.phase_epochs,
                hidden_ratio=self.assignment_hidden_ratio,
                budget_tolerance=self.budget_tolerance,
                max_prob_column=self.num_labels,
                generator=generator,
            )
            return static, self._add_candidates(trained, static, correct, costs, budgets, fit_index)

    def _fit_and_choose(self, exit_logits, exit_features, correct, costs, budgets, generator):
        """
        Fit the candidates and choose one per budget. Returns `(static, trained, chosen)`: the exits' features and
        the candidates fitted on the whole split (see [`~EENetPaperPolicy._fit_candidates`]) and the [`_Choice`].
        """
        fit_index, validation_index = self._split(exit_logits.shape[0], generator)
        fit_index = fit_index.to(exit_logits.device)
        validation_index = validation_index.to(exit_logits.device) if validation_index is not None else None
        static, trained = self._fit_candidates(
            exit_logits, exit_features, correct, costs, budgets, fit_index, validation_index, generator
        )
        return static, trained, self._select(trained, correct, costs, budgets, fit_index, validation_index)

    def _add_candidates(self, trained, static, correct, costs, budgets, fit_index) -> dict:
        """Other solutions the selection may choose besides the trained models (none in the paper)."""
        return trained

    def _select(self, trained, correct, costs, budgets, fit_index, validation_index):
        """
        Step 6: per budget, the restart with the best calibration accuracy, thresholds from its learned fractions.

        Returns:
            [`_Choice`]: the index (into the trained models) chosen per budget, the exit fractions to match and the
            per-budget details for `fit_summary_`.
        """
        num_budgets = budgets.numel()
        fractions = tilt_exit_fractions(trained["fractions"], costs, trained["budget"])  # (P, K)
        _, exits = match_thresholds(trained["scores"], fractions[:, None])  # (P, 1, N)
        accuracy = _accuracy(correct, exits[:, 0]).view(num_budgets, -1)  # (M, V * R)
        best = accuracy.argmax(-1)
        choice = torch.arange(num_budgets, device=best.device) * accuracy.shape[1] + best
        details = {"restart": [int(i) for i in best], "learned_fractions": fractions[choice].tolist()}
        return _Choice(choice, fractions[choice], details)


def _keep_own_thresholds(scores, thresholds, exits, own) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Replace quantile-matched `thresholds` `(..., K)` and the `exits` `(..., N)` they give on `scores` `(..., N, K)`
    by `own` thresholds `(..., K)` wherever a row of `own` holds no NaN (a candidate that brings its own thresholds).
    """
    fixed = ~own.isnan().any(-1)
    thresholds = torch.where(fixed[..., None], own, thresholds)
    return thresholds, torch.where(fixed[..., None], first_exit_over_threshold(scores, own), exits)


def _accuracy(correct: torch.Tensor, exits: torch.Tensor) -> torch.Tensor:
    """Mean correctness `(...,)` of per-sample exits `(..., N)` given `correct` `(N, K)`."""
    return correct[torch.arange(correct.shape[0], device=exits.device), exits].mean(-1)


def _train_eenet(
    static: torch.Tensor,
    correct: torch.Tensor,
    costs: ExitCostModel,
    budgets: torch.Tensor,
    masks: torch.Tensor,
    fit_index: torch.Tensor,
    validation_index: torch.Tensor | None,
    *,
    restarts: int,
    learning_rate: float,
    weight_decay: float,
    batch_size: int,
    max_epochs: int,
    patience: int,
    phase_epochs: int,
    hidden_ratio: float,
    budget_tolerance: float,
    max_prob_column: int,
    generator: torch.Generator,
) -> dict:
    """
    EENet's batched optimisation (steps 2-4 and 7): `P = M * V * R` independent models (budget x feature variant x
    restart, in that order) trained together on shared minibatches; each model's parameters, losses, early stopping
    and best state are its own. Tensors are laid out `(exit, sample, model)` so every exit's work is one matmul.

    Returns:
        A dict with the best `weight` `(P, K, F)` (masked) and `bias` `(P, K)`, the learned exit `fractions`
        `(P, K)` (mean of pi over every sample), the unclamped `scores` `(P, N, K)` of every sample, each model's
        `budget` `(P,)`, the number of `epochs` run and each model's `best_epochs` `(P,)`: the epoch whose end state
        it returns (1-based; 0 for a model never within the budget tolerance, which returns its last state).
    """
    device = static.device
    num_samples, num_exits, num_static = static.shape
    num_budgets, num_variants = budgets.numel(), masks.shape[0]
    num_models = num_budgets * num_variants * restarts
    num_features = masks.shape[-1]
    num_earlier = num_exits - 1
    hidden = max(1, int(round(hidden_ratio * num_features)))
    budget = budgets.float().repeat_interleave(num_variants * restarts)  # (P,)
    mask = masks[None, :, None].expand(num_budgets, num_variants, restarts, num_exits, num_features)
    mask = mask.reshape(num_models, num_exits, num_features).permute(1, 2, 0).contiguous()  # (K, F, P)
    mask_static, mask_earlier = mask[:, :num_static], mask[:, num_static:]
    restart = torch.arange(restarts, device=device).repeat(num_budgets * num_variants)  # (P,)
    inputs_by_exit = static.transpose(0, 1).contiguous()  # (K, N, Fs)

    def uniform(shape, bound):
        return ((torch.rand(shape, generator=generator) * 2 - 1) * bound).to(device)

    weight = torch.zeros(num_exits, num_features, num_models, device=device)
    weight[:, max_prob_column] = 1.0  # s_k = max p_k
    weight = weight + uniform(weight.shape, 0.01) * (restart > 0).float()  # restarts differ slightly
    weight = weight * mask
    score_static = weight[:, :num_static].clone().requires_grad_()  # (K, Fs, P)
    score_earlier = weight[:, num_static:].clone().requires_grad_()  # (K, K-1, P)
    score_bias = torch.zeros(num_exits, num_models, device=device, requires_grad=True)
    bound = num_features**-0.5
    w1_static = uniform((num_exits, num_static, hidden, num_models), bound).requires_grad_()
    w1_earlier = uniform((num_exits, num_earlier, hidden, num_models), bound).requires_grad_()
    b1 = uniform((num_exits, hidden, num_models), bound).requires_grad_()
    w2 = uniform((num_exits, hidden, num_models), hidden**-0.5).requires_grad_()
    b2 = uniform((num_exits, num_models), hidden**-0.5).requires_grad_()
    scoring = [score_static, score_earlier, score_bias]
    assignment = [w1_static, w1_earlier, b1, w2, b2]
    model_dims = [2, 2, 1, 3, 3, 2, 2, 1]  # where the model dimension sits in each parameter
    parameters = scoring + assignment
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
    correct = correct.to(static.dtype)

    def scores_of(index: torch.Tensor):
        inputs = inputs_by_exit[:, index]  # (K, B, Fs)
        base = torch.bmm(inputs, score_static * mask_static) + score_bias[:, None]  # (K, B, P)
        earlier_weight = score_earlier * mask_earlier
        raw, clamped = [], []
        for k in range(num_exits):
            score = base[k]
            for j in range(k):
                score = score + clamped[j] * earlier_weight[k, j]
            raw.append(score)
            clamped.append(score.detach().clamp(0.0, 1.0))
        return inputs, torch.stack(raw), torch.stack(clamped)  # (K, B, P) each

    def log_assignment(inputs: torch.Tensor, clamped: torch.Tensor) -> torch.Tensor:
        batch = inputs.shape[1]
        first = (w1_static * mask_static[:, :, None]).reshape(num_exits, num_static, hidden * num_models)
        hidden_states = torch.bmm(inputs, first).view(num_exits, batch, hidden, num_models)
        earlier = w1_earlier * mask_earlier[:, :, None]
        hidden_states = hidden_states + b1[:, None]
        logits = []
        for k in range(num_exits):
            state = hidden_states[k]
            for j in range(k):  # earlier scores of this model (mask: j < k only)
                state = state + clamped[j][:, None, :] * earlier[k, j]
            logits.append((state.relu() * w2[k]).sum(1) + b2[k])
        return torch.stack(logits).log_softmax(0)  # (K, B, P)

    def losses(index: torch.Tensor, phase_a: bool | None):
        with torch.set_grad_enabled(phase_a is True):
            inputs, raw, clamped = scores_of(index)
        with torch.set_grad_enabled(phase_a is False):
            log_pi = log_assignment(inputs, clamped)
        pi = log_pi.exp()
        target = correct[index].T[..., None]  # (K, B, 1)
        probability = raw.clamp(1e-4, 1 - 1e-4)
        bce = -(target * probability.log() + (1 - target) * (1 - probability).log())
        weights = pi.detach() / pi.detach().sum(1, keepdim=True).clamp_min(1e-12)
        loss_a = (weights * bce).sum((0, 1))  # (P,)
        tau = clamped / clamped.sum(0, keepdim=True).clamp_min(1e-12)
        loss_kl = (tau * (tau.clamp_min(1e-12).log() - log_pi)).sum(0).mean(0)
        loss_budget = (costs.of_fractions(pi.mean(1).T) - budget).abs() / budget
        return loss_a, loss_kl, loss_budget

    def total_of(loss_a, loss_kl, loss_budget):
        return loss_a + _LOSS_WEIGHTS["kl"] * loss_kl + _LOSS_WEIGHTS["budget"] * loss_budget

    def select(values: torch.Tensor, dim: int, chosen: torch.Tensor) -> torch.Tensor:
        shape = [1] * values.ndim
        shape[dim] = num_models
        return chosen.view(shape)

    best = [p.detach().clone() for p in parameters]
    best_total = torch.full((num_models,), math.inf, device=device)
    has_best = torch.zeros(num_models, dtype=torch.bool, device=device)
    best_epochs = torch.zeros(num_models, dtype=torch.long, device=device)
    stale = torch.zeros(num_models, dtype=torch.long, device=device)
    done = torch.zeros(num_models, dtype=torch.bool, device=device)
    num_fit = fit_index.numel()
    epochs = 0
    for epoch in range(max_epochs):
        epochs = epoch + 1
        phase_a = (epoch // phase_epochs) % 2 == 0
        order = fit_index[torch.randperm(num_fit, generator=generator).to(device)]
        total_sum = torch.zeros(num_models, device=device)
        budget_sum = torch.zeros(num_models, device=device)
        for start in range(0, num_fit, batch_size):
            index = order[start : start + batch_size]
            loss_a, loss_kl, loss_budget = losses(index, phase_a)
            if phase_a:
                objective = loss_a.sum()
            else:
                objective = (_LOSS_WEIGHTS["kl"] * loss_kl + _LOSS_WEIGHTS["budget"] * loss_budget).sum()
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()
            with torch.no_grad():
                total_sum += total_of(loss_a, loss_kl, loss_budget).detach() * index.numel()
                budget_sum += loss_budget.detach() * index.numel()
        with torch.no_grad():
            if validation_index is None:
                total, budget_error = total_sum / num_fit, budget_sum / num_fit
            else:
                loss_a, loss_kl, budget_error = losses(validation_index, None)
                total = total_of(loss_a, loss_kl, budget_error)
            improved = (budget_error <= budget_tolerance) & (
                total < best_total - 2e-3 * best_total.abs().clamp_max(1e6)
            )
            improved &= ~done
            for saved, parameter, dim in zip(best, parameters, model_dims):
                saved.copy_(torch.where(select(saved, dim, improved), parameter, saved))
            best_total = torch.where(improved, total, best_total)
            best_epochs = torch.where(improved, epochs, best_epochs)
            has_best |= improved
            stale = torch.where(improved, torch.zeros_like(stale), stale + 1)
            if epochs >= 2 * phase_epochs:  # a model that ran both phases without improving for `patience` stops
                done |= stale >= patience
        if bool(done.all()):
            break
    with torch.no_grad():
        for saved, parameter, dim in zip(best, parameters, model_dims):
            # a model never within the budget tolerance keeps its last state
            parameter.copy_(torch.where(select(saved, dim, has_best), saved, parameter))
        scores, fraction_sum = [], torch.zeros(num_exits, num_models, device=device)
        for start in range(0, num_samples, 2048):
            index = torch.arange(start, min(start + 2048, num_samples), device=device)
            inputs, raw, clamped = scores_of(index)
            scores.append(raw)
            fraction_sum += log_assignment(inputs, clamped).exp().sum(1)
        weight = torch.cat([score_static * mask_static, score_earlier * mask_earlier], dim=1)  # (K, F, P)
    return {
        "weight": weight.permute(2, 0, 1).contiguous(),
        "bias": score_bias.detach().T.contiguous(),
        "fractions": (fraction_sum / num_samples).T.contiguous(),
        "scores": torch.cat(scores, dim=1).permute(2, 1, 0).contiguous(),
        "budget": budget,
        "epochs": epochs,
        "best_epochs": best_epochs,
    }


@register_exit_policy
class EENetPolicy(EENetPaperPolicy):
    r"""
    Our default EENet: the framework of [`EENetPaperPolicy`] (same scoring functions, losses, alternating
    optimisation, restarts, batched budget grid) with the improvements of the design ("Beyond the paper"):

    - **cross-validated choice**: every choice below (feature variant, scoring function, allocation) is made on
      held-out accuracy. The calibration split is cut into `selection_folds` folds; every candidate is fitted once
      without each fold and scored on it, so every calibration sample is held out exactly once (ties: accuracy on the
      whole split); the chosen candidate is then fitted on the whole split, whose thresholds therefore meet the
      budget on it. With fewer than 50 samples per fold (or `selection_folds=1`), a random `validation_fraction` of
      the split is held out instead (it also stops the training early) and the final thresholds are quantile-matched
      on the whole split;
    - **richer features**, as a second feature variant trained beside the paper's: agreement of exit `k`'s
      prediction with the earlier exits (fraction of them predicting the same class), whether the prediction changed
      since the previous exit, how much the probability of the predicted class moved, the previous exit's max-prob,
      and, when `exit_features` are given to `fit`, a `feature_projection_dim`-dimensional whitened PCA projection of
      the pooled representation the exit head received;
    - **regret scoring functions** ([`regret_scoring_functions`], `regret_candidate`): a linear score fitted in
      closed form to rank samples by how likely stopping at exit `k` loses to a later exit (exit `k` wrong, a later
      one right), with global-threshold allocation. Predicting "exit `k` is right" (what max-prob and the paper's
      scoring functions estimate) spends the budget on hard samples that no later exit fixes either; the regret
      score sends on the ones a later exit is likely to fix;
    - **expected-gain scoring functions** ([`expected_gain_scoring_functions`], `gain_candidate`): per budget, a
      linear score fitted in closed form (ridge) to how much going on past exit `k` changes correctness at the exit
      where that budget's own policy would stop the sample (alternating fit and global threshold), with
      global-threshold allocation. Where the regret score counts a sample as fixable when any later exit is right,
      this one looks at the exit the sample would really reach, and at the samples a later exit breaks;
    - **allocation optimised for calibration accuracy**: starting from a candidate's own (tilted) exit fractions, a
      coordinate search moves mass to or from one exit at a time (steps of 1, 3 and 10 points, re-tilted so
      `sum_k f_k c_k = b`) while accuracy on the fitting data improves; it is kept only where it wins held out;
    - **the confidence baselines as candidates**: max-prob and entropy confidence with global-threshold and geometric
      exit fractions are scoring functions of EENet's own family (weight 1 on that feature; a global-threshold
      candidate keeps its single threshold, so it makes exactly the baseline's decisions). Per budget the best of
      them held out (the tuned heuristic) is the default, and the guard replaces it by the best candidate held out
      only when that one wins by `selection_significance` standard deviations of a paired sign test. Taking the
      held-out maximum over all candidates instead chose noise (on the CIFAR-10 ResNet with one held-out slice of
      1,000 images it lost up to 0.76 pt on test to max-prob at budget 0.4).

    What was measured (simulated on the cached exits of the reference models, fitted on their calibration splits and
    evaluated on test; `benchmarks/results/policy_selection_*.md`; margin to the best of the four confidence
    baselines of each budget from 0.3 to 0.9, mean / worst): CIFAR-10 ResNet (CPU-trained) +1.49 / -0.18 pt (with
    the guard at 1 standard deviation +1.47 / -0.23, without the expected-gain candidate +1.46 / -0.18, without the
    regret candidate +1.41 / -0.18, with one held-out slice instead of cross-validation +1.07 / -0.18); CIFAR-10 ViT
    +1.44 / -0.02 (+1.45 / -0.02, +1.48 / -0.02, +1.40 / -0.02, +1.46 / -0.01); SST-2, where no candidate beats
    max-prob on 872 dev sentences, -0.08 / -0.44 (-0.06 / -0.44, -0.08 / -0.44, -0.08 / -0.44, -0.12 / -0.55); the
    paper-faithful EENet -2.15 / -4.08, -0.23 / -1.21 and -0.01 / -0.16. The guard at 2 rather than 1 standard
    deviation changes one or two budgets per model there, within 0.02 pt on average; on a model of `make demo`
    (SST-2, 872 dev sentences, an ad-hoc refit simulated on its test slice) it took the mean / worst margin from
    -0.46 / -1.26 to -0.08 / -0.27. On synthetic exits (`benchmarks/results/policy_fitting.md`: 10,000 calibration
    samples, 6 exits, 20 budgets; mean simulated accuracy over the grid on an independent draw): ours 80.68 %,
    without the expected-gain candidate 80.01 %, without the pooled features 79.52 %; the other parts tie within
    0.1 pt (with one held-out slice 80.58 %, without the regret candidate 80.62 %, without the allocation search
    80.67 %, without the confidence candidates, with the held-out maximum instead of the sign test or with the sign
    test at 1 standard deviation 80.68 %); the paper-faithful EENet 79.02 %, max-prob 78.85 % (global) / 79.19 %
    (geometric). Cross-validation makes fitting about `selection_folds + 1` times slower (30-50 s for 5,000 samples
    and 15 budgets on 2 CPU cores, 174 s instead of 29 s for the synthetic 10,000 and 20 budgets). Dropped: a third
    feature variant and more restarts (fitting time grows linearly with them for no measurable gain on held-out
    data).

    A policy fitted with `exit_features` records their sizes (`feature_sizes`) and needs the pooled features at
    every `decide` (the early-exit engine passes them); without them it raises a `ValueError`.

    Args:
        num_exits, budgets, num_labels, learning_rate, weight_decay, batch_size, max_epochs, patience, phase_epochs,
        restarts, assignment_hidden_ratio, budget_tolerance, seed: as for [`EENetPaperPolicy`] (default: 1 restart
            per feature variant; the two feature variants already give two candidates per budget).
        feature_projection_dim (`int`, *optional*, defaults to 8): size of the projection of the pooled features
            (0: do not use them).
        feature_sizes (`list[int]`, *optional*): sizes of the pooled features of every exit the policy was fitted
            with (set by `fit`; `None` when fitted without features).
        validation_fraction (`float`, *optional*, defaults to 0.2): held-out share of the calibration split without
            cross-validation (no hold-out when it would hold fewer than 50 samples).
        search_allocation (`bool`, *optional*, defaults to `True`): run the allocation search.
        confidence_candidates (`bool`, *optional*, defaults to `True`): let the held-out guard also choose the
            confidence baselines (see above).
        selection_significance (`float`, *optional*, defaults to 2.0): with the confidence candidates, how many
            standard deviations of a paired sign test on held-out samples the best candidate must beat the best
            confidence rule by to replace it (0: the most accurate held-out candidate is chosen). At 1.0 a candidate
            that won on 872 SST-2 dev sentences by chance replaced max-prob at several budgets of a demo model and
            lost up to 1.26 pt to it on test.
        regret_candidate (`bool`, *optional*, defaults to `True`): add the regret scoring functions to the candidates.
        regret_l2 (`float`, *optional*, defaults to 1e-3): L2 penalty of the regret scoring functions' logistic
            regression (on standardised features; the loss is a mean over samples).
        gain_candidate (`bool`, *optional*, defaults to `True`): add the expected-gain scoring functions to the
            candidates.
        gain_l2 (`float`, *optional*, defaults to 1e-2): ridge penalty of the expected-gain scoring functions (on
            standardised features, relative to the number of samples).
        selection_folds (`int`, *optional*, defaults to 5): folds of the cross-validated choice (1: one held-out
            slice of `validation_fraction`).
    """

    policy_type = "eenet"

    def __init__(
        self,
        num_exits: int,
        budgets: Sequence[float] | None = None,
        num_labels: int | None = None,
        learning_rate: float = 1e-2,
        weight_decay: float = 1e-2,
        batch_size: int = 512,
        max_epochs: int = 1000,
        patience: int = 10,
        phase_epochs: int = 10,
        restarts: int = 1,
        assignment_hidden_ratio: float = 0.5,
        budget_tolerance: float = 0.05,
        seed: int = 0,
        feature_projection_dim: int = 8,
        feature_sizes: Sequence[int] | None = None,
        validation_fraction: float = 0.2,
        search_allocation: bool = True,
        confidence_candidates: bool = True,
        selection_significance: float = 2.0,
        regret_candidate: bool = True,
        regret_l2: float = 1e-3,
        gain_candidate: bool = True,
        gain_l2: float = 1e-2,
        selection_folds: int = 5,
    ):
        if isinstance(selection_folds, bool) or not isinstance(selection_folds, int) or selection_folds < 1:
            raise ValueError(f"`selection_folds` must be an integer >= 1, got {selection_folds!r}.")
        for name, value in (
            ("selection_significance", selection_significance),
            ("regret_l2", regret_l2),
            ("gain_l2", gain_l2),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
        if gain_l2 == 0:
            raise ValueError(
                "`gain_l2` must be > 0: the exit features include the class probabilities, which sum to 1, so the "
                "unpenalised regression is singular."
            )
        if (
            isinstance(feature_projection_dim, bool)
            or not isinstance(feature_projection_dim, int)
            or feature_projection_dim < 0
        ):
            raise ValueError(f"`feature_projection_dim` must be an integer >= 0, got {feature_projection_dim!r}.")
        if feature_sizes is not None:
            feature_sizes = list(feature_sizes)
            if len(feature_sizes) != num_exits or any(
                isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in feature_sizes
            ):
                raise ValueError(f"`feature_sizes` must hold {num_exits} positive integers, got {feature_sizes!r}.")
        if not (isinstance(validation_fraction, (int, float)) and 0 <= validation_fraction < 1):
            raise ValueError(f"`validation_fraction` must be in [0, 1), got {validation_fraction!r}.")
        self.feature_projection_dim = feature_projection_dim
        self.feature_sizes = feature_sizes
        self.validation_fraction = float(validation_fraction)
        self.search_allocation = bool(search_allocation)
        self.confidence_candidates = bool(confidence_candidates)
        self.selection_significance = float(selection_significance)
        self.regret_candidate = bool(regret_candidate)
        self.regret_l2 = float(regret_l2)
        self.gain_candidate = bool(gain_candidate)
        self.gain_l2 = float(gain_l2)
        self.selection_folds = selection_folds
        super().__init__(
            num_exits,
            budgets,
            num_labels=num_labels,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            batch_size=batch_size,
            max_epochs=max_epochs,
            patience=patience,
            phase_epochs=phase_epochs,
            restarts=restarts,
            assignment_hidden_ratio=assignment_hidden_ratio,
            budget_tolerance=budget_tolerance,
            seed=seed,
        )

    def hyperparameters(self) -> dict:
        return {
            **super().hyperparameters(),
            "feature_projection_dim": self.feature_projection_dim,
            "feature_sizes": list(self.feature_sizes) if self.feature_sizes is not None else None,
            "validation_fraction": self.validation_fraction,
            "search_allocation": self.search_allocation,
            "confidence_candidates": self.confidence_candidates,
            "selection_significance": self.selection_significance,
            "regret_candidate": self.regret_candidate,
            "regret_l2": self.regret_l2,
            "gain_candidate": self.gain_candidate,
            "gain_l2": self.gain_l2,
            "selection_folds": self.selection_folds,
        }

    @property
    def fitted_with_features(self) -> bool:
        return self.feature_sizes is not None

    @property
    def projection_size(self) -> int:
        return self.feature_projection_dim if self.feature_sizes is not None else 0

    @property
    def num_rich_features(self) -> int:
        return 4 + self.projection_size

    def _allocate_buffers(self) -> None:
        super()._allocate_buffers()
        width = max(self.feature_sizes) if self.feature_sizes is not None else 0
        device = self.score_weight.device
        self.register_buffer("feature_mean", torch.zeros(self.num_exits, width, dtype=torch.float32, device=device))
        self.register_buffer(
            "feature_projection",
            torch.zeros(self.num_exits, width, self.projection_size, dtype=torch.float32, device=device),
        )

    def initial_state(self, batch_size, device):
        num_labels = self.num_labels or 0
        return {
            **super().initial_state(batch_size, device),
            "votes": torch.zeros(batch_size, num_labels, device=device),
            "previous_probs": torch.zeros(batch_size, num_labels, device=device),
        }

    def _check_exit_inputs(self, exit_index, logits, features):
        super()._check_exit_inputs(exit_index, logits, features)
        if not self.projection_size:
            return
        if features is None:
            raise ValueError(
                f"This {self.policy_type} exit policy was fitted with exit features (sizes {self.feature_sizes}) "
                "and needs the pooled features of every exit at inference; got `features=None`. Pass them (the "
                "early-exit engine does), or refit without `exit_features`."
            )
        size = self.feature_sizes[exit_index]
        if features.ndim != 2 or features.shape[-1] != size:
            raise ValueError(
                f"Exit {exit_index}'s features must have shape (batch, {size}) as when the policy was fitted, got "
                f"{tuple(features.shape)}."
            )

    def _static_features(self, exit_index, logits, features, state):
        base, state = super()._static_features(exit_index, logits, features, state)
        probs = base[:, : self.num_labels]
        prediction = probs.argmax(-1, keepdim=True)
        if exit_index == 0:
            rich = base.new_zeros(base.shape[0], 4)
        else:
            previous = state["previous_probs"]
            agreement = state["votes"].gather(1, prediction) / exit_index
            same = (previous.argmax(-1, keepdim=True) == prediction).float()
            movement = probs.gather(1, prediction) - previous.gather(1, prediction)
            rich = torch.cat([agreement, same, movement, previous.amax(-1, keepdim=True)], dim=-1)
        parts = [base, rich]
        if self.projection_size:
            size = self.feature_sizes[exit_index]
            centered = features.float() - self.feature_mean[exit_index, :size].float()
            # in float64, rounded to float32: immune to TF32 matrix products on GPUs and, but for one rounding in
            # ~1e9, to the batch size's summation order, so a sample is projected alike alone and in the whole split
            projection = self.feature_projection[exit_index, :size].double()
            parts.append((centered.double() @ projection).float())
        votes = state["votes"].scatter_add(1, prediction, torch.ones_like(prediction, dtype=state["votes"].dtype))
        return torch.cat(parts, dim=-1), {**state, "votes": votes, "previous_probs": probs}

    # --- fitting -------------------------------------------------------------------------------------------------------
    def _split(self, num_samples, generator):
        num_validation = int(round(self.validation_fraction * num_samples))
        if num_validation < 50 or num_samples - num_validation < 50:
            return torch.arange(num_samples), None
        permutation = torch.randperm(num_samples, generator=generator)
        return permutation[num_validation:].sort().values, permutation[:num_validation].sort().values

    def _prepare_features(self, exit_features, fit_index):
        if exit_features is None or self.feature_projection_dim == 0:
            self.feature_sizes = None
            self._projections = None
            return
        self.feature_sizes = [int(f.shape[-1]) for f in exit_features]
        self._projections = []
        for features in exit_features:  # whitened PCA on the fitting slice
            sample = features[fit_index.to(features.device)].double()
            mean = sample.mean(0)
            covariance = (sample - mean).T @ (sample - mean) / max(sample.shape[0] - 1, 1)
            eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
            size = min(self.feature_projection_dim, eigenvectors.shape[1])
            top = eigenvectors[:, -size:].flip(-1) / eigenvalues[-size:].flip(-1).clamp_min(1e-12).sqrt()
            top = F.pad(top, (0, self.feature_projection_dim - size))
            signs = torch.sign(top.sum(0))  # a deterministic orientation
            self._projections.append((mean.float(), (top * torch.where(signs == 0, 1.0, signs)).float()))

    def _variant_masks(self):
        rich = super()._variant_masks()[0]
        basic = rich.clone()
        basic[:, self.num_labels + 2 : self.num_static_features] = 0.0  # the paper's features only
        return torch.stack([basic, rich])

    def _after_allocation(self) -> None:
        if getattr(self, "_projections", None):
            with torch.no_grad():
                for k, (mean, projection) in enumerate(self._projections):
                    self.feature_mean[k, : mean.numel()] = mean.to(self.feature_mean.device)
                    self.feature_projection[k, : mean.numel()] = projection.to(self.feature_projection.device)

    # The confidence baselines inside EENet's family: weight 1 on one confidence feature, per-exit thresholds.
    CONFIDENCE_CANDIDATES: ClassVar[tuple[str, ...]] = (
        "max-prob (global)",
        "max-prob (geometric)",
        "entropy (global)",
        "entropy (geometric)",
    )
    REGRET_CANDIDATE: ClassVar[str] = "regret (global)"
    GAIN_CANDIDATE: ClassVar[str] = "gain (global)"

    @property
    def extra_candidates(self) -> tuple[str, ...]:
        """The closed-form candidates appended after the trained models of every budget, in order (the confidence
        rules last: the guard finds them there)."""
        regret = (self.REGRET_CANDIDATE,) if self.regret_candidate else ()
        gain = (self.GAIN_CANDIDATE,) if self.gain_candidate else ()
        return regret + gain + (self.CONFIDENCE_CANDIDATES if self.confidence_candidates else ())

    def _add_candidates(self, trained, static, correct, costs, budgets, fit_index) -> dict:
        """
        Add the closed-form candidates of the selection, each an EENet scoring function with its own exit fractions
        on the fitting slice:

        - the **regret** scoring functions ([`regret_scoring_functions`], fitted on the fitting slice) with
          global-threshold fractions;
        - the **expected-gain** scoring functions ([`expected_gain_scoring_functions`], one set per budget, fitted on
          the fitting slice) with global-threshold fractions;
        - the **confidence baselines** (`s_k = max p_k`, or `1 - H(p_k)/log C`: weight 1 on that feature) with
          global-threshold or geometric fractions, so the held-out guard keeps any other candidate only where it is
          at least as accurate on held-out data as the best of them.
        """
        names = self.extra_candidates
        extended = {**trained, "thresholds": torch.full_like(trained["fractions"], math.nan)}  # NaN: matched
        if not names:
            return extended
        num_budgets, num_models = budgets.numel(), trained["weight"].shape[0]
        per_budget = num_models // num_budgets
        scoring = {}
        for column, score_name in enumerate(("max-prob", "entropy"), start=self.num_labels):
            weight = torch.zeros_like(trained["weight"][0])
            weight[:, column] = 1.0
            scoring[score_name] = (weight, torch.zeros_like(trained["bias"][0]))
        if self.regret_candidate:
            weight, bias = regret_scoring_functions(
                static[fit_index], correct[fit_index], l2=self.regret_l2, max_prob_column=self.num_labels
            )
            scoring["regret"] = (F.pad(weight, (0, self.num_exits - 1)), bias)  # no weight on earlier scores
        if self.gain_candidate:  # one scoring function per budget: the gain depends on where the policy stops
            scoring["gain"] = []
            for m in range(num_budgets):
                weight, bias = expected_gain_scoring_functions(
                    static[fit_index],
                    correct[fit_index],
                    costs,
                    float(budgets[m]),
                    l2=self.gain_l2,
                )
                scoring["gain"].append((F.pad(weight, (0, self.num_exits - 1)), bias))
        candidates = {key: [] for key in ("weight", "bias", "scores", "fractions", "thresholds")}

        def scores_of(weight, bias):
            return torch.einsum("nkf,kf->nk", static, weight[:, : static.shape[-1]]) + bias  # (N, K)

        for name in names:
            score_name, allocation = name.split(" (")
            per_budget_scoring = scoring[score_name] if score_name == "gain" else None
            if per_budget_scoring is None:
                weight, bias = scoring[score_name]
                scores = scores_of(weight, bias)
            for m in range(num_budgets):
                budget = float(budgets[m])
                if per_budget_scoring is not None:
                    weight, bias = per_budget_scoring[m]
                    scores = scores_of(weight, bias)
                if allocation.startswith("global"):
                    thresholds = global_thresholds(scores[fit_index], costs, budget)
                    fractions = exit_fractions(
                        first_exit_over_threshold(scores[fit_index], thresholds), self.num_exits
                    )
                else:
                    thresholds = torch.full((self.num_exits,), math.nan, device=scores.device)
                    fractions = geometric_exit_fractions(costs, budget).to(scores.device)
                candidates["thresholds"].append(thresholds)
                candidates["weight"].append(weight)
                candidates["bias"].append(bias)
                candidates["scores"].append(scores)
                candidates["fractions"].append(fractions)
        for key, values in candidates.items():
            # candidate-major -> budget-major, appended after each budget's trained models
            added = torch.stack(values).view(len(names), num_budgets, *values[0].shape).transpose(0, 1)
            own = extended[key].view(num_budgets, per_budget, *extended[key].shape[1:])
            extended[key] = torch.cat([own, added.to(own.dtype)], dim=1).flatten(0, 1)
        extended["budget"] = budgets.float().repeat_interleave(per_budget + len(names))
        return extended

    def _candidate_name(self, index: int) -> str:
        """The name of candidate `index` of a budget: a trained variant and restart, or a closed-form candidate."""
        trained = len(self._variant_masks()) * self.restarts
        if index >= trained:
            return self.extra_candidates[index - trained]
        return f"{'basic' if index // self.restarts == 0 else 'rich'} (restart {index % self.restarts})"

    def _fit_and_choose(self, exit_logits, exit_features, correct, costs, budgets, generator):
        """
        With `selection_folds >= 2` (and at least 50 samples per fold): every candidate is fitted `selection_folds`
        times, each time without one fold, and scored on the fold it did not see, so every calibration sample is
        held out once; the choice per budget is made on those held-out hits, and the chosen candidate is then fitted
        on the whole split. Otherwise one held-out slice (`validation_fraction`) decides, as in [`EENetPaperPolicy`].
        """
        num_samples, device = exit_logits.shape[0], exit_logits.device
        if self.selection_folds < 2 or num_samples // self.selection_folds < 50:
            return super()._fit_and_choose(exit_logits, exit_features, correct, costs, budgets, generator)
        permutation = torch.randperm(num_samples, generator=generator).to(device)
        held_out = []
        for fold in permutation.chunk(self.selection_folds):
            fit_mask = torch.ones(num_samples, dtype=torch.bool, device=device)
            fit_mask[fold] = False
            fit_index = fit_mask.nonzero().flatten()
            _, trained = self._fit_candidates(
                exit_logits, exit_features, correct, costs, budgets, fit_index, None, generator
            )
            held_out.append(self._evaluate_allocations(trained, correct, costs, budgets, fit_index, fold)[2])
        hits = torch.cat(held_out, dim=-1)  # (M, candidates * allocations, N): every sample held out once
        everything = torch.arange(num_samples, device=device)
        static, trained = self._fit_candidates(
            exit_logits, exit_features, correct, costs, budgets, everything, None, generator
        )
        allocations, fit_hits, _ = self._evaluate_allocations(trained, correct, costs, budgets, everything, None)
        totals = hits.sum(-1)
        best = (totals * (num_samples + 1) + fit_hits).argmax(-1)  # held-out hits first, then the whole split's
        if self.confidence_candidates:
            best = self._guard_against_confidence(best, totals, hits, len(allocations))
        chosen = self._chosen(best, allocations, hits, trained, costs, budgets)
        chosen.heldout_hits = hits[torch.arange(best.numel(), device=best.device), best]  # (M, N)
        return static, trained, chosen

    def _evaluate_allocations(self, trained, correct, costs, budgets, fit_index, evaluation_index):
        """
        Every candidate with every allocation (its own fractions tilted to the budget and, with `search_allocation`,
        the searched ones), thresholds quantile-matched on the fitting slice.

        Returns:
            `(allocations, fit_hits, evaluation_hits)`: the `(P, K)` fractions of every allocation, the correct counts
            on the fitting slice `(M, candidates * allocations)` and the per-sample correctness on `evaluation_index`
            `(M, candidates * allocations, Ne)` (`None` without `evaluation_index`), allocation fastest.
        """
        num_budgets = budgets.numel()
        scores = trained["scores"]  # (P, N, K)
        learned = tilt_exit_fractions(trained["fractions"], costs, trained["budget"])  # (P, K)
        fit_scores, fit_correct = scores[:, fit_index], correct[fit_index]
        allocations = [learned]
        if self.search_allocation:
            allocations.append(search_exit_fractions(fit_scores, fit_correct, learned, costs, trained["budget"]))
        fit_hits, evaluation_hits = [], []
        for index, fractions in enumerate(allocations):
            thresholds, exits = match_thresholds(fit_scores, fractions[:, None])
            if index == 0:  # candidates with their own thresholds (global ones) keep them
                own = trained["thresholds"][:, None]  # (P, 1, K)
                thresholds, exits = _keep_own_thresholds(fit_scores[:, None], thresholds, exits, own)
            fit_hits.append(fit_correct[torch.arange(fit_correct.shape[0]), exits[:, 0]].sum(-1))
            if evaluation_index is not None:
                exits = first_exit_over_threshold(scores[:, evaluation_index][:, None], thresholds)[:, 0]
                evaluation_hits.append(correct[evaluation_index][torch.arange(evaluation_index.numel()), exits])
        fit_hits = torch.stack(fit_hits, -1).view(num_budgets, -1)
        if evaluation_index is not None:
            evaluation_hits = torch.stack(evaluation_hits, 1).view(num_budgets, fit_hits.shape[1], -1)
        return allocations, fit_hits, evaluation_hits if evaluation_index is not None else None

    def _select(self, trained, correct, costs, budgets, fit_index, validation_index):
        evaluation_index = validation_index if validation_index is not None else fit_index
        allocations, fit_hits, hits = self._evaluate_allocations(
            trained, correct, costs, budgets, fit_index, evaluation_index
        )
        if validation_index is None:
            keys = totals = fit_hits
        else:  # held-out hits first, then the fitting slice's (lexicographic, exact)
            keys = hits.sum(-1) * (fit_index.numel() + 1) + fit_hits
            totals = hits.sum(-1) + fit_hits
        best = keys.argmax(-1)
        if self.confidence_candidates:
            best = self._guard_against_confidence(best, totals, hits, len(allocations))
        return self._chosen(best, allocations, hits, trained, costs, budgets)

    def _chosen(self, best, allocations, hits, trained, costs, budgets) -> _Choice:
        """
        The model index, fractions and `fit_summary_` details of the chosen candidate and allocation per budget. A
        chosen global-threshold candidate (e.g. the max-prob rule) keeps its single threshold, set on the whole
        calibration split, so it makes exactly that rule's decisions.
        """
        num_budgets, num_allocations = best.numel(), len(allocations)
        model = torch.arange(num_budgets, device=best.device) * (hits.shape[1] // num_allocations)
        model = model + best // num_allocations
        allocation = best % num_allocations
        fractions = torch.stack(allocations)[allocation, model]
        thresholds = torch.full((num_budgets, self.num_exits), math.nan, device=best.device)
        for m in range(num_budgets):
            if int(allocation[m]) == 0 and not trained["thresholds"][model[m]].isnan().any():
                thresholds[m] = global_thresholds(trained["scores"][model[m]], costs, float(budgets[m]))
        details = {
            "scoring": [self._candidate_name(int(i)) for i in best // num_allocations],
            "allocation": ["learned" if int(a) == 0 else "searched" for a in allocation],
            "learned_fractions": allocations[0][model].tolist(),
            "fractions": fractions.tolist(),
            "heldout_accuracy": [float(hits[m, int(i)].float().mean()) for m, i in enumerate(best)],
        }
        return _Choice(model, fractions, details, thresholds=thresholds)

    def _guard_against_confidence(self, best, totals, validation_hits, num_allocations) -> torch.Tensor:
        """
        Per budget, the best confidence rule (a confidence candidate with its own allocation, the most accurate on
        the whole calibration split: the tuned heuristic) stays chosen unless the best candidate on held-out data
        beats it there by `selection_significance` standard deviations of a paired sign test.
        """
        num_candidates = totals.shape[1] // num_allocations
        first_rule = num_candidates - len(self.CONFIDENCE_CANDIDATES)
        rules = torch.arange(first_rule, num_candidates, device=totals.device) * num_allocations  # own allocation
        chosen = []
        for m, challenger in enumerate(best.tolist()):
            rule = int(rules[totals[m, rules].argmax()])
            hits = validation_hits[m]
            keep = challenger != rule and _significantly_better(
                hits[challenger], hits[rule], z=self.selection_significance
            )
            chosen.append(challenger if keep else rule)
        return torch.tensor(chosen, device=best.device)


def regret_scoring_functions(
    static: torch.Tensor, correct: torch.Tensor, l2: float = 1e-3, max_prob_column: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    Linear scoring functions that rank samples by how little stopping at exit `k` loses: `s_k` is minus the
    log-odds, fitted by L2-regularised logistic regression on the exit's features, that exit `k` is wrong while a
    later exit is right (the sample's *regret* of stopping at `k`).

    A confidence rule ranks by the chance that exit `k` is right, so it spends the budget on every uncertain sample,
    including the hard ones that no later exit gets right either; the regret score sends on the samples a later exit
    is likely to fix. Measured as a candidate of [`EENetPolicy`] on the cached exits of the reference models
    (`benchmarks/results/policy_selection_*.md`, simulated on test, mean margin to the best confidence baseline of
    each budget from 0.3 to 0.9): +1.44 pt with it and +1.40 without it on the CIFAR-10 ViT; on the CIFAR-10 ResNet
    +1.49 and +1.41; on SST-2 (872 dev sentences, where EENet keeps max-prob at every budget) -0.08 and -0.08.

    Args:
        static (`torch.Tensor` of shape `(N, K, F)`): the exits' features (without earlier scores).
        correct (`torch.Tensor` of shape `(N, K)`): whether each exit's prediction is correct.
        l2 (`float`, *optional*, defaults to 1e-3): L2 penalty on the weights of the standardised features (each
            divided by its spread, at least 0.01; the loss is a mean).
        max_prob_column (`int`, *optional*): the max-prob feature's column, the score of an exit whose regret is
            constant on these samples (no later exit ever fixes it, or always does); `None`: a zero score.

    Returns:
        `(weight, bias)` of shapes `(K, F)` and `(K,)` on the features' scale (the last exit's are zero: it takes
        every sample that is left).
    """
    num_exits, num_features = static.shape[1], static.shape[2]
    weight = static.new_zeros(num_exits, num_features)
    bias = static.new_zeros(num_exits)
    for k in range(num_exits - 1):
        regret = (correct[:, k + 1 :].amax(-1) > correct[:, k]).double()
        inputs = static[:, k].double()
        mean, scale, used = _standardisation(inputs)
        if not used.any() or regret.min() == regret.max():
            if max_prob_column is not None:
                weight[k, max_prob_column] = 1.0
            continue
        parameters = _logistic_regression((inputs[:, used] - mean[used]) / scale[used], regret, l2)
        weight[k, used], bias[k] = _negated_on_feature_scale(parameters, mean[used], scale[used], weight.dtype)
    return weight, bias


def expected_gain_scoring_functions(
    static: torch.Tensor,
    correct: torch.Tensor,
    costs: ExitCostModel | Sequence[float],
    budget: float,
    l2: float = 1e-2,
    iterations: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    Linear scoring functions for one budget that rank samples by what continuing past exit `k` is expected to
    change: `s_k` is minus a ridge regression, on the exit's features, of the *gain* `correct[stop] - correct[k]`
    (+1, 0 or -1), where `stop` is the exit at which the budget's own policy would stop the sample if it went on.

    Unlike the regret score ([`regret_scoring_functions`]), which counts a sample as fixable when *any* later exit
    is right, the gain looks at the exit the sample would really reach, and also counts the samples a later exit
    gets wrong after exit `k` got them right. The policy and its targets depend on each other, so they are fitted
    by alternation (a form of policy iteration for optimal stopping): the first fit takes the last exit as `stop`;
    each following one takes the exits given by the previous fit's scores with the global threshold that meets the
    budget on these samples.

    Measured as a candidate of [`EENetPolicy`] (`benchmarks/results/policy_selection_*.md`, simulated on test, mean
    margin to the best confidence baseline of each budget from 0.3 to 0.9, with it and without it): CIFAR-10 ResNet
    +1.49 and +1.46 pt (up to +0.32 pt at one budget), ViT +1.44 and +1.48 (chosen at 0.25-0.45, where it is up to
    0.37 pt behind the choice made without it, at 0.35), SST-2 -0.08 and -0.08 (never chosen there); on the synthetic
    exits of `benchmarks/results/policy_fitting.md`, 80.68 % and 80.01 % mean accuracy.

    Args:
        static (`torch.Tensor` of shape `(N, K, F)`): the exits' features (without earlier scores).
        correct (`torch.Tensor` of shape `(N, K)`): whether each exit's prediction is correct.
        costs (`ExitCostModel` or `Sequence[float]`): the cost model the budget is met in, or per-sample exit costs.
        budget (`float`): the budget the policy is fitted for.
        l2 (`float`, *optional*, defaults to 1e-2): ridge penalty on the weights of the standardised features
            (each divided by its spread, at least 0.01), relative to the number of samples.
        iterations (`int`, *optional*, defaults to 4): fits in all (the first against the last exit).

    Returns:
        `(weight, bias)` of shapes `(K, F)` and `(K,)` on the features' scale (the last exit's are zero: it takes
        every sample that is left).
    """
    if iterations < 1:
        raise ValueError(f"`iterations` must be >= 1, got {iterations}.")
    num_samples, num_exits, num_features = static.shape
    correct = correct.double()
    inputs = static.double()
    mean, scale, used = _standardisation(inputs)  # (K, F) each
    stop = torch.full((num_samples, num_exits), num_exits - 1, dtype=torch.long, device=static.device)
    weight = bias = None
    for _ in range(iterations):
        if weight is not None:  # where a sample that goes on past exit k stops under the previous fit's policy
            scores = torch.einsum("nkf,kf->nk", static, weight) + bias
            exits_over = scores >= global_thresholds(scores, costs, budget)  # (N, K)
            exits_over[:, -1] = True  # the last exit takes the rest
            for k in range(num_exits - 2, -1, -1):
                stop[:, k] = torch.where(exits_over[:, k + 1], k + 1, stop[:, k + 1])
        weight = static.new_zeros(num_exits, num_features)
        bias = static.new_zeros(num_exits)
        for k in range(num_exits - 1):
            gain = correct.gather(1, stop[:, k : k + 1]).squeeze(1) - correct[:, k]
            if not used[k].any() or gain.min() == gain.max():
                bias[k] = -float(gain.mean())  # nothing to tell samples apart: the exit's average gain
                continue
            standardised = (inputs[:, k, used[k]] - mean[k, used[k]]) / scale[k, used[k]]
            design = torch.cat([standardised, standardised.new_ones(num_samples, 1)], dim=1)
            penalty = l2 * num_samples * torch.eye(design.shape[1], dtype=design.dtype, device=design.device)
            penalty[-1, -1] = 0.0  # the intercept is not penalised
            parameters = torch.linalg.solve(design.T @ design + penalty, design.T @ gain)
            weight[k, used[k]], bias[k] = _negated_on_feature_scale(
                parameters, mean[k, used[k]], scale[k, used[k]], weight.dtype
            )
    return weight, bias


# The closed-form scoring functions standardise their features (probabilities and confidences in [0, 1]) before the
# L2 penalty, but never by less than this spread. A feature that barely varies on the calibration data (a confidence
# near 1 everywhere) would otherwise get a weight of up to 1/std on its own scale, and multiply the float rounding of
# the feature (which differs between devices, kernels and batch compositions) into the score by as much: decisions
# near a threshold would then depend on where the model runs.
_MIN_FEATURE_SCALE = 1e-2


def _standardisation(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    `(mean, scale, used)` of features `inputs` `(N, ..., F)` over the samples: `scale` is the standard deviation, at
    least `_MIN_FEATURE_SCALE`; `used` marks the features that vary at all (a constant one tells no sample apart).
    """
    std = inputs.std(0) if inputs.shape[0] > 1 else torch.zeros_like(inputs[0])  # one sample: nothing varies
    return inputs.mean(0), std.clamp_min(_MIN_FEATURE_SCALE), std > 1e-6


def _negated_on_feature_scale(
    parameters: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, float]:
    """
    `(weight, bias)` of minus the linear model `parameters` (weights, then the bias) fitted on standardised features
    `(x - mean) / scale`, on the features' own scale (`weight` in `dtype`): `x @ weight + bias` is
    `-((x - mean) / scale @ w + b)`.
    """
    scaled = parameters[:-1] / scale
    return (-scaled).to(dtype), float((scaled * mean).sum() - parameters[-1])


def _logistic_regression(inputs: torch.Tensor, targets: torch.Tensor, l2: float) -> torch.Tensor:
    """L2-regularised logistic regression (L-BFGS): the weights of `inputs` `(N, F)` followed by the bias."""
    parameters = torch.zeros(inputs.shape[1] + 1, dtype=inputs.dtype, device=inputs.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([parameters], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        logits = inputs @ parameters[:-1] + parameters[-1]
        loss = F.binary_cross_entropy_with_logits(logits, targets) + l2 * parameters[:-1].square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return parameters.detach()


def _significantly_better(hits: torch.Tensor, other_hits: torch.Tensor, z: float = 2.0) -> bool:
    """
    Whether the solution with per-sample correctness `hits` beats the one with `other_hits` on the same samples by
    more than chance (a McNemar sign test at `z` standard deviations: `n_won - n_lost > z * sqrt(n_won + n_lost)`).
    """
    won = int((hits > other_hits).sum())
    lost = int((hits < other_hits).sum())
    return won - lost > z * math.sqrt(won + lost)


def search_exit_fractions(
    scores: torch.Tensor,
    correct: torch.Tensor,
    fractions: torch.Tensor,
    costs: ExitCostModel | Sequence[float],
    budgets: torch.Tensor,
    steps: Sequence[float] = (0.01, 0.03, 0.1),
    max_sweeps: int = 4,
) -> torch.Tensor:
    """
    Coordinate search over exit fractions for accuracy at a fixed budget: each sweep tries, for every exit and step
    `±delta`, moving mass to or from that exit (then re-tilting to the budget) and keeps the best move of each model
    if it raises accuracy on these samples (thresholds quantile-matched on them, see [`match_thresholds`]).

    Args:
        scores (`torch.Tensor` of shape `(S, N, K)`): `S` score sets (e.g. one per budget) of `N` samples.
        correct (`torch.Tensor` of shape `(N, K)`): whether each exit's prediction is correct.
        fractions (`torch.Tensor` of shape `(S, K)`): starting exit fractions, on budget.
        costs (`ExitCostModel` or `Sequence[float]`): the cost model the budgets are met in, or per-sample exit costs.
        budgets (`torch.Tensor` of shape `(S,)`): the budget of each score set.
        steps (`Sequence[float]`, *optional*, defaults to `(0.01, 0.03, 0.1)`): the moves of exit mass tried.
        max_sweeps (`int`, *optional*, defaults to 4): sweeps over every exit and step at most.

    Returns:
        `torch.Tensor` of shape `(S, K)`: the improved fractions.
    """
    num_exits = scores.shape[-1]
    _, exits = match_thresholds(scores, fractions[:, None])
    accuracy = _accuracy(correct, exits[:, 0])
    deltas = [sign * step for step in steps for sign in (-1.0, 1.0)]
    for _ in range(max_sweeps):
        candidates = []
        for k in range(num_exits):
            for delta in deltas:
                candidate = fractions.clone()
                candidate[:, k] = (candidate[:, k] + delta).clamp_min(0.0)
                candidates.append(candidate)
        candidates = tilt_exit_fractions(torch.stack(candidates, 1), costs, budgets[:, None])  # (S, Q, K)
        _, exits = match_thresholds(scores, candidates)
        candidate_accuracy = _accuracy(correct, exits)  # (S, Q)
        best_accuracy, best = candidate_accuracy.max(-1)
        better = best_accuracy > accuracy + 1e-9
        if not bool(better.any()):
            break
        fractions = torch.where(better[:, None], candidates[torch.arange(candidates.shape[0]), best], fractions)
        accuracy = torch.where(better, best_accuracy, accuracy)
    return fractions
