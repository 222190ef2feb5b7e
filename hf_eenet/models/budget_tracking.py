"""A budget kept on average over a stream of early-exit calls, by feedback on the cost actually spent."""

from __future__ import annotations

import numbers
import threading
from collections.abc import Sequence

import torch

from .configuration_eenet import validate_budget

__all__ = ["BudgetTracker", "is_budget_tracker"]

# What the engine and the pipelines use of a tracker (duck-typed: as Hub remote code, the model and the tracker may
# come from separately loaded copies of this module).
TRACKER_PROTOCOL = ("budget", "choose", "record", "cancel")


def is_budget_tracker(budget) -> bool:
    """Whether `budget` is a [`BudgetTracker`] (or an object with its `budget`, `choose`, `record` and `cancel`)."""
    return isinstance(budget, BudgetTracker) or (
        hasattr(budget, TRACKER_PROTOCOL[0]) and all(callable(getattr(budget, n, None)) for n in TRACKER_PROTOCOL[1:])
    )


class BudgetTracker:
    r"""
    Keeps the average cost per sample of a stream of calls at `budget`. Pass it where a budget goes: to an EENet
    model (`model(**batch, budget=tracker)`), to a budgeted pipeline (`pipeline(..., budget=tracker)` or per call), or
    to an exported ONNX model.

    A fitted exit policy meets each budget of its grid on the calibration split. On other data its realized cost
    differs by the sampling noise of both splits (a few percent of the budget with a thousand or two samples) and by
    any shift of the inputs. The tracker closes that gap with feedback: each call serves its batch at one of the
    policy's fitted budgets, the one nearest to `budget` plus the running shortfall (or minus the overspend) spread
    over `horizon` samples; the cost the batch really spent then feeds the next choice. Over a stream the average cost
    converges to `budget` (what remains is about `horizon` samples' worth of half a grid step, over the number of
    samples served), and a budget between two fitted budgets is met on average by serving some calls at each instead
    of at the lower one. A stream served one sample per call (a pipeline's default) moves between the fitted budgets
    next to `budget`, not across the grid, since one sample's cost is spread over `horizon`.

    Decisions then depend on the stream: the same sample can take another exit after other calls. Use a plain float
    budget where every sample must get the same decision whatever came before, and `reset()` to start a new stream.
    The full model (cost 1.0) is one of the choices, so a stream that ran cheaper than `budget` can catch up; nothing
    is cheaper than the smallest fitted budget, so a target there is held only as well as that budget holds itself.
    Threads may share a tracker (e.g. the workers of a server calling one pipeline): each call's choice is kept for
    its own thread, and the counts are updated under a lock; calls in flight at the same time choose from the same
    running total, so the stream's average still converges, only later.

    Args:
        budget (`float`):
            The average cost per sample to keep, as a fraction of the full model (as a plain budget: `>= 1.0` always
            serves the full model).
        horizon (`int`, *optional*, defaults to 64):
            Samples over which a shortfall or overspend is paid back (a call of more samples pays it back at once).

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
    >>> tracker.average_cost  # within a fraction of a percent of 0.5 over a long enough stream
    ```
    """

    def __init__(self, budget: float, horizon: int = 64):
        self.budget = validate_budget(budget)
        if isinstance(horizon, bool) or not isinstance(horizon, numbers.Integral) or horizon < 1:
            raise ValueError(f"`horizon` must be a positive number of samples, got {horizon!r}.")
        self.horizon = int(horizon)
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget the stream served so far."""
        with self._lock:
            self.num_samples = 0
            self.total_cost = 0.0
            self.samples_per_budget: dict[float, int] = {}
            self._pending: dict[int, float] = {}  # thread id -> the budget chosen for its call in flight

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_lock"]  # a lock cannot be copied or pickled: a copy gets its own
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def average_cost(self) -> float | None:
        """Average cost per sample served so far (`None` before the first call)."""
        return self.total_cost / self.num_samples if self.num_samples else None

    def choose(self, budgets: Sequence[float], batch_size: int) -> float:
        """
        The budget to serve the next call at.

        Args:
            budgets (`Sequence[float]`): the budgets the model can serve (its policy's fitted budgets it can meet,
                and 1.0 for the full model).
            batch_size (`int`): samples in the next call.

        Returns:
            `float`: the element of `budgets` nearest to `self.budget` plus the running shortfall spread over
            `max(batch_size, horizon)` samples (the lower one on a tie).
        """
        if not budgets:
            raise ValueError("BudgetTracker.choose needs at least one budget to choose from.")
        with self._lock:
            shortfall = self.budget * self.num_samples - self.total_cost  # negative after an overspend
            wanted = self.budget + shortfall / max(int(batch_size), self.horizon)
            chosen = min(sorted(float(b) for b in budgets), key=lambda b: abs(b - wanted))
            self._pending[threading.get_ident()] = chosen
        return chosen

    def record(self, exit_cost: torch.Tensor) -> None:
        """Account for the per-sample costs (`outputs.exit_cost`) of the call served at this thread's last `choose`."""
        cost = float(exit_cost.detach().float().sum())  # float32 on the device (MPS has no float64)
        with self._lock:
            chosen = self._pending.pop(threading.get_ident(), None)
            if chosen is None:
                raise RuntimeError("BudgetTracker.record was called without a preceding choose (in this thread).")
            self.num_samples += exit_cost.numel()
            self.total_cost += cost
            self.samples_per_budget[chosen] = self.samples_per_budget.get(chosen, 0) + exit_cost.numel()

    def cancel(self) -> None:
        """Forget this thread's last `choose` (its call failed): nothing was served."""
        with self._lock:
            self._pending.pop(threading.get_ident(), None)

    def __repr__(self) -> str:
        average = "none yet" if self.average_cost is None else f"{self.average_cost:.4f}"
        return f"BudgetTracker(budget={self.budget:g}, num_samples={self.num_samples}, average_cost={average})"
