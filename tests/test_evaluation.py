"""Evaluation harness: oracle, simulated and measured budget tables, rendering, plots, caching, errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_text_batch, tiny_bert_config

from hf_eenet import EENetBertForSequenceClassification
from hf_eenet.evaluation import (
    ORACLE_NAME,
    cache_exit_outputs,
    describe_choices,
    exit_costs_from_measured_rows,
    fit_policies,
    format_budget_table,
    load_policies,
    measured_budget_table,
    oracle_exits,
    plot_accuracy_vs_cost,
    save_policies,
    simulated_budget_table,
    standard_policies,
    synthetic_exit_outputs,
)
from hf_eenet.models.exit_policies import (
    ConfidenceThresholdPolicy,
    EENetPolicy,
    PatiencePolicy,
    exit_policy_from_config,
)

FAST = {"max_epochs": 20, "patience": 3, "phase_epochs": 5, "batch_size": 256, "restarts": 1}


@pytest.fixture(scope="module")
def data():
    return synthetic_exit_outputs(num_samples=600, num_exits=3, num_labels=3, feature_size=6, seed=0)


@pytest.fixture(scope="module")
def policies(data):
    policies = standard_policies(3, eenet_kwargs=FAST, eenet_paper_kwargs=FAST)
    return fit_policies(
        policies, data["exit_logits"], data["labels"], data["exit_costs"], [0.4, 0.6, 0.8], data["exit_features"]
    )


def test_oracle_takes_the_first_correct_exit_else_the_last():
    labels = torch.tensor([0, 1, 1, 0])
    predictions = torch.tensor([[0, 0, 0], [0, 1, 1], [0, 0, 0], [1, 1, 0]])  # (N, K)
    logits = torch.nn.functional.one_hot(predictions, 2).float()
    assert oracle_exits(logits, labels).tolist() == [0, 1, 2, 2]
    with pytest.raises(ValueError, match=r"`labels` must have shape \(4,\)"):
        oracle_exits(logits, labels[:3])


def test_simulated_table_covers_every_policy_and_the_oracle(data, policies):
    rows = simulated_budget_table(
        policies, data["exit_logits"], data["labels"], data["exit_costs"], data["exit_features"]
    )
    names = {row["policy"] for row in rows}
    assert set(policies) | {ORACLE_NAME} == names
    assert {row["mode"] for row in rows} == {"simulated"}
    for row in rows:
        assert sum(row["exit_histogram"]) == pytest.approx(1.0, abs=1e-5)
        expected_cost = sum(h * c for h, c in zip(row["exit_histogram"], data["exit_costs"]))
        assert row["cost"] == pytest.approx(expected_cost, abs=1e-4)
        if row["budget"] is not None:  # budget-matched rows meet their budget on the split they were fitted on
            assert row["cost"] <= row["budget"] + 1e-6, row
    budgeted = [row for row in rows if row["policy"] == "eenet"]
    assert [row["budget"] for row in budgeted] == [0.4, 0.6, 0.8]
    patience = [row for row in rows if row["policy"].startswith("patience")]
    assert len(patience) == 2 and all(row["budget"] is None for row in patience)
    static = {row["policy"]: row for row in rows if row["policy"].startswith("static")}
    assert static["static (exit 1)"]["cost"] == pytest.approx(data["exit_costs"][1])
    assert static["static (exit 1)"]["exit_histogram"] == [0.0, 1.0, 0.0]
    oracle = next(row for row in rows if row["policy"] == ORACLE_NAME)
    assert oracle["accuracy"] >= max(row["accuracy"] for row in rows)


def test_simulated_table_accuracy_matches_a_direct_computation(data, policies):
    policy = policies["max-prob (global)"]
    rows = simulated_budget_table(
        {"mp": policy}, data["exit_logits"], data["labels"], data["exit_costs"], include_oracle=False
    )
    for index, row in enumerate(rows):
        exits = policy.simulate(data["exit_logits"], index)
        predictions = data["exit_logits"][torch.arange(600), exits].argmax(-1)
        assert row["accuracy"] == pytest.approx(float((predictions == data["labels"]).float().mean()))


def test_rendering_and_plot(tmp_path, data, policies):
    rows = simulated_budget_table(
        policies, data["exit_logits"], data["labels"], data["exit_costs"], data["exit_features"]
    )
    markdown = format_budget_table(rows)
    lines = markdown.splitlines()
    assert lines[0].startswith("| policy | mode | budget | accuracy (%) | cost | exit histogram (%)")
    assert len(lines) == len(rows) + 2 and "| simulated |" in lines[2] and "| oracle | simulated | — |" in markdown
    text = format_budget_table(rows, format="text")
    assert "eenet-paper" in text and "|" not in text
    path = plot_accuracy_vs_cost(rows, tmp_path / "plots" / "accuracy_vs_cost.png", title="synthetic")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="`format` must be 'markdown' or 'text', got 'html'"):
        format_budget_table(rows, format="html")
    with pytest.raises(ValueError, match="No rows"):
        format_budget_table([])


def test_saved_policies_keep_what_each_fit_chose(data, tmp_path):
    """`save_policies` keeps EENet's per-budget `fit_summary_`; `describe_choices` reads it back from disk."""
    costs = [1 / 3, 2 / 3, 1.0]
    eenet = EENetPolicy(3, num_labels=3, seed=0, **FAST)
    policies = {"eenet": eenet, "max-prob (global)": ConfidenceThresholdPolicy(3)}
    fit_policies(policies, data["exit_logits"], data["labels"], costs, [0.5, 0.8])
    loaded = load_policies(save_policies(policies, tmp_path))
    assert loaded["eenet"].fit_summary_ == eenet.fit_summary_
    choices = describe_choices(loaded["eenet"])
    assert list(choices) == [0.5, 0.8]
    for row, text in zip(eenet.fit_summary_, choices.values()):
        assert text.startswith(row["scoring"]) and ("searched allocation" in text) == (row["allocation"] == "searched")
    assert describe_choices(loaded["max-prob (global)"]) == {}  # a baseline keeps no summary
    (tmp_path / "exit_policies.json").write_text("[{")
    with pytest.raises(ValueError, match="exit_policies.json' is not valid JSON"):
        load_policies(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"No saved exit policies in '.*empty' \(missing \[.*exit_policies"):
        load_policies(tmp_path / "empty")
    assert describe_choices(exit_policy_from_config(eenet.get_config())) == {}  # nor a policy loaded with a model
    eenet.fit_summary_ = [
        {"budget": 0.5, "scoring": "regret (global)", "allocation": "searched", "solution_of_budget": 0.5},
        {"budget": 0.8, "scoring": "max-prob (global)", "allocation": "learned", "solution_of_budget": 0.5},
    ]
    assert describe_choices(eenet) == {
        0.5: "regret (global), searched allocation",
        0.8: "max-prob (global), kept from budget 0.5",
    }


