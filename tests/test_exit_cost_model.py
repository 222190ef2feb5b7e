"""`ExitCostModel`: per-sample exit costs with fixed segment costs, and the policies, engine and refit that use it."""

from __future__ import annotations

import json

import pytest
import torch
from test_modeling_eenet_vision import RESNET, random_images

from hf_eenet import ConfidenceThresholdPolicy, EENetPolicy, EENetResNetConfig, ExitCostModel
from hf_eenet.evaluation import exit_costs_from_measured_rows, simulated_budget_table, synthetic_exit_outputs
from hf_eenet.models.exit_policies import default_budget_grid, first_exit_over_threshold, global_thresholds

COSTS = [0.25, 0.6, 0.8, 0.95]
SEGMENTS = [0.04, 0.03, 0.03]
FAST = {"max_epochs": 30, "patience": 5, "restarts": 1}


def segment_model(batch_size: int = 16) -> ExitCostModel:
    return ExitCostModel(COSTS, SEGMENTS, batch_size)


def test_without_segment_costs_the_cost_is_the_weighted_sum_of_exit_costs():
    model = ExitCostModel(COSTS)
    fractions = torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.0, 0.0, 0.0, 1.0]])
    torch.testing.assert_close(model.of_fractions(fractions), fractions @ torch.tensor(COSTS))
    exits = torch.tensor([0, 0, 3, 1])
    assert float(model.of_exits(exits)) == pytest.approx((0.25 * 2 + 0.95 + 0.6) / 4)
    assert model.cheapest == 0.25 and model.deepest == 0.95
    assert torch.equal(model.per_sample_of_batch(exits), torch.tensor(COSTS)[exits])
    assert ExitCostModel.of(model) is model and ExitCostModel.of(COSTS) == model


def test_expected_cost_is_the_average_over_random_batches():
    model = segment_model(batch_size=8)
    fractions = torch.tensor([0.9, 0.06, 0.03, 0.01])
    generator = torch.Generator().manual_seed(0)
    exits = torch.multinomial(fractions, 8 * 20000, replacement=True, generator=generator).view(20000, 8)
    realised = torch.stack([model.per_sample_of_batch(batch).mean() for batch in exits]).mean()
    assert float(realised) == pytest.approx(float(model.of_fractions(fractions)), rel=0.01)
    # concave in the shares sent on: the first sample sent past exit 0 pays most of a segment's fixed cost
    alone = model.of_fractions(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    few = model.of_fractions(torch.tensor([0.99, 0.01, 0.0, 0.0]))
    many = model.of_fractions(torch.tensor([0.9, 0.1, 0.0, 0.0]))
    assert float(few - alone) > 0.1 * float(many - alone)
    assert model.deepest == pytest.approx(0.95 + 0.1)


def test_per_sample_costs_add_up_to_what_the_batch_ran():
    model = segment_model()
    exits = torch.tensor([0, 0, 0, 1, 3, 0, 0, 0])  # segments 1, 2, 3 each ran (on 2, 1, 1 samples)
    per_sample = model.per_sample_of_batch(exits)
    total = sum(COSTS[k] for k in exits.tolist()) + 8 * sum(SEGMENTS)
    assert float(per_sample.sum()) == pytest.approx(total)
    assert float(per_sample[0]) == pytest.approx(0.25)  # left at exit 0: ran no segment
    assert float(per_sample[3]) == pytest.approx(0.6 + 8 * 0.04 / 2)  # shares segment 1 with one other sample
    assert float(per_sample[4]) == pytest.approx(0.95 + 8 * (0.04 / 2 + 0.03 + 0.03))


def test_expected_cost_is_differentiable():
    fractions = torch.tensor([0.7, 0.2, 0.05, 0.05], requires_grad=True)
    segment_model().of_fractions(fractions).backward()
    assert torch.isfinite(fractions.grad).all() and (fractions.grad[1:] > fractions.grad[0]).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"segment_costs": SEGMENTS}, "go together"),
        ({"batch_size": 8}, "go together"),
        ({"segment_costs": SEGMENTS[:2], "batch_size": 8}, "must hold 3 finite non-negative"),
        ({"segment_costs": [0.1, -0.1, 0.0], "batch_size": 8}, "must hold 3 finite non-negative"),
        ({"segment_costs": SEGMENTS, "batch_size": 0}, "positive integer"),
        ({"segment_costs": SEGMENTS, "batch_size": 2.5}, "positive integer"),
    ],
)
def test_bad_cost_models_fail_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExitCostModel(COSTS, **kwargs)


