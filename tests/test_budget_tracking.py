"""BudgetTracker: a budget kept on average over a stream of calls, in the engine, the pipelines and the harness."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_text_batch, tiny_bert_config

from hf_eenet import BudgetTracker, ConfidenceThresholdPolicy, EENetBertForSequenceClassification, PatiencePolicy
from hf_eenet.evaluation import check_tracked_policies, format_budget_table, measured_budget_table
from hf_eenet.models.budget_tracking import is_budget_tracker

GRID = [0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]


def serve(tracker: BudgetTracker, budgets, batch_sizes, spend) -> list[float]:
    """Feed the tracker batches whose per-sample cost is `spend(chosen budget)`; return the budgets it chose."""
    chosen = []
    for size in batch_sizes:
        budget = tracker.choose(budgets, size)
        chosen.append(budget)
        tracker.record(torch.full((size,), spend(budget)))
    return chosen


@pytest.mark.parametrize("bias", [1.0, 0.94, 1.05])  # the stream spends its budgets exactly, under or over
@pytest.mark.parametrize("batch_size", [1, 16, 256])
def test_average_cost_converges_to_the_budget_between_grid_points(bias, batch_size):
    tracker = BudgetTracker(0.52)
    chosen = serve(tracker, GRID + [1.0], [batch_size] * (6400 // batch_size + 25), lambda budget: bias * budget)
    # what is left: half a grid step (plus the bias) over the horizon, spread over the whole stream
    horizon = max(batch_size, tracker.horizon)
    assert abs(tracker.average_cost - 0.52) <= (0.025 + 0.05) * horizon / tracker.num_samples + 1e-9
    assert set(chosen) <= {0.45, 0.5, 0.55, 0.6}  # the neighbours of the budget, never a distant one
    assert tracker.num_samples == sum(tracker.samples_per_budget.values())


def test_one_sample_per_call_stays_with_the_budgets_next_to_the_target():
    """Each sample costs one exit's cost (0.2 or 1.0 here), not its budget: the horizon keeps the choice steady."""
    generator = torch.Generator().manual_seed(0)
    tracker = BudgetTracker(0.5)
    for _ in range(5000):
        budget = tracker.choose(GRID + [1.0], 1)
        dear = torch.rand((), generator=generator) < (0.97 * budget - 0.2) / 0.8  # spends ~3 % under its budget
        tracker.record(torch.tensor([1.0 if dear else 0.2]))
    assert abs(tracker.average_cost - 0.5) < 0.005
    assert set(tracker.samples_per_budget) <= {0.4, 0.45, 0.5, 0.55, 0.6}, tracker.samples_per_budget
    assert tracker.samples_per_budget[0.5] + tracker.samples_per_budget[0.55] > 0.8 * 5000


def test_a_stream_that_ran_cheap_catches_up_and_the_floor_is_respected():
    tracker = BudgetTracker(0.5, horizon=1)  # each call pays back everything at once
    tracker.choose([0.4, 0.5, 1.0], 10)
    tracker.record(torch.full((10,), 0.2))  # an easy stretch: 3.0 under budget
    assert tracker.choose([0.4, 0.5, 1.0], 10) == 1.0  # wants 0.8 per sample: the full model is nearest
    tracker.record(torch.full((10,), 1.0))
    assert tracker.average_cost == pytest.approx(0.6)
    assert tracker.choose([0.4, 0.5, 1.0], 10) == 0.4  # overspent: the cheapest budget, never below it
    assert tracker.choose([0.4, 0.5, 1.0], 1000) == 0.5  # a large batch wants ~0.498: the nearest budget
    tracker.reset()
    assert tracker.num_samples == 0 and tracker.average_cost is None and tracker.samples_per_budget == {}


def test_ties_choose_the_lower_budget():
    assert BudgetTracker(0.45).choose([0.4, 0.5], 8) == 0.4


