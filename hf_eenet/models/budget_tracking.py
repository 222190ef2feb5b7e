"""A budget kept on average over a stream of early-exit calls, by feedback on the cost actually spent."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .configuration_eenet import validate_budget

__all__ = ["BudgetTracker", "is_budget_tracker"]


def is_budget_tracker(budget) -> bool:
    """Whether `budget` is a [`BudgetTracker`] (duck-typed: as Hub remote code, the model may use another copy of it)."""
    return isinstance(budget, BudgetTracker) or all(
        callable(getattr(budget, name, None)) for name in ("choose", "record", "reset")
    )


class BudgetTracker:
    r"""
    Keeps the average cost per sample of a stream of calls at `budget`. Pass it where a budget goes: to an EENet
    model (`model(**batch, budget=tracker)`), to a budgeted pipeline (`pipeline(..., budget=tracker)` or per call), or
    to an exported ONNX model.

    A fitted exit policy meets each budget of its grid on the calibration split. On other data its realized cost
    differs by the sampling noise of both splits (a few percent of the budget with a thousand or two samples) and by
    any shift of the inputs. The tracker closes that gap with feedback: each call serves its batch at one of the
    policy's fitted budgets, the one whose cost brings the running average of every sample served so far closest to
    `budget` if the batch spends about that budget per sample; the cost the batch really spent then feeds the next
    choice. Over a stream the average cost converges to `budget` (the remaining error shrinks as one batch's
    deviation over the number of samples served), and a budget between two fitted budgets is met on average by
    serving some batches at each instead of at the lower one.

    Decisions then depend on the stream: the same sample can take another exit after other calls. Use a plain float
    budget where every sample must get the same decision whatever came before, and `reset()` to start a new stream.
    The full model (cost 1.0) is one of the choices, so a stream that ran cheaper than `budget` can catch up.

    Args:
        budget (`float`):
            The average cost per sample to keep, as a fraction of the full model (as a plain budget: `>= 1.0` always
            serves the full model).

    Attributes:
        num_samples (`int`): samples served so far.
        total_cost (`float`): their summed cost (`exit_cost` of the outputs).
        samples_per_budget (`dict[float, int]`): how many samples each fitted budget served.

    Example:

    ```python
    >>> from hf_eenet import BudgetTracker
    >>> tracker = BudgetTracker(0.5)
    >>> for batch in batches:
    ...     outputs = model(**batch, budget=tracker)
    >>> tracker.average_cost  # within a batch's deviation of 0.5 over the stream
    ```
    """

    def __init__(self, budget: float):
        self.budget = validate_budget(budget)
        self.reset()

    def reset(self) -> None:
        """Forget the stream served so far."""
        self.num_samples = 0
        self.total_cost = 0.0
        self.samples_per_budget: dict[float, int] = {}
        self._pending: tuple[float, int] | None = None

    @property
    def average_cost(self) -> float | None:
        """Average cost per sample served so far (`None` before the first call)."""
        return self.total_cost / self.num_samples if self.num_samples else None

    def choose(self, budgets: Sequence[float], batch_size: int) -> float:
        """
        The budget to serve the next batch at.

        Args:
            budgets (`Sequence[float]`): the budgets the model can serve (its policy's fitted budgets it can meet,
                and 1.0 for the full model).
            batch_size (`int`): samples in the next batch.

        Returns:
            `float`: the element of `budgets` whose cost, spent on the batch, leaves the running average closest to
            `self.budget` (the lower one on a tie).
        """
        if not budgets:
            raise ValueError("BudgetTracker.choose needs at least one budget to choose from.")
        batch_size = max(int(batch_size), 1)
        # the cost per sample of this batch that would put the running average exactly on the budget
        wanted = self.budget + (self.budget * self.num_samples - self.total_cost) / batch_size
        chosen = min(sorted(float(b) for b in budgets), key=lambda b: abs(b - wanted))
        self._pending = (chosen, batch_size)
        return chosen

    def record(self, exit_cost: torch.Tensor) -> None:
        """Account for the per-sample costs (`outputs.exit_cost`) of the batch served at the last `choose`."""
        if self._pending is None:
            raise RuntimeError("BudgetTracker.record was called without a preceding choose.")
        chosen, batch_size = self._pending
        if exit_cost.numel() != batch_size:
            raise ValueError(
                f"BudgetTracker.record got {exit_cost.numel()} costs for a batch of {batch_size} samples."
            )
        self._pending = None
        self.num_samples += batch_size
        self.total_cost += float(exit_cost.detach().double().sum())
        self.samples_per_budget[chosen] = self.samples_per_budget.get(chosen, 0) + batch_size

    def __repr__(self) -> str:
        average = "none yet" if self.average_cost is None else f"{self.average_cost:.4f}"
        return f"BudgetTracker(budget={self.budget:g}, num_samples={self.num_samples}, average_cost={average})"