def test_bad_segment_costs_fail_clearly_in_the_config():
    tiny = {"embedding_size": 8, "hidden_sizes": [8, 16, 32], "depths": [1, 1, 1], "layer_type": "basic"}
    with pytest.raises(ValueError, match="must hold 2 finite non-negative"):
        EENetResNetConfig(**tiny, exit_segment_costs=[0.1], exit_cost_batch_size=8)
    config = EENetResNetConfig(**tiny)
    with pytest.raises(ValueError, match="go together"):
        config.set_exit_costs(config.exit_costs, source="latency", segment_costs=[0.1, 0.1])
    assert config.exit_segment_costs is None  # nothing half-updated


# --- policies ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibration():
    return synthetic_exit_outputs(num_samples=1000, num_exits=4, num_labels=3, feature_size=8, seed=0)


@pytest.mark.parametrize(
    "make_policy",
    [
        lambda: ConfidenceThresholdPolicy(4, allocation="global"),
        lambda: ConfidenceThresholdPolicy(4, allocation="geometric"),
        lambda: EENetPolicy(4, **FAST),
    ],
    ids=["global", "geometric", "eenet"],
)
def test_policies_meet_budgets_in_the_segment_cost_model(calibration, make_policy):
    costs = segment_model(batch_size=64)
    budgets = [0.27, 0.3, 0.5]
    policy = make_policy().fit(calibration["exit_logits"], calibration["labels"], costs, budgets)
    linear = make_policy().fit(calibration["exit_logits"], calibration["labels"], COSTS, budgets)
    for index, budget in enumerate(budgets):
        exits = policy.simulate(calibration["exit_logits"], index)
        assert float(costs.of_exits(exits)) <= budget + 2e-3
        # priced per sample only, the same budget sends more samples on, and overspends in batches of 64
        linear_exits = linear.simulate(calibration["exit_logits"], index)
        assert (linear_exits > 0).float().mean() > (exits > 0).float().mean()
        assert float(costs.of_exits(linear_exits)) > budget + 0.01
    rows = simulated_budget_table({"policy": policy}, **{**calibration, "exit_costs": costs}, include_oracle=False)
    assert [row["cost"] <= row["budget"] + 2e-3 for row in rows] == [True] * len(budgets)


def test_budget_grid_reaches_the_cost_of_sending_everyone_deep():
    assert default_budget_grid(ExitCostModel([0.3, 0.6, 0.9], [0.05, 0.05], 8))[-1] == 0.95
    assert default_budget_grid([0.3, 0.6, 0.9])[-1] == 0.9


def test_global_thresholds_price_segments_per_batch(calibration):
    scores = calibration["exit_logits"].softmax(-1).amax(-1)
    thresholds = global_thresholds(scores, segment_model(64), 0.3)
    cost = segment_model(64).of_exits(first_exit_over_threshold(scores, thresholds))
    assert 0.25 < float(cost) <= 0.3 + 1e-6


# --- refitting on measured rows ----------------------------------------------------------------------------------------