def test_tracker_misuse_is_refused():
    tracker = BudgetTracker(0.5)
    with pytest.raises(RuntimeError, match="without a preceding choose"):
        tracker.record(torch.ones(3))
    tracker.choose(GRID, 4)
    tracker.cancel()  # the call failed: nothing to record
    with pytest.raises(RuntimeError, match="without a preceding choose"):
        tracker.record(torch.ones(4))
    with pytest.raises(ValueError, match="at least one budget"):
        tracker.choose([], 4)
    for budget, error, match in [
        (0.0, ValueError, r"`budget` must be a finite number > 0 .*got 0.0\."),
        (-0.5, ValueError, r"`budget` must be a finite number > 0 .*got -0.5\."),
        (float("nan"), ValueError, r"`budget` must be a finite number > 0 .*got nan\."),
        ("half", TypeError, r"`budget` must be a number .*got str: 'half'"),
    ]:
        with pytest.raises(error, match=match):
            BudgetTracker(budget)
    for horizon in (0, 2.5, True):
        with pytest.raises(ValueError, match="`horizon` must be a positive number of samples"):
            BudgetTracker(0.5, horizon=horizon)
    assert BudgetTracker(0.5, horizon=np.int64(32)).horizon == 32  # any whole number, e.g. from numpy
    assert is_budget_tracker(tracker) and not is_budget_tracker(0.5) and not is_budget_tracker(None)
    with pytest.raises(TypeError, match="must be a sequence of policy names, got the string 'eenet'"):
        check_tracked_policies("eenet", ["eenet"])
    with pytest.raises(ValueError, match="nothing is measured"):
        check_tracked_policies(["eenet"], [])


@pytest.fixture(scope="module")
def fitted_model():
    torch.manual_seed(0)
    model = EENetBertForSequenceClassification(tiny_bert_config(exit_pooling="mean")).eval()
    batch = random_text_batch(96, seed=11)
    with torch.no_grad():
        logits = model(**batch, output_all_exits=True).all_exit_logits
    policy = ConfidenceThresholdPolicy(model.config.num_exits, allocation="geometric")
    model.set_exit_policy(policy.fit(logits, torch.randint(0, 3, (96,)), model.config.exit_costs, budgets=GRID))
    return model


def stream(num_batches: int, batch_size: int = 8) -> list[dict]:
    return [random_text_batch(batch_size, seed=100 + i) for i in range(num_batches)]


def test_engine_serves_each_batch_exactly_at_the_chosen_budget(fitted_model):
    tracker, replay = BudgetTracker(0.62, horizon=8), BudgetTracker(0.62, horizon=8)  # the horizon: one batch
    costs, wanted = [], 0.62
    with torch.no_grad():
        for batch in stream(30):
            out = fitted_model(**batch, budget=tracker)
            # the same batch at the budget the tracker chose, as a plain budget: identical decisions and logits
            wanted = replay.budget + (replay.budget * replay.num_samples - replay.total_cost) / 8
            chosen = replay.choose(GRID + [1.0], 8)
            plain = fitted_model(**batch, budget=chosen)
            replay.record(plain.exit_cost)
            assert torch.equal(out.exit_index, plain.exit_index)
            torch.testing.assert_close(out.logits, plain.logits, atol=0, rtol=0)
            costs.append(out.exit_cost)
    assert tracker.num_samples == 240 and tracker.total_cost == pytest.approx(float(torch.cat(costs).sum()))
    assert tracker.samples_per_budget == replay.samples_per_budget
    assert len(tracker.samples_per_budget) > 1  # it really moved between budgets
    # what is left of the error is the last batch's miss of the cost it wanted, over the whole stream
    last_miss = abs(wanted - float(costs[-1].mean()))
    assert abs(tracker.average_cost - 0.62) == pytest.approx(8 * last_miss / 240, abs=1e-6)


def test_tracking_keeps_the_budget_where_fixed_thresholds_drift(fitted_model):
    """Thresholds fitted on one set of batches, served on others: the fixed budget misses by ~5 %, tracking does not."""
    batches = stream(40)
    with torch.no_grad():
        fixed = torch.cat([fitted_model(**batch, budget=0.7).exit_cost for batch in batches]).mean()
        tracker = BudgetTracker(0.7)
        for batch in batches:
            fitted_model(**batch, budget=tracker)
    assert abs(tracker.average_cost - 0.7) < abs(float(fixed) - 0.7) / 4


def test_a_tracked_budget_of_one_is_the_full_model(fitted_model):
    tracker = BudgetTracker(1.0)
    with torch.no_grad():
        out = fitted_model(**random_text_batch(5, seed=3), budget=tracker)
    assert out.exit_cost.tolist() == [1.0] * 5 and tracker.samples_per_budget == {1.0: 5}


