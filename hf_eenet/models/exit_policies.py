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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

__all__ = [
    "EXIT_POLICY_CLASSES",
    "ConfidenceThresholdPolicy",
    "ExitPolicy",
    "ForcedExitPolicy",
    "default_budget_grid",
    "exit_policy_from_config",
    "expected_cost",
    "first_exit_over_threshold",
    "geometric_exit_fractions",
    "register_exit_policy",
    "thresholds_for_exit_fractions",
]

EXIT_POLICY_CLASSES: dict[str, type[ExitPolicy]] = {}


def register_exit_policy(cls: type[ExitPolicy]) -> type[ExitPolicy]:
    """Class decorator registering a policy under its `policy_type` so saved configs can rebuild it."""
    EXIT_POLICY_CLASSES[cls.policy_type] = cls
    return cls


def exit_policy_from_config(config: dict) -> ExitPolicy:
    """Rebuild an (unfitted-valued) policy from `config.exit_policy`; its tensors are then loaded from the weights."""
    config = dict(config)
    policy_type = config.pop("policy_type")
    if policy_type not in EXIT_POLICY_CLASSES:
        raise ValueError(f"Unknown exit policy type {policy_type!r}; known types: {sorted(EXIT_POLICY_CLASSES)}.")
    return EXIT_POLICY_CLASSES[policy_type](**config)


def default_budget_grid(exit_costs: Sequence[float], start: float = 0.2, stop: float = 0.95, step: float = 0.05):
    """Budgets `start, start + step, ..., stop` (rounded), clipped to those the model can meet (>= the cheapest exit)."""
    count = int(round((stop - start) / step)) + 1
    grid = [round(start + i * step, 6) for i in range(count)]
    feasible = [b for b in grid if b >= exit_costs[0] - 1e-9]
    if not feasible:
        raise ValueError(f"No budget in {grid} reaches the cheapest exit (cost {exit_costs[0]:.3f}).")
    return feasible


def expected_cost(exit_index: torch.Tensor, exit_costs: torch.Tensor) -> torch.Tensor:
    """Average cost of the given per-sample exits (`exit_index` of shape `(..., num_samples)`)."""
    return exit_costs[exit_index].mean(-1)