def test_simulated_table_errors(data):
    with pytest.raises(ValueError, match="has not been fitted"):
        simulated_budget_table(
            {"mp": ConfidenceThresholdPolicy(3)}, data["exit_logits"], data["labels"], data["exit_costs"]
        )
    with pytest.raises(ValueError, match="has 4 exits but the cached outputs have 3"):
        simulated_budget_table({"p": PatiencePolicy(4)}, data["exit_logits"], data["labels"], data["exit_costs"])
    with pytest.raises(ValueError, match="zero samples"):
        simulated_budget_table({}, data["exit_logits"][:0], data["labels"][:0], data["exit_costs"])
    with pytest.raises(ValueError, match="`exit_costs` must hold 3 costs"):
        simulated_budget_table({}, data["exit_logits"], data["labels"], [0.5, 1.0])
    with pytest.raises(ValueError, match="strictly increasing"):
        simulated_budget_table({}, data["exit_logits"], data["labels"], [0.5, 0.4, 1.0])
    num_labels = data["exit_logits"].shape[-1]
    with pytest.raises(ValueError, match=rf"`labels` must lie in \[0, {num_labels - 1}\]"):
        simulated_budget_table({}, data["exit_logits"], data["labels"] + num_labels, data["exit_costs"])
    with pytest.raises(ValueError, match="NaN or infinite"):
        simulated_budget_table({}, data["exit_logits"] * math.nan, data["labels"], data["exit_costs"])
    with pytest.raises(ValueError, match="needs calibration `labels`"):
        fit_policies({}, data["exit_logits"], None, data["exit_costs"], [0.5])