def test_refit_keeps_the_segment_costs_and_recovers_the_per_sample_costs():
    truth = segment_model(batch_size=64)
    histograms = [[0.95, 0.04, 0.01, 0.0], [0.8, 0.1, 0.05, 0.05], [0.5, 0.2, 0.2, 0.1], [0.2, 0.2, 0.3, 0.3]]
    rows = [
        {"policy": "stored", "exit_histogram": h, "speedup": 1 / float(truth.of_fractions(torch.tensor(h)))}
        for h in histograms
    ]
    prior = ExitCostModel([0.3, 0.5, 0.7, 0.9], SEGMENTS, 64)
    refitted = exit_costs_from_measured_rows(rows, prior, prior_weight=1e-4)
    assert refitted == pytest.approx(COSTS, abs=0.01)
    # per-sample costs alone would have to lump the fixed costs into the exits the rows use
    assert exit_costs_from_measured_rows(rows, prior.exit_costs, prior_weight=1e-4)[0] > COSTS[0] + 0.01
    # a measured row's `cost` says which fixed costs its batches really paid (here: every segment, every batch)
    paid = [{**row, "cost": float(torch.tensor(row["exit_histogram"]) @ torch.tensor(prior.exit_costs)) + 0.1}
            for row in rows]  # fmt: skip
    for row, h in zip(paid, histograms):
        row["speedup"] = 1 / (float(torch.tensor(h) @ torch.tensor(COSTS)) + 0.1)
    assert exit_costs_from_measured_rows(paid, prior, prior_weight=1e-4) == pytest.approx(COSTS, abs=0.01)


# --- engine and config -------------------------------------------------------------------------------------------------


def test_early_exit_forward_reports_what_each_batch_cost(tmp_path):
    model = RESNET.model()  # 3 exits
    model.config.set_exit_costs([0.3, 0.6, 0.9], source="latency", segment_costs=[0.05, 0.04], batch_size=16)
    images = random_images(16, seed=3)
    logits = model(images, output_all_exits=True).all_exit_logits
    budgets = [0.4, 0.6]
    policy = ConfidenceThresholdPolicy(3).fit(logits, torch.randint(0, 3, (16,)), model.exit_cost_model(), budgets)
    model.set_exit_policy(policy)
    with torch.no_grad():
        for index, budget in enumerate(budgets):
            out = model(images, budget=budget)
            exits = out.exit_index
            assert torch.equal(exits, policy.simulate(logits, index))
            ran = [bool((exits >= k).any()) for k in (1, 2)]
            expected = sum([0.3, 0.6, 0.9][k] for k in exits.tolist()) / 16 + 0.05 * ran[0] + 0.04 * ran[1]
            assert float(out.exit_cost.mean()) == pytest.approx(expected)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["exit_segment_costs"] == [0.05, 0.04] and saved["exit_cost_batch_size"] == 16
    assert saved["eenet_format_version"] == 3
    loaded = RESNET.model_class.from_pretrained(tmp_path)
    assert loaded.exit_cost_model() == model.exit_cost_model()
    assert torch.equal(loaded(images, budget=0.4).exit_cost, model(images, budget=0.4).exit_cost)
    # other exit costs, or another exit layout, drop the segment costs measured with the saved ones
    recosted = EENetResNetConfig.from_pretrained(tmp_path, exit_costs=[0.2, 0.5, 1.0])
    assert recosted.exit_segment_costs is None and recosted.exit_cost_batch_size is None
    flops = EENetResNetConfig.from_pretrained(tmp_path, exit_cost_source="flops")
    assert flops.exit_costs == RESNET.config().flops_exit_costs() and flops.exit_segment_costs is None
    assert EENetResNetConfig.from_pretrained(tmp_path).exit_segment_costs == [0.05, 0.04]  # kept without overrides
    relaid = EENetResNetConfig.from_pretrained(tmp_path, exit_layers=[2, 3])
    assert relaid.exit_segment_costs is None and relaid.exit_cost_batch_size is None
    assert relaid.eenet_format_version == 1


def test_calibrate_exit_costs_measures_segment_costs():
    model = RESNET.model()
    images = random_images(8)
    costs = model.calibrate_exit_costs({"pixel_values": images}, num_repeats=3, num_warmup=1, segment_costs=True)
    config = model.config
    assert config.exit_cost_batch_size == 8 and len(config.exit_segment_costs) == 2
    assert all(c >= 0 for c in config.exit_segment_costs) and all(b > a for a, b in zip(costs, costs[1:]))
    assert model.exit_cost_model().deepest >= costs[-1]
    with pytest.raises(ValueError, match="at least 2 samples"):
        model.calibrate_exit_costs({"pixel_values": images[:1]}, num_repeats=1, segment_costs=True)
    model.calibrate_exit_costs({"pixel_values": images}, num_repeats=1, num_warmup=0)  # per-sample costs only
    assert config.exit_segment_costs is None and config.exit_cost_batch_size is None