def first_exit_over_threshold(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """
    Exit each sample takes when it leaves at the first exit whose score reaches the threshold.

    Args:
        scores (`torch.Tensor` of shape `(num_samples, num_exits)`): per-exit exit scores.
        thresholds (`torch.Tensor` of shape `(..., num_exits)`): thresholds; the last exit always takes the rest.

    Returns:
        `torch.LongTensor` of shape `(..., num_samples)`.
    """
    num_exits = scores.shape[-1]
    over = scores[..., :-1] >= thresholds[..., None, :-1]  # (..., N, K-1)
    over = torch.cat([over, torch.ones_like(over[..., :1])], dim=-1)
    return over.to(torch.int8).argmax(-1)  # first True


def geometric_exit_fractions(exit_costs: Sequence[float], budget: float) -> torch.Tensor:
    """
    MSDNet's budgeted allocation: exit fractions proportional to `q**k`, with `q` solved (bisection) so that the
    expected cost equals `budget` exactly.
    """
    costs = torch.as_tensor(exit_costs, dtype=torch.float64)
    if not costs[0] - 1e-9 <= budget <= costs[-1] + 1e-9:
        raise ValueError(f"budget {budget} is outside the reachable range [{costs[0]:.4f}, {costs[-1]:.4f}].")
    powers = torch.arange(len(costs), dtype=torch.float64)

    def fractions(log_q: float) -> torch.Tensor:
        weights = torch.exp(log_q * powers - (log_q * powers).max())
        return weights / weights.sum()

    low, high = -60.0, 60.0  # log q: cost increases with q
    for _ in range(200):
        mid = 0.5 * (low + high)
        if float(fractions(mid) @ costs) > budget:
            high = mid
        else:
            low = mid
    return fractions(low).to(torch.float32)


def thresholds_for_exit_fractions(scores: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """
    Quantile-matched thresholds: walk the exits in order over the samples not yet assigned and set `t_k` so that
    `round(f_k * N)` of them have `score_k >= t_k`; the last exit takes the rest (threshold `-inf`).

    Args:
        scores (`torch.Tensor` of shape `(num_samples, num_exits)`)
        fractions (`torch.Tensor` of shape `(num_exits,)`): target fraction of all samples leaving at each exit.
    """
    num_samples, num_exits = scores.shape
    thresholds = torch.full((num_exits,), -math.inf)
    remaining = torch.ones(num_samples, dtype=torch.bool)
    assigned = 0
    for k in range(num_exits - 1):
        target = int(round(float(fractions[: k + 1].sum()) * num_samples)) - assigned
        candidates = scores[remaining, k]
        if target <= 0 or candidates.numel() == 0:
            thresholds[k] = math.inf
            continue
        target = min(target, candidates.numel())
        threshold = torch.topk(candidates, target).values[-1]
        thresholds[k] = threshold
        leaving = remaining & (scores[:, k] >= threshold)
        assigned += int(leaving.sum())
        remaining &= ~leaving
    return thresholds


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

    def __init__(self, num_exits: int, budgets: Sequence[float] | None = None):
        super().__init__()
        if int(num_exits) < 1:
            raise ValueError(f"`num_exits` must be >= 1, got {num_exits}.")
        self.num_exits = int(num_exits)
        self.budgets = [float(b) for b in (budgets or [])]
        if any(b <= a for a, b in zip(self.budgets, self.budgets[1:])):
            raise ValueError(f"`budgets` must be strictly increasing, got {self.budgets}.")

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

    @property
    def is_fitted(self) -> bool:
        return len(self.budgets) > 0

    def budget_index(self, budget: float) -> int:
        """Index of the largest fitted budget not above `budget`; a clear error when there is none."""
        if not self.is_fitted:
            raise ValueError(f"The {self.policy_type} exit policy has not been fitted: it has no budgets.")
        index = -1
        for i, fitted in enumerate(self.budgets):
            if fitted <= budget + 1e-9:
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
        exit_costs: Sequence[float],
        budgets: Sequence[float],
        exit_features: Sequence[torch.Tensor] | None = None,
    ) -> ExitPolicy:
        """
        Fit the policy for every budget of the grid at once.

        Args:
            exit_logits (`torch.Tensor` of shape `(num_samples, num_exits, num_labels)`): cached logits of every exit
                on the calibration split.
            labels (`torch.LongTensor` of shape `(num_samples,)`): calibration labels.
            exit_costs (`Sequence[float]`): `config.exit_costs`.
            budgets (`Sequence[float]`): ascending budgets to fit, each >= the cheapest exit's cost.
            exit_features (`Sequence[torch.Tensor]`, *optional*): per exit, the pooled features `(num_samples, d_k)`
                the exit head received (for policies that use them).

        Returns:
            The fitted policy (`self`).
        """
        raise NotImplementedError

    def _check_fit_inputs(self, exit_logits, labels, exit_costs, budgets) -> tuple[torch.Tensor, list[float]]:
        if exit_logits.ndim != 3 or exit_logits.shape[1] != self.num_exits:
            raise ValueError(
                f"`exit_logits` must have shape (num_samples, {self.num_exits}, num_labels), got "
                f"{tuple(exit_logits.shape)}."
            )
        if exit_logits.shape[0] == 0:
            raise ValueError("Cannot fit an exit policy on zero samples.")
        if labels.shape != exit_logits.shape[:1]:
            raise ValueError(
                f"`labels` must have shape ({exit_logits.shape[0]},) to match `exit_logits`, got {tuple(labels.shape)}."
            )
        if len(exit_costs) != self.num_exits:
            raise ValueError(f"`exit_costs` must hold {self.num_exits} costs, got {list(exit_costs)}.")
        budgets = sorted(float(b) for b in budgets)
        if not budgets:
            raise ValueError("`budgets` must hold at least one budget.")
        if budgets[0] < exit_costs[0] - 1e-9:
            raise ValueError(
                f"budget {budgets[0]} is below the cheapest exit's cost {exit_costs[0]:.4f}: no policy can meet it."
            )
        costs = torch.as_tensor(exit_costs, dtype=torch.float32)
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
        `decide` calls as the early-exit engine (so simulated and real decisions agree by construction).
        """
        num_samples = exit_logits.shape[0]
        exits = torch.full((num_samples,), self.num_exits - 1, dtype=torch.long, device=exit_logits.device)
        active = torch.ones(num_samples, dtype=torch.bool, device=exit_logits.device)
        state = self.initial_state(num_samples, exit_logits.device)
        for k in range(self.num_exits - 1):
            features = exit_features[k] if exit_features is not None else None
            leave, state = self.decide(k, exit_logits[:, k], features, state, budget_index)
            leave = leave & active
            exits[leave] = k
            active &= ~leave
        return exits


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
            exits, the largest whose calibration cost stays within the budget: DeeBERT / FastBERT / BranchyNet) or
            `"geometric"` (MSDNet: exit fractions proportional to `q**k` with expected cost equal to the budget,
            thresholds by quantile matching).
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
        if score not in ("max_prob", "entropy"):
            raise ValueError(f"`score` must be 'max_prob' or 'entropy', got {score!r}.")
        if allocation not in ("global", "geometric"):
            raise ValueError(f"`allocation` must be 'global' or 'geometric', got {allocation!r}.")
        self.score, self.allocation = score, allocation
        self.register_buffer("thresholds", torch.zeros(len(self.budgets), self.num_exits))

    def hyperparameters(self) -> dict:
        return {"score": self.score, "allocation": self.allocation}

    def confidence(self, logits: torch.Tensor) -> torch.Tensor:
        """Confidence score of logits `(..., num_labels)`."""
        probs = logits.float().softmax(-1)
        if self.score == "max_prob":
            return probs.amax(-1)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
        return 1.0 - entropy / math.log(probs.shape[-1])

    def fit(self, exit_logits, labels, exit_costs, budgets, exit_features=None):
        costs, budgets = self._check_fit_inputs(exit_logits, labels, exit_costs, budgets)
        scores = self.confidence(exit_logits)  # (N, K)
        thresholds = torch.stack(
            [
                self._global_thresholds(scores, costs, b)
                if self.allocation == "global"
                else thresholds_for_exit_fractions(scores, geometric_exit_fractions(exit_costs, b))
                for b in budgets
            ]
        )
        self.budgets = budgets
        self.thresholds = thresholds.to(self.thresholds.device)
        return self

    def _global_thresholds(self, scores: torch.Tensor, costs: torch.Tensor, budget: float) -> torch.Tensor:
        """The largest single threshold whose calibration cost stays within `budget` (exact search over scores)."""
        candidates = torch.unique(scores[:, :-1])  # sorted ascending; cost is non-decreasing in the threshold
        num_exits = scores.shape[1]

        def cost_at(threshold: torch.Tensor) -> float:
            return float(expected_cost(first_exit_over_threshold(scores, threshold.expand(num_exits)), costs))

        low, high = 0, candidates.numel() - 1  # the lowest candidate sends everyone to exit 0: always affordable
        while low < high:
            mid = (low + high + 1) // 2
            if cost_at(candidates[mid]) <= budget + 1e-9:
                low = mid
            else:
                high = mid - 1
        thresholds = candidates[low].expand(num_exits).clone()
        thresholds[-1] = -math.inf
        return thresholds

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
            raise ValueError(f"`exit_indices` must be 1-D (one exit per sample), got shape {tuple(exit_indices.shape)}.")
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