def test_cache_and_measured_table_agree_with_simulation():
    model = EENetBertForSequenceClassification(tiny_bert_config(exit_pooling="mean")).eval()
    generator = torch.Generator().manual_seed(0)
    batches = [
        {**random_text_batch(16, seed=s), "labels": torch.randint(0, 3, (16,), generator=generator)} for s in range(3)
    ]
    cached = cache_exit_outputs(model, batches)
    assert cached["exit_logits"].shape == (48, 3, 3) and cached["labels"].shape == (48,)
    assert [f.shape for f in cached["exit_features"]] == [(48, 32)] * 3
    policy = EENetPolicy(3, **FAST).fit(**cached, exit_costs=model.config.exit_costs, budgets=[0.5, 0.8])
    model.set_exit_policy(policy)
    policies = {"eenet": policy, "patience (p=1)": PatiencePolicy(3, patience=1)}
    measured = measured_budget_table(model, batches, policies=policies)
    simulated = simulated_budget_table(policies, **cached, exit_costs=model.config.exit_costs, include_oracle=False)
    assert [(r["policy"], r["budget"]) for r in measured] == [("full model", 1.0)] + [
        (r["policy"], r["budget"]) for r in simulated
    ]
    assert {r["mode"] for r in measured} == {"measured"}
    for real, sim in zip(measured[1:], simulated):
        assert real["accuracy"] == pytest.approx(sim["accuracy"]) and real["cost"] == pytest.approx(
            sim["cost"], abs=1e-5
        )
        assert real["exit_histogram"] == pytest.approx(sim["exit_histogram"])
    full = measured[0]
    assert full["cost"] == 1.0 and full["exit_histogram"] == [0.0, 0.0, 1.0]
    for row in measured:
        assert row["seconds_per_sample"] > 0 and row["samples_per_second"] > 0 and row["num_samples"] == 48
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    stored = measured_budget_table(model, batches, include_full_model=False, num_warmup_batches=0)
    assert [r["policy"] for r in stored] == ["stored", "stored"] and len(calls) == 2 * 3
    calls.clear()  # a warm-up runs its batches through every configuration, untimed
    measured_budget_table(model, batches, include_full_model=False, num_warmup_batches=2)
    assert len(calls) == 2 * 2 + 2 * 3
    assert "ms / sample" in format_budget_table(measured)
    assert model.training is False
    # configurations take turns of `batches_per_turn` consecutive batches, each turn starting one configuration later;
    # the rows do not depend on the turns
    order = []
    model.register_forward_pre_hook(lambda module, args, kwargs: order.append(kwargs["budget"]), with_kwargs=True)
    in_turns = measured_budget_table(model, batches, policies=policies, num_warmup_batches=0, batches_per_turn=2)
    assert order == [1.0, 1.0, 0.5, 0.5, 0.8, 0.8, None, None, 0.5, 0.8, None, 1.0]
    for one, turns in zip(measured, in_turns):
        assert (one["policy"], one["budget"], one["accuracy"], one["cost"], one["exit_histogram"]) == (
            turns["policy"],
            turns["budget"],
            turns["accuracy"],
            turns["cost"],
            turns["exit_histogram"],
        )