def test_tracking_errors_are_raised_before_any_work(fitted_model):
    batch = random_text_batch(4, seed=3)
    with pytest.raises(ValueError, match="below the smallest fitted budget 0.4"):
        fitted_model(**batch, budget=BudgetTracker(0.35))
    with pytest.raises(ValueError, match="A budget or exit policy cannot be used when `labels` are given"):
        fitted_model(**batch, labels=torch.zeros(4, dtype=torch.long), budget=BudgetTracker(0.5))
    with pytest.raises(ValueError, match="takes no budget"):
        fitted_model(**batch, budget=BudgetTracker(0.5), exit_policy=PatiencePolicy(fitted_model.config.num_exits))
    unfitted = EENetBertForSequenceClassification(tiny_bert_config()).eval()
    tracker = BudgetTracker(0.5)
    with pytest.raises(ValueError, match="needs a fitted exit policy"):
        unfitted(**batch, budget=tracker)
    with pytest.raises(ValueError, match="The batch is empty"):  # fails after the choice: the choice is withdrawn
        empty = {
            "input_ids": torch.zeros(0, 5, dtype=torch.long),
            "attention_mask": torch.ones(0, 5, dtype=torch.long),
        }
        fitted_model(**empty, budget=tracker)
    with pytest.raises(RuntimeError, match="without a preceding choose"):
        tracker.record(torch.ones(4))
    assert tracker.num_samples == 0


def test_measured_table_adds_tracked_rows(fitted_model):
    batches = [{**batch, "labels": torch.randint(0, 3, (8,))} for batch in stream(12)]
    policy = fitted_model.exit_policy
    rows = measured_budget_table(
        fitted_model, batches, {"max-prob": policy}, budgets=[0.52, 0.7], tracked_policies=["max-prob"]
    )
    by_name = {(row["policy"], row["budget"]): row for row in rows}
    tracked = by_name[("max-prob (budget tracked)", 0.52)]
    assert abs(tracked["cost"] - 0.52) < abs(by_name[("max-prob", 0.52)]["cost"] - 0.52)
    assert sum(share for _, share in tracked["served_budgets"]) == pytest.approx(1.0, abs=1e-5)
    assert {budget for budget, _ in tracked["served_budgets"]} >= {0.5}
    assert "served_budgets" not in by_name[("max-prob", 0.7)]
    assert "budgets served" in format_budget_table(rows)
    with pytest.raises(ValueError, match=r"`tracked_policies` \['other'\] are not among the measured policies"):
        measured_budget_table(fitted_model, batches, {"max-prob": policy}, tracked_policies=["other"])
    patience = PatiencePolicy(fitted_model.config.num_exits)
    with pytest.raises(ValueError, match="not budget-matched"):
        measured_budget_table(fitted_model, batches, {"patience": patience}, tracked_policies=["patience"])


def test_threads_sharing_a_tracker_each_record_their_own_call():
    """Two calls in flight at once (a threaded server): each records the budget chosen for it, none fails."""
    import threading

    tracker = BudgetTracker(0.5)
    chosen, both_chose, first_recorded = {}, threading.Barrier(2), threading.Event()

    def call(name: str, cost: float, record_first: bool):
        chosen[name] = tracker.choose([0.4, 0.6] if name == "a" else [0.3, 0.5], 2)
        both_chose.wait()  # a's choice is still pending when b chooses
        if not record_first:
            first_recorded.wait()
        tracker.record(torch.full((2,), cost))
        if record_first:
            first_recorded.set()

    threads = [
        threading.Thread(target=call, args=("a", 0.4, False)),
        threading.Thread(target=call, args=("b", 0.5, True)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert tracker.num_samples == 4 and tracker.total_cost == pytest.approx(1.8)
    assert tracker.samples_per_budget == {chosen["a"]: 2, chosen["b"]: 2} and chosen["a"] != chosen["b"]
    with pytest.raises(RuntimeError, match="without a preceding choose"):  # this thread chose nothing
        tracker.record(torch.ones(1))


def test_a_model_served_from_two_threads_through_one_tracker(fitted_model):
    from concurrent.futures import ThreadPoolExecutor

    tracker = BudgetTracker(0.6)
    batches = stream(40, batch_size=4)

    def serve_batch(batch):
        with torch.no_grad():
            return fitted_model(**batch, budget=tracker).exit_cost

    with ThreadPoolExecutor(max_workers=2) as pool:
        costs = list(pool.map(serve_batch, batches))
    assert tracker.num_samples == 160 and sum(tracker.samples_per_budget.values()) == 160
    assert tracker.total_cost == pytest.approx(float(torch.cat(costs).sum()), rel=1e-6)


def test_a_tracker_can_be_copied_and_pickled():
    import copy
    import pickle

    tracker = BudgetTracker(0.5, horizon=8)
    tracker.choose([0.4, 0.6], 2)
    tracker.record(torch.tensor([0.4, 0.6]))
    for twin in (copy.deepcopy(tracker), pickle.loads(pickle.dumps(tracker))):
        assert (twin.num_samples, twin.total_cost, twin.samples_per_budget) == (2, pytest.approx(1.0), {0.4: 2})
        twin.choose([0.5], 1)
        twin.record(torch.tensor([0.5]))  # its own lock, its own count
        assert twin.num_samples == 3 and tracker.num_samples == 2
