"""What the early-exit forward costs: per-sample exit costs, and optionally a fixed cost per segment a batch runs."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .configuration_eenet import validate_exit_costs, validate_segment_costs

__all__ = ["ExitCostModel"]


class ExitCostModel:
    r"""
    The cost of the early-exit forward, relative to the full model (the plain backbone costs 1.0 per sample).

    A sample that leaves at exit `k` costs `exit_costs[k]` (cumulative: every block up to exit `k` and every exit head
    on the way). With `segment_costs`, a batch that runs segment `k` (the blocks from exit `k - 1` to exit `k` and exit
    `k`'s head, `k >= 1`) pays a further fixed `segment_costs[k - 1]` of its full forward's time, whether one of its
    samples runs that segment or all of them: on a CPU a convolution or a kernel launch on a few samples costs nearly
    as much as on many. For batches of `batch_size` samples drawn at random, a policy that sends each sample to exit
    `k` with probability `f_k` costs on average, per sample,

    $$\sum_k f_k c_k + \sum_{k \geq 1} F_k \left(1 - (1 - q_k)^B\right), \qquad q_k = \sum_{j \geq k} f_j,$$

    which is concave in the shares `q_k` that reach each segment: sending the first sample of a batch past an exit is
    dear, the next ones cheap. Without `segment_costs` the cost is linear, `sum_k f_k c_k`.

    Args:
        exit_costs (`Sequence[float]`): cumulative per-sample cost of leaving at each exit, strictly increasing.
        segment_costs (`Sequence[float]`, *optional*): fixed cost of each segment after exit 0 (`num_exits - 1`
            non-negative numbers), as a fraction of the full forward of the batch.
        batch_size (`int`, *optional*): the deployment batch size the expected cost is computed for; required with
            `segment_costs`.
    """

    def __init__(
        self,
        exit_costs: Sequence[float],
        segment_costs: Sequence[float] | None = None,
        batch_size: int | None = None,
    ):
        self.exit_costs = validate_exit_costs(exit_costs)
        self.segment_costs, self.batch_size = validate_segment_costs(segment_costs, batch_size, len(self.exit_costs))
        self._tensors = {}

    @classmethod
    def of(cls, exit_costs: ExitCostModel | Sequence[float]) -> ExitCostModel:
        """`exit_costs` itself if it is a cost model, else the linear cost model of these per-sample exit costs."""
        return exit_costs if isinstance(exit_costs, ExitCostModel) else cls(exit_costs)

    @classmethod
    def from_config(cls, config) -> ExitCostModel:
        """The cost model stored in an EENet config (`exit_costs`, `exit_segment_costs`, `exit_cost_batch_size`)."""
        return cls(config.exit_costs, config.exit_segment_costs, config.exit_cost_batch_size)

    def __len__(self) -> int:
        return len(self.exit_costs)

    def __eq__(self, other) -> bool:
        return isinstance(other, ExitCostModel) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        fixed = f", segment_costs={self.segment_costs}, batch_size={self.batch_size}" if self.segment_costs else ""
        return f"ExitCostModel(exit_costs={self.exit_costs}{fixed})"

    def to_dict(self) -> dict:
        """The model as the config fields that store it."""
        return {
            "exit_costs": list(self.exit_costs),
            "exit_segment_costs": list(self.segment_costs) if self.segment_costs is not None else None,
            "exit_cost_batch_size": self.batch_size,
        }

    @property
    def cheapest(self) -> float:
        """The smallest average cost any policy can reach: every sample at exit 0."""
        return self.exit_costs[0]

    @property
    def deepest(self) -> float:
        """The average cost of sending every sample to the last exit on the early-exit path."""
        return self.exit_costs[-1] + sum(self.segment_costs or ())

    def _tensor(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = (device, dtype)
        if key not in self._tensors:
            costs = torch.tensor(self.exit_costs, dtype=dtype, device=device)
            fixed = None
            if self.segment_costs is not None:
                fixed = torch.tensor(self.segment_costs, dtype=dtype, device=device)
            self._tensors[key] = (costs, fixed)
        return self._tensors[key]

    def of_fractions(self, fractions: torch.Tensor) -> torch.Tensor:
        """
        Expected cost per sample of exit fractions `(..., num_exits)` (each row a distribution over the exits); the
        result `(...)` is differentiable in `fractions`.
        """
        costs, fixed = self._tensor(fractions.device, fractions.dtype)
        cost = fractions @ costs
        if fixed is None:
            return cost
        reach = fractions.flip(-1).cumsum(-1).flip(-1)[..., 1:].clamp(0.0, 1.0)  # share that runs segment k >= 1
        return cost + (1 - (1 - reach).pow(self.batch_size)) @ fixed

    def of_exits(self, exit_index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """
        Expected cost per sample `(...)` of per-sample exits `(..., num_samples)` served in random batches, computed in
        `dtype`.
        """
        costs, fixed = self._tensor(exit_index.device, dtype)
        if fixed is None:
            return costs[exit_index].mean(-1)
        counts = torch.nn.functional.one_hot(exit_index, len(self)).to(dtype).mean(-2)  # (..., K)
        return self.of_fractions(counts)

    def per_sample_of_batch(self, exit_index: torch.Tensor) -> torch.Tensor:
        """
        What each sample of one batch cost, from the exit every sample took (`(batch_size,)`): its exit cost plus, for
        each segment it ran, an equal share of that segment's fixed cost among the samples of the batch that ran it.
        The shares add up to the batch's fixed costs, so the mean over the batch is what the batch cost per sample.
        A fixed cost is a fraction of the full forward of the batch at hand (measured at `batch_size`; on much
        smaller or larger batches it is an approximation, as every relative cost is).
        """
        costs, fixed = self._tensor(exit_index.device, torch.float32)
        cost = costs[exit_index]
        if fixed is None or exit_index.numel() == 0:
            return cost
        segments = torch.arange(1, len(self), device=exit_index.device)
        ran = exit_index[:, None] >= segments  # (N, K-1)
        runners = ran.sum(0).clamp_min(1).to(torch.float32)
        share = fixed * exit_index.numel() / runners  # (K-1,)
        return cost + (ran.to(torch.float32) * share).sum(-1)