def test_fitting_and_timing_show_progress_bars_when_asked(data, capsys):
    policies = {"max-prob": ConfidenceThresholdPolicy(3), "eenet": EENetPolicy(3, **{**FAST, "max_epochs": 2})}
    fit_policies(policies, data["exit_logits"], data["labels"], data["exit_costs"], [0.5], progress=True)
    model = EENetBertForSequenceClassification(tiny_bert_config(exit_pooling="mean")).eval()
    batches = [random_text_batch(4, seed=s) for s in range(3)]
    measured_budget_table(model, batches, {"max-prob": policies["max-prob"]}, budgets=[0.5], progress=True)
    shown = capsys.readouterr().err
    assert "Fitting exit policies: 100%" in shown and "2/2" in shown
    assert "Warm-up (2 configurations)" in shown and "Timing 2 configurations: 100%" in shown and "3/3" in shown
    fit_policies(policies, data["exit_logits"], data["labels"], data["exit_costs"], [0.5])
    assert capsys.readouterr().err == ""  # off by default: library calls stay quiet


def test_measured_table_errors():
    model = EENetBertForSequenceClassification(tiny_bert_config()).eval()
    with pytest.raises(ValueError, match="`batches` is empty"):
        measured_budget_table(model, [])
    with pytest.raises(ValueError, match="no stored exit policy"):
        measured_budget_table(model, [random_text_batch(2)])
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match=f"`num_warmup_batches` must be a whole number >= 0, got {bad}"):
            measured_budget_table(model, [random_text_batch(2)], num_warmup_batches=bad)
    with pytest.raises(ValueError, match="`batches_per_turn` must be a positive integer, got 0"):
        measured_budget_table(model, [random_text_batch(2)], batches_per_turn=0)
    unfitted = {"max-prob": ConfidenceThresholdPolicy(model.config.num_exits)}
    with pytest.raises(ValueError, match="Policy 'max-prob' has not been fitted"):
        measured_budget_table(model, [random_text_batch(2)], policies=unfitted)
    data = synthetic_exit_outputs(200, model.config.num_exits, model.config.num_labels, seed=0)
    fitted = ConfidenceThresholdPolicy(model.config.num_exits).fit(
        data["exit_logits"], data["labels"], model.config.exit_costs, [0.5, 0.8]
    )
    unservable = {"batch that would fail if it ran": torch.zeros(1)}  # the budget is refused before any forward
    with pytest.raises(ValueError, match="budget 0.1 is below the cost of the cheapest exit"):
        measured_budget_table(model, [unservable], policies={"max-prob": fitted}, budgets=[0.5, 0.1])
    with pytest.raises(ValueError, match="below the smallest fitted budget"):
        measured_budget_table(model, [unservable], policies={"max-prob": fitted}, budgets=[0.45])
    with pytest.raises(ValueError, match="`batches` is empty"):
        cache_exit_outputs(model, [])
    policies = {"max-prob": fitted}
    labelled = {**random_text_batch(4), "labels": torch.tensor([0, 1, 2, 0])}
    column = {**labelled, "labels": labelled["labels"][:, None]}  # (B, 1) would broadcast against (B,)
    for measure in (lambda b: measured_budget_table(model, b, policies), lambda b: cache_exit_outputs(model, b)):
        with pytest.raises(ValueError, match=r"shape \(4,\) to match a batch of 4 \(labels under 'labels'\)"):
            measure([column])
        with pytest.raises(ValueError, match=r"must lie in \[0, 2\] for 3 classes"):
            measure([{**labelled, "labels": torch.tensor([0, 1, 3, 0])}])
        with pytest.raises(ValueError, match="Only 1 of 2 batches carry labels under 'labels'"):
            measure([labelled, random_text_batch(4)])


def _rows_for(costs, histograms):
    """Measured rows whose wall-clock fractions are exactly `histogram @ costs`, plus the full model's row."""
    rows = [
        {"policy": "full model", "budget": 1.0, "exit_histogram": [0.0] * (len(costs) - 1) + [1.0], "speedup": 1.0}
    ]
    for histogram in histograms:
        fraction = sum(h * c for h, c in zip(histogram, costs))
        rows.append({"policy": "stored", "budget": fraction, "exit_histogram": histogram, "speedup": 1 / fraction})
    return rows


def test_exit_costs_from_measured_rows_recovers_the_costs_that_explain_the_times():
    true_costs = [0.25, 0.45, 0.7, 1.05]
    histograms = [[0.9, 0.1, 0, 0], [0.5, 0.3, 0.2, 0], [0.2, 0.3, 0.3, 0.2], [0, 0.2, 0.3, 0.5], [0.1, 0.1, 0.1, 0.7]]
    rows = _rows_for(true_costs, histograms)
    costs = exit_costs_from_measured_rows(rows, [0.2, 0.4, 0.6, 1.0], prior_weight=1e-6)
    assert costs == pytest.approx(true_costs, abs=1e-3)
    # the full model's row is not a mixed batch: it is skipped, not fitted
    assert exit_costs_from_measured_rows(rows[1:], [0.2, 0.4, 0.6, 1.0], prior_weight=1e-6) == pytest.approx(costs)


def test_exit_costs_from_measured_rows_keeps_the_prior_where_no_sample_left_and_stays_increasing():
    # exit 2 never taken: its cost comes from the prior; a noisy solution is made strictly increasing
    rows = _rows_for([0.3, 0.5, 0.9, 1.0], [[0.6, 0.4, 0, 0], [0.2, 0.8, 0, 0], [0.3, 0.2, 0, 0.5], [0, 0.5, 0, 0.5]])
    costs = exit_costs_from_measured_rows(rows, [0.3, 0.5, 0.6, 1.0], prior_weight=1e-3)
    assert costs[:2] == pytest.approx([0.3, 0.5], abs=1e-2) and costs[2] == pytest.approx(0.6, abs=1e-2)
    backwards = [{"policy": "stored", "exit_histogram": [0.5, 0.5], "speedup": 1 / 0.5}]
    costs = exit_costs_from_measured_rows(backwards, [0.7, 0.3], prior_weight=1e-3)
    assert costs[0] < costs[1]


def test_exit_costs_from_measured_rows_is_the_best_fit_among_increasing_costs():
    # timings that say exit 1 is cheaper than exit 0: the best non-decreasing costs tie them at the mean, where
    # raising exit 1 to exit 0's cost (0.6, 0.6) would fit worse
    rows = _rows_for([0.6, 0.5, 1.0], [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    costs = exit_costs_from_measured_rows(rows, [0.6, 0.5, 1.0], prior_weight=1e-9)
    assert costs == pytest.approx([0.55, 0.55, 1.0], abs=1e-6) and costs[0] < costs[1] < costs[2]


@pytest.mark.parametrize(
    ("rows", "prior", "weight", "match"),
    [
        ([], [0.5, 1.0], 0.05, "No measured row"),
        ([{"policy": "full model", "exit_histogram": [0, 1], "speedup": 1.0}], [0.5, 1.0], 0.05, "No measured row"),
        (
            [{"policy": "p", "exit_histogram": [0.5, 0.5, 0], "speedup": 2.0}],
            [0.5, 1.0],
            0.05,
            "3 exits but there are 2",
        ),
        ([{"policy": "p", "exit_histogram": [0.5, 0.5], "speedup": 2.0}], [0.0, 1.0], 0.05, "positive costs"),
        ([{"policy": "p", "exit_histogram": [0.5, 0.5], "speedup": 2.0}], [0.5, 1.0], 0.0, "prior_weight"),
        ([{"policy": "p", "exit_histogram": [0.5, 0.5], "speedup": 2.0}], [0.5, math.inf], 0.05, "finite positive"),
        ([{"policy": "p", "exit_histogram": [0.5, 0.5], "speedup": math.inf}], [0.5, 1.0], 0.05, "`speedup`"),
        ([{"policy": "p", "speedup": 2.0}], [0.5, 1.0], 0.05, "no `exit_histogram`"),
    ],
)
def test_exit_costs_from_measured_rows_rejects_bad_input(rows, prior, weight, match):
    with pytest.raises(ValueError, match=match):
        exit_costs_from_measured_rows(rows, prior, prior_weight=weight)
