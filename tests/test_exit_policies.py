"""Exit policies: EENet (ours and paper-faithful) and the baselines: known-optimum synthetic data, budget matching,
monotonicity, determinism, persistence (config + state dict, and through a real model), engine = simulation, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import random_text_batch, tiny_bert_config

from hf_eenet import EENetBertForSequenceClassification
from hf_eenet.evaluation import synthetic_exit_outputs
from hf_eenet.models.exit_policies import (
    EXIT_POLICY_CLASSES,
    ConfidenceThresholdPolicy,
    EENetPaperPolicy,
    EENetPolicy,
    PatiencePolicy,
    StaticExitPolicy,
    default_budget_grid,
    exit_policy_from_config,
    expected_gain_scoring_functions,
    first_exit_over_threshold,
    geometric_exit_fractions,
    global_thresholds,
    match_thresholds,
    regret_scoring_functions,
    tilt_exit_fractions,
)

FAST = {"max_epochs": 30, "patience": 4, "phase_epochs": 5, "batch_size": 256, "restarts": 1}


def accuracy_and_cost(exit_logits, labels, exits, costs):
    predictions = exit_logits[torch.arange(len(labels)), exits].argmax(-1)
    return float((predictions == labels).float().mean()), float(torch.as_tensor(costs)[exits].mean())


def informative_exit_data(num_samples: int, seed: int):
    """
    Binary task, 3 exits, confidences uninformative (uniform in [0.55, 0.95] whatever the correctness). Exit 0 is
    always right when it predicts class 1 and right 2/3 of the time when it predicts class 0; exit 1 is right 80 % of
    the time; exit 2 always. The best policy at budget 0.85 sends exit 0's class-1 predictions (25 %) out at exit 0
    and everything else to exit 2: 100 % accuracy at cost 0.825. Max-prob cannot tell exit 0's right from wrong.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (num_samples,), generator=generator)
    flip = torch.rand(num_samples, generator=generator) < 0.5
    predictions = [
        torch.where(labels == 1, torch.where(flip, 0, 1), 0),
        torch.where(torch.rand(num_samples, generator=generator) < 0.8, labels, 1 - labels),
        labels,
    ]
    logits = []
    for prediction in predictions:
        confidence = 0.55 + 0.4 * torch.rand(num_samples, generator=generator)
        probs = torch.stack([1 - confidence, confidence], -1)
        probs = torch.where(prediction[:, None] == 1, probs, probs.flip(-1))
        logits.append(probs.log())
    return torch.stack(logits, 1), labels, [0.3, 0.65, 1.0]


@pytest.fixture(scope="module")
def synthetic():
    return synthetic_exit_outputs(num_samples=1000, num_exits=4, num_labels=3, feature_size=8, seed=0)


@pytest.fixture(scope="module")
def fitted(synthetic):
    """Every budget-matched policy fitted once on the synthetic calibration draw (module-scoped: fits are costly)."""
    budgets = [0.35, 0.5, 0.65, 0.8]
    args = (synthetic["exit_logits"], synthetic["labels"], synthetic["exit_costs"], budgets)
    policies = {
        f"{score}-{allocation}": ConfidenceThresholdPolicy(4, score=score, allocation=allocation).fit(*args)
        for score in ("max_prob", "entropy")
        for allocation in ("global", "geometric")
    }
    policies["eenet"] = EENetPolicy(4, **FAST).fit(*args, exit_features=synthetic["exit_features"])
    policies["eenet-no-features"] = EENetPolicy(4, **FAST).fit(*args)
    policies["eenet-paper"] = EENetPaperPolicy(4, **FAST).fit(*args)
    return policies


# --- known optimum -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy_class", [EENetPolicy, EENetPaperPolicy])
def test_eenet_finds_the_informative_exit_where_max_prob_cannot(policy_class):
    logits, labels, costs = informative_exit_data(2000, seed=0)
    test_logits, test_labels, _ = informative_exit_data(2000, seed=1)
    budgets = [0.5, 0.7, 0.85]
    eenet = policy_class(3, **FAST).fit(logits, labels, costs, budgets)
    max_prob = ConfidenceThresholdPolicy(3, allocation="global").fit(logits, labels, costs, budgets)
    geometric = ConfidenceThresholdPolicy(3, allocation="geometric").fit(logits, labels, costs, budgets)
    index = 2  # budget 0.85: the optimum is 100 % at cost 0.825
    eenet_accuracy, eenet_cost = accuracy_and_cost(test_logits, test_labels, eenet.simulate(test_logits, index), costs)
    baseline = max(
        accuracy_and_cost(test_logits, test_labels, policy.simulate(test_logits, index), costs)[0]
        for policy in (max_prob, geometric)
    )
    # the learned score ranks exit 0's class-1 predictions (always right) first: those are the ones that leave there
    exits = eenet.simulate(test_logits, index)
    early = exits == 0
    assert early.float().mean() > 0.1
    assert (test_logits[early, 0].argmax(-1) == 1).float().mean() > 0.95
    assert eenet_cost <= 0.85 + 0.02  # a fresh draw: the budget holds up to sampling noise
    assert eenet_accuracy > baseline, (eenet_accuracy, baseline)
    if policy_class is EENetPolicy:  # the allocation search also finds the right fraction (25 %): the optimum
        assert eenet_accuracy >= 0.97, eenet_accuracy
        assert eenet_accuracy >= baseline + 0.03, (eenet_accuracy, baseline)


def test_eenet_uses_the_pooled_features():
    """Exit 0 is right exactly on the samples whose pooled feature flag is on; only the features reveal it."""
    generator = torch.Generator().manual_seed(0)
    num_samples = 2000
    labels = torch.randint(0, 2, (num_samples,), generator=generator)
    flag = torch.rand(num_samples, generator=generator) < 0.4
    logits, features = [], []
    for k, prediction in enumerate([torch.where(flag, labels, 1 - labels), labels]):
        confidence = 0.55 + 0.4 * torch.rand(num_samples, generator=generator)
        probs = torch.stack([1 - confidence, confidence], -1)
        logits.append(torch.where(prediction[:, None] == 1, probs, probs.flip(-1)).log())
        noise = torch.randn(num_samples, 6, generator=generator)
        features.append(torch.cat([3.0 * flag[:, None].float() * (k == 0) + 0.1 * noise[:, :1], noise[:, 1:]], -1))
    logits = torch.stack(logits, 1)
    costs = [0.4, 1.0]
    policy = EENetPolicy(2, **FAST).fit(logits, labels, costs, [0.75], exit_features=features)
    assert policy.fitted_with_features and policy.fit_summary_[0]["scoring"].startswith("rich")
    exits = policy.simulate(logits, 0, features)
    accuracy, cost = accuracy_and_cost(logits, labels, exits, costs)
    assert cost <= 0.75 + 1e-6
    assert accuracy >= 0.97, accuracy  # the optimum (40 % out at exit 0, all right) is 100 % at cost 0.76
    max_prob = ConfidenceThresholdPolicy(2).fit(logits, labels, costs, [0.75])
    assert accuracy_and_cost(logits, labels, max_prob.simulate(logits, 0), costs)[0] < accuracy - 0.1


def test_eenet_without_hold_out_is_never_below_a_confidence_baseline_on_calibration(synthetic):
    """The baselines are candidates of EENet's selection: chosen on the whole calibration split, none is better."""
    logits, labels, costs = synthetic["exit_logits"], synthetic["labels"], synthetic["exit_costs"]
    budgets = [0.35, 0.5, 0.7]
    ours = EENetPolicy(logits.shape[1], **{**FAST, "max_epochs": 5, "validation_fraction": 0.0})
    ours.fit(logits, labels, costs, budgets)
    for score in ("max_prob", "entropy"):
        for allocation in ("global", "geometric"):
            baseline = ConfidenceThresholdPolicy(logits.shape[1], score=score, allocation=allocation)
            baseline.fit(logits, labels, costs, budgets)
            for index in range(len(budgets)):
                mine = accuracy_and_cost(logits, labels, ours.simulate(logits, index), costs)[0]
                theirs = accuracy_and_cost(logits, labels, baseline.simulate(logits, index), costs)[0]
                assert mine >= theirs - 2e-3, (score, allocation, budgets[index], mine, theirs)


def test_confidence_candidates_reproduce_the_baselines_inside_eenet(synthetic):
    """A candidate is an EENet scoring function: weight 1 on the confidence feature, thresholds on the fitting slice."""
    logits, labels, costs = synthetic["exit_logits"], synthetic["labels"], synthetic["exit_costs"]
    policy = EENetPolicy(logits.shape[1], **{**FAST, "max_epochs": 5, "validation_fraction": 0.0})
    policy.fit(logits, labels, costs, [0.5])
    static = policy._all_static_features(logits.float(), None)
    correct = (logits.argmax(-1) == labels[:, None]).float()
    trained = {"weight": torch.zeros(2, *policy.score_weight.shape[1:]), "bias": torch.zeros(2, policy.num_exits)}
    trained |= {
        "scores": torch.zeros(2, logits.shape[0], policy.num_exits),
        "fractions": torch.zeros(2, policy.num_exits),
    }
    budgets = torch.tensor([0.5])
    everything = torch.arange(logits.shape[0])
    extended = policy._add_candidates(trained, static, correct, torch.tensor(costs), budgets, everything)
    assert policy.extra_candidates == (
        EENetPolicy.REGRET_CANDIDATE,
        EENetPolicy.GAIN_CANDIDATE,
        *EENetPolicy.CONFIDENCE_CANDIDATES,
    )
    assert extended["weight"].shape[0] == 2 + len(policy.extra_candidates)
    assert extended["thresholds"][:2].isnan().all()  # trained models: thresholds matched to their fractions
    global_max_prob = 2 + policy.extra_candidates.index("max-prob (global)")
    baseline = ConfidenceThresholdPolicy(policy.num_exits).fit(logits, labels, costs, [0.5])
    exits = baseline.simulate(logits, 0)
    expected = torch.bincount(exits, minlength=policy.num_exits).float() / exits.numel()
    torch.testing.assert_close(extended["fractions"][global_max_prob], expected)
    torch.testing.assert_close(extended["thresholds"][global_max_prob], baseline.thresholds[0])  # the same rule
    torch.testing.assert_close(extended["scores"][global_max_prob], logits.float().softmax(-1).amax(-1))
    geometric = 2 + policy.extra_candidates.index("max-prob (geometric)")
    assert extended["thresholds"][geometric].isnan().all()


def test_regret_scores_send_on_the_samples_a_later_exit_fixes():
    """
    The regret score ranks by the chance that stopping loses to a later exit, not by confidence: samples that no
    later exit gets right are as cheap to stop as the confident ones.
    """
    generator = torch.Generator().manual_seed(0)
    num_samples = 4000
    confidence = torch.rand(num_samples, generator=generator)
    fixable = torch.rand(num_samples, generator=generator)  # a second feature: whether the next exit fixes it
    static = torch.stack([confidence, fixable], -1)[:, None].expand(num_samples, 2, 2).clone()
    correct = torch.zeros(num_samples, 2)
    correct[:, 0] = (torch.rand(num_samples, generator=generator) < confidence).float()
    correct[:, 1] = torch.maximum(correct[:, 0], (fixable > 0.5).float())
    weight, bias = regret_scoring_functions(static, correct, l2=1e-3)
    assert weight[1].abs().sum() == 0 and bias[1] == 0  # the last exit takes the rest
    assert weight[0, 0] > 0 and weight[0, 1] < 0  # confident and unfixable samples stop
    score = static[:, 0] @ weight[0] + bias[0]
    regret = correct[:, 1] > correct[:, 0]
    # the score separates the regret far better than confidence alone
    assert _auc(-score, regret) > _auc(-confidence, regret) + 0.1
    constant = regret_scoring_functions(static, correct.new_ones(num_samples, 2), max_prob_column=0)
    assert constant[0][0].tolist() == [1.0, 0.0]  # nothing to learn: the max-prob feature


def test_expected_gain_scores_follow_the_exit_a_sample_would_really_reach():
    """
    Three exits; group X is right only at exit 1, Y only at the last exit, Z everywhere. Against the last exit
    (one fit) going on from exit 0 gains X nothing, so the budget sends Z on before X and part of X stops there,
    wrong; the policy-iterated fit sees that the budget's own policy stops X at exit 1, where it is right, and sends
    it on instead of Z: every sample ends right.
    """
    generator = torch.Generator().manual_seed(0)
    group = torch.multinomial(torch.tensor([0.6, 0.1, 0.3]), 3000, replacement=True, generator=generator)
    one_hot = torch.nn.functional.one_hot(group, 3).float()
    noise = torch.rand(group.numel(), 1, generator=generator)
    static = torch.cat([one_hot, noise], -1)[:, None].expand(-1, 3, -1).clone()  # (N, K, F)
    correct = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]])[group]
    costs, budget = [0.3, 0.6, 1.0], 0.56  # X at exit 1, Y at exit 2, Z at exit 0 cost about 0.55

    def accuracy_and_cost_of(iterations):
        weight, bias = expected_gain_scoring_functions(static, correct, costs, budget, iterations=iterations)
        assert weight[-1].abs().sum() == 0 and bias[-1] == 0  # the last exit takes the rest
        scores = torch.einsum("nkf,kf->nk", static, weight) + bias
        exits = first_exit_over_threshold(scores, global_thresholds(scores, costs, budget))
        return float(correct[torch.arange(group.numel()), exits].mean()), float(torch.tensor(costs)[exits].mean())

    accuracy, cost = accuracy_and_cost_of(4)
    assert accuracy == 1.0 and cost <= budget
    one_fit_accuracy, _ = accuracy_and_cost_of(1)
    assert one_fit_accuracy < 0.8  # part of X stopped at exit 0, wrong
    always_right = torch.ones_like(correct, dtype=torch.bool)
    weight, bias = expected_gain_scoring_functions(static, always_right, costs, budget)
    assert weight.abs().sum() == 0 and bias.tolist() == [0.0, 0.0, 0.0]  # nothing to learn: no gain anywhere
    with pytest.raises(ValueError, match="`iterations` must be >= 1"):
        expected_gain_scoring_functions(static, correct, costs, budget, iterations=0)


def test_closed_form_scores_do_not_amplify_the_rounding_of_a_nearly_constant_feature():
    """
    A confidence that is ~1 for every sample (std 5e-6) but tells the groups apart exactly: standardised by its own
    spread it would get a weight of ~1e5 on its scale, and the float rounding of the feature (which differs between
    devices and kernels) would move scores by ~1e-2. Spreads below 0.01 count as 0.01: the weight keeps its sign but
    stays small, so rounding moves scores by no more than ~1e-5.
    """
    generator = torch.Generator().manual_seed(0)
    num_samples = 2000
    group = torch.rand(num_samples, generator=generator) < 0.5
    noise = torch.rand(num_samples, generator=generator)
    nearly_one = 1.0 - 1e-5 * group.float()
    static = torch.stack([noise, nearly_one], -1)[:, None].expand(num_samples, 2, 2).clone()
    correct = torch.ones(num_samples, 2)
    correct[:, 0] = (~group).float()  # the group exit 0 gets wrong, exit 1 fixes
    regret_weight, _ = regret_scoring_functions(static, correct)
    gain_weight, _ = expected_gain_scoring_functions(static, correct, [0.5, 1.0], 0.75)
    rounded = static.clone()
    rounded[..., 1] = torch.nextafter(rounded[..., 1], torch.tensor(0.0))  # one float32 step down
    for weight in (regret_weight, gain_weight):
        assert weight.abs().max() < 1e3
        assert weight[0, 1] > 0  # the lower confidence (the group exit 1 fixes) scores lower: it is sent on
        shift = (rounded[:, 0] @ weight[0]) - (static[:, 0] @ weight[0])
        assert shift.abs().max() < 1e-4


def test_the_expected_gain_candidate_of_each_budget_is_fitted_for_that_budget(synthetic):
    logits, labels, costs = synthetic["exit_logits"], synthetic["labels"], synthetic["exit_costs"]
    policy = EENetPolicy(logits.shape[1], **{**FAST, "max_epochs": 5, "validation_fraction": 0.0})
    policy.fit(logits, labels, costs, [0.4, 0.7])
    static = policy._all_static_features(logits.float(), None)
    correct = (logits.argmax(-1) == labels[:, None]).float()
    budgets = torch.tensor([0.4, 0.7])
    trained = {"weight": torch.zeros(2, *policy.score_weight.shape[1:]), "bias": torch.zeros(2, policy.num_exits)}
    trained |= {
        "scores": torch.zeros(2, logits.shape[0], policy.num_exits),
        "fractions": torch.zeros(2, policy.num_exits),
    }
    everything = torch.arange(logits.shape[0])
    extended = policy._add_candidates(trained, static, correct, costs, budgets, everything)
    per_budget = 1 + len(policy.extra_candidates)  # one trained model per budget here, then the candidates
    gain = 1 + policy.extra_candidates.index(EENetPolicy.GAIN_CANDIDATE)
    for m, budget in enumerate(budgets.tolist()):
        weight, bias = expected_gain_scoring_functions(static, correct, costs, budget, l2=policy.gain_l2)
        torch.testing.assert_close(extended["weight"][m * per_budget + gain, :, : static.shape[-1]], weight)
        torch.testing.assert_close(extended["bias"][m * per_budget + gain], bias)
        assert float(extended["budget"][m * per_budget + gain]) == pytest.approx(budget)
    assert not torch.equal(extended["weight"][gain], extended["weight"][per_budget + gain])
    with pytest.raises(ValueError, match="`gain_l2` must be > 0"):
        EENetPolicy(3, gain_l2=0.0)


def _auc(score: torch.Tensor, positive: torch.Tensor) -> float:
    ranks = score.argsort().argsort().double() + 1
    num_positive, num_negative = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - num_positive * (num_positive + 1) / 2) / (num_positive * num_negative))


def test_cross_validated_selection_holds_out_every_sample_once(synthetic):
    logits, labels, costs = synthetic["exit_logits"], synthetic["labels"], synthetic["exit_costs"]
    budgets = [0.35, 0.5, 0.7]
    policy = EENetPolicy(logits.shape[1], **{**FAST, "max_epochs": 5, "selection_folds": 3})
    calls = []
    original = policy._fit_candidates

    def recording(*args):
        calls.append((args[5].clone(), args[6]))  # the fitting slice and the early-stopping slice
        return original(*args)

    policy._fit_candidates = recording
    policy.fit(logits, labels, costs, budgets)
    num_samples = logits.shape[0]
    assert len(calls) == 4  # three folds and the final fit on everything
    held_out = torch.cat(
        [torch.tensor(sorted(set(range(num_samples)) - set(index.tolist()))) for index, _ in calls[:3]]
    )
    assert sorted(held_out.tolist()) == list(range(num_samples))  # every sample held out exactly once
    assert calls[3][0].tolist() == list(range(num_samples)) and all(v is None for _, v in calls)
    for index, row in enumerate(policy.fit_summary_):
        assert row["calibration_cost"] <= budgets[index] + 1e-6
        assert 0.0 <= row["heldout_accuracy"] <= 1.0
        if row["scoring"] in ("max-prob (global)", "entropy (global)") and row["allocation"] == "learned":
            score = "max_prob" if row["scoring"].startswith("max-prob") else "entropy"
            baseline = ConfidenceThresholdPolicy(policy.num_exits, score=score).fit(logits, labels, costs, budgets)
            assert torch.equal(policy.simulate(logits, index), baseline.simulate(logits, index))
    with pytest.raises(ValueError, match="selection_folds"):
        EENetPolicy(3, selection_folds=0)
    with pytest.raises(ValueError, match="regret_l2"):
        EENetPolicy(3, regret_l2=-1.0)
    with pytest.raises(ValueError, match="gain_l2"):
        EENetPolicy(3, gain_l2=math.nan)


def test_a_larger_budget_copies_a_smaller_ones_solution_only_on_held_out_evidence(synthetic, monkeypatch):
    """With cross-validation the copy rule reads the held-out hits of the chosen solutions, not in-sample ones."""
    logits, labels, costs = synthetic["exit_logits"], synthetic["labels"], synthetic["exit_costs"]
    policy = EENetPolicy(logits.shape[1], **{**FAST, "max_epochs": 5, "selection_folds": 2})
    original = policy._fit_and_choose
    held_out = {}

    def with_held_out_hits(*args):
        static, trained, chosen = original(*args)
        chosen.heldout_hits = held_out["hits"](chosen.heldout_hits)
        return static, trained, chosen

    monkeypatch.setattr(policy, "_fit_and_choose", with_held_out_hits)

    def smaller_budget_wins(hits):  # budget 0 right on 100 more held-out samples than budget 1
        hits = torch.zeros_like(hits)
        hits[0, :100] = 1.0
        return hits

    held_out["hits"] = smaller_budget_wins
    policy.fit(logits, labels, costs, [0.5, 0.7])
    assert [row["solution_of_budget"] for row in policy.fit_summary_] == [0.5, 0.5]
    assert torch.equal(policy.thresholds[1], policy.thresholds[0])
    held_out["hits"] = torch.ones_like  # a tie held out: each budget keeps its own solution
    policy.fit(logits, labels, costs, [0.5, 0.7])
    assert [row["solution_of_budget"] for row in policy.fit_summary_] == [0.5, 0.7]


def test_the_best_confidence_rule_stays_unless_a_candidate_beats_it_significantly():
    """The guard replaces the tuned heuristic only on held-out evidence: a paired sign test at `z` deviations."""
    policy = EENetPolicy(3, num_labels=2, selection_significance=1.0)
    trained = len(policy._variant_masks()) * policy.restarts
    num_candidates, num_allocations = trained + len(policy.extra_candidates), 2
    rule = (num_candidates - len(EENetPolicy.CONFIDENCE_CANDIDATES) + 1) * num_allocations  # the second rule, own
    challenger = 0  # the first trained variant, the best on held-out data
    totals = torch.zeros(1, num_candidates * num_allocations, dtype=torch.long)
    totals[0, rule] = 5  # the most accurate confidence rule on the whole calibration split
    hits = torch.zeros(1, totals.shape[1], 100)
    hits[0, rule, :50] = 1.0
    hits[0, challenger, 2:56] = 1.0  # won 6, lost 2: won - lost = 4 vs sqrt(8) = 2.8 deviations of 1
    best = torch.tensor([challenger])
    assert policy._guard_against_confidence(best, totals, hits, num_allocations).tolist() == [challenger]
    policy.selection_significance = 2.0  # 4 < 2 * 2.8: not significant
    assert policy._guard_against_confidence(best, totals, hits, num_allocations).tolist() == [rule]


def test_eenet_falls_back_to_a_confidence_rule_without_significant_evidence(synthetic):
    logits, labels, costs = synthetic["exit_logits"], synthetic["labels"], synthetic["exit_costs"]
    budgets = [0.35, 0.5, 0.7]
    strict = EENetPolicy(logits.shape[1], **{**FAST, "max_epochs": 5, "selection_significance": 1e9})
    strict.fit(logits, labels, costs, budgets)
    for index, row in enumerate(strict.fit_summary_):
        assert row["scoring"] in EENetPolicy.CONFIDENCE_CANDIDATES and row["allocation"] == "learned", row
        # `decide` scores such a budget from its one confidence feature: the same exits as the full scoring
        assert strict._confidence_rules(index) is not None
        general = first_exit_over_threshold(strict.exit_scores(logits, index), strict.thresholds[index])
        assert torch.equal(strict.simulate(logits, index), general)
    with torch.inference_mode():  # buffers made here track no version: `decide` works without its cache
        restored = exit_policy_from_config(strict.get_config())
        restored.load_state_dict(strict.state_dict())
        assert torch.equal(restored.simulate(logits, 0), strict.simulate(logits, 0))
    with pytest.raises(ValueError, match="selection_significance"):
        EENetPolicy(3, selection_significance=-1.0)


# --- budgets, monotonicity, determinism ----------------------------------------------------------------------------
def test_every_policy_meets_its_budget_on_the_calibration_split(synthetic, fitted):
    logits, labels, costs = synthetic["exit_logits"], synthetic["labels"], synthetic["exit_costs"]
    for name, policy in fitted.items():
        features = synthetic["exit_features"] if getattr(policy, "fitted_with_features", False) else None
        for index, budget in enumerate(policy.budgets):
            _, cost = accuracy_and_cost(logits, labels, policy.simulate(logits, index, features), costs)
            assert cost <= budget + 1e-6, (name, budget, cost)
            kept_smaller = (
                getattr(policy, "fit_summary_", None) and policy.fit_summary_[index]["solution_of_budget"] < budget
            )
            if not kept_smaller:  # EENet may keep a smaller budget's solution when it is more accurate (documented)
                assert cost >= 0.99 * budget, (name, budget, cost)


def test_fit_summary_matches_simulation(synthetic, fitted):
    logits, labels, costs = synthetic["exit_logits"], synthetic["labels"], synthetic["exit_costs"]
    policy = fitted["eenet"]
    for index, row in enumerate(policy.fit_summary_):
        accuracy, cost = accuracy_and_cost(
            logits, labels, policy.simulate(logits, index, synthetic["exit_features"]), costs
        )
        assert accuracy == pytest.approx(row["calibration_accuracy"], abs=1e-6)
        assert cost == pytest.approx(row["calibration_cost"], abs=1e-5)


@pytest.mark.parametrize("name", ["eenet", "eenet-no-features", "eenet-paper"])
def test_eenet_accuracy_is_non_decreasing_along_the_budget_grid(synthetic, fitted, name):
    logits, labels, costs = synthetic["exit_logits"], synthetic["labels"], synthetic["exit_costs"]
    policy = fitted[name]
    features = synthetic["exit_features"] if policy.fitted_with_features else None
    accuracies = [
        accuracy_and_cost(logits, labels, policy.simulate(logits, i, features), costs)[0]
        for i in range(len(policy.budgets))
    ]
    assert all(b >= a - 1e-9 for a, b in zip(accuracies, accuracies[1:])), accuracies
    assert accuracies[-1] > accuracies[0]


def test_eenet_beats_or_ties_max_prob_on_calibration(synthetic, fitted):
    logits, labels, costs = synthetic["exit_logits"], synthetic["labels"], synthetic["exit_costs"]
    for index in range(4):
        ours = accuracy_and_cost(
            logits, labels, fitted["eenet"].simulate(logits, index, synthetic["exit_features"]), costs
        )
        base = accuracy_and_cost(logits, labels, fitted["max_prob-global"].simulate(logits, index), costs)
        assert ours[0] >= base[0] - 0.01, (index, ours, base)


@pytest.mark.parametrize("policy_class", [EENetPolicy, EENetPaperPolicy])
def test_fitting_is_deterministic_under_a_seed(synthetic, policy_class):
    args = (synthetic["exit_logits"][:600], synthetic["labels"][:600], synthetic["exit_costs"], [0.4, 0.7])
    kwargs = {**FAST, "max_epochs": 25}
    features = [f[:600] for f in synthetic["exit_features"]] if policy_class is EENetPolicy else None
    first = policy_class(4, seed=3, **kwargs).fit(*args, exit_features=features)
    second = policy_class(4, seed=3, **kwargs).fit(*args, exit_features=features)
    for name, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[name]), name
    assert first.fit_summary_ == second.fit_summary_


def test_eenet_training_returns_each_models_best_epoch_state():
    """DESIGN step 4: the best state (lowest held-out loss within the budget tolerance) is kept, not the last one."""
    from hf_eenet.models.exit_cost_model import ExitCostModel
    from hf_eenet.models.exit_policies import _train_eenet

    generator = torch.Generator().manual_seed(0)
    num_samples, num_exits, num_static = 240, 3, 4
    static = torch.rand(num_samples, num_exits, num_static, generator=generator)
    correct = (torch.rand(num_samples, num_exits, generator=generator) < 0.7).float()
    masks = torch.ones(1, num_exits, num_static + num_exits - 1)
    masks[0, :, num_static:] = torch.tril(torch.ones(num_exits, num_exits - 1), diagonal=-1)

    def train(max_epochs: int, budget_tolerance: float) -> dict:
        return _train_eenet(
            static,
            correct,
            ExitCostModel([0.3, 0.6, 1.0]),
            torch.tensor([0.5, 0.7]),
            masks,
            torch.arange(160),
            torch.arange(160, num_samples),
            restarts=2,
            learning_rate=0.3,  # large: the held-out loss rises and falls, so the best epoch is not the last
            weight_decay=0.0,
            batch_size=64,
            max_epochs=max_epochs,
            patience=10_000,
            phase_epochs=2,
            hidden_ratio=0.5,
            budget_tolerance=budget_tolerance,
            max_prob_column=2,
            generator=torch.Generator().manual_seed(1),
        )

    kept = train(30, budget_tolerance=100.0)  # every epoch within the tolerance: the best one is kept
    last = train(30, budget_tolerance=-1.0)  # never within it: every model keeps its last state
    assert kept["epochs"] == last["epochs"] == 30 and last["best_epochs"].tolist() == [0] * 4
    best_epochs = kept["best_epochs"].tolist()
    assert all(1 <= epoch <= 30 for epoch in best_epochs)
    assert any(epoch < 30 for epoch in best_epochs)
    for model, epoch in enumerate(best_epochs):
        at_epoch = train(epoch, budget_tolerance=-1.0)  # the same run stopped after that epoch
        for key in ("weight", "bias", "fractions", "scores"):
            torch.testing.assert_close(kept[key][model], at_epoch[key][model], rtol=0, atol=0)
        if epoch < 30:
            assert not torch.equal(kept["weight"][model], last["weight"][model])


def test_eenet_fits_every_budget_in_one_batched_optimisation(synthetic, fitted):
    """All budgets share one run (one epoch count) and each has its own parameters."""
    policy = fitted["eenet-paper"]
    assert len({row["epochs"] for row in policy.fit_summary_}) == 1
    assert policy.score_weight.shape == (4, 4, policy.num_features)
    assert not torch.equal(policy.thresholds[0], policy.thresholds[-1])


# --- baselines -------------------------------------------------------------------------------------------------------
def test_geometric_allocation_follows_geometric_fractions(synthetic, fitted):
    logits, costs = synthetic["exit_logits"], synthetic["exit_costs"]
    policy = fitted["max_prob-geometric"]
    for index, budget in enumerate(policy.budgets):
        histogram = torch.bincount(policy.simulate(logits, index), minlength=4).float() / logits.shape[0]
        torch.testing.assert_close(histogram, geometric_exit_fractions(costs, budget), atol=2e-3, rtol=0)


def test_global_allocation_shares_one_threshold(fitted):
    thresholds = fitted["entropy-global"].thresholds
    assert torch.all(thresholds[:, :-1] == thresholds[:, :1]) and torch.all(thresholds[:, -1] == -math.inf)


def test_match_thresholds_and_tilting():
    scores = torch.rand(1, 1000, 3, generator=torch.Generator().manual_seed(0))
    fractions = torch.tensor([[[0.2, 0.3, 0.5]]])
    thresholds, exits = match_thresholds(scores, fractions)
    histogram = torch.bincount(exits[0, 0], minlength=3).float() / 1000
    torch.testing.assert_close(histogram, fractions[0, 0], atol=1e-3, rtol=0)
    assert thresholds[0, 0, -1] == -math.inf
    costs = torch.tensor([0.2, 0.6, 1.0])
    tilted = tilt_exit_fractions(torch.tensor([0.5, 0.3, 0.2]), costs, 0.7)
    assert float(tilted @ costs) == pytest.approx(0.7, abs=1e-5) and float(tilted.sum()) == pytest.approx(1.0)


def test_patience_policy_follows_pabee():
    # predictions per exit for 4 samples (4 exits): agree from exit 0, from exit 1, alternate, agree from exit 2
    predictions = torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 1], [1, 1, 0, 0]])
    logits = torch.nn.functional.one_hot(predictions, 2).float() * 3
    assert PatiencePolicy(4, patience=1).simulate(logits, None).tolist() == [1, 2, 3, 1]
    assert PatiencePolicy(4, patience=2).simulate(logits, None).tolist() == [2, 3, 3, 3]
    assert PatiencePolicy(4, patience=3).simulate(logits, None).tolist() == [3, 3, 3, 3]


@pytest.mark.parametrize("exit_index", [0, 1, 3])
def test_static_policy(synthetic, exit_index):
    exits = StaticExitPolicy(4, exit=exit_index).simulate(synthetic["exit_logits"], None)
    assert torch.all(exits == exit_index)


# --- persistence --------------------------------------------------------------------------------------------------
def storable_policies(fitted):
    return {**fitted, "patience": PatiencePolicy(4, patience=2), "static": StaticExitPolicy(4, exit=1)}


def test_every_storable_policy_round_trips_through_config_and_state_dict(synthetic, fitted):
    logits = synthetic["exit_logits"]
    for name, policy in storable_policies(fitted).items():
        config = json.loads(json.dumps(policy.get_config()))  # what config.json stores
        rebuilt = exit_policy_from_config(config)
        assert type(rebuilt) is type(policy) and rebuilt.get_config() == policy.get_config(), name
        rebuilt.load_state_dict(policy.state_dict())
        features = synthetic["exit_features"] if getattr(policy, "fitted_with_features", False) else None
        for index in range(len(policy.budgets)) if policy.requires_budget else [None]:
            assert torch.equal(rebuilt.simulate(logits, index, features), policy.simulate(logits, index, features)), (
                name
            )


def test_policy_configs_of_another_version_fail_clearly(synthetic, fitted):
    config = fitted["eenet"].get_config()
    with pytest.raises(ValueError, match=r"unknown hyperparameters \['newer_option'\].*EENetPolicy takes \["):
        exit_policy_from_config({**config, "newer_option": 1})
    with pytest.raises(ValueError, match=r"'patience' exit policy config has no \['num_exits'\]"):
        exit_policy_from_config({"policy_type": "patience", "patience": 2})
    with pytest.raises(ValueError, match="must be an index of the fitted budgets"):
        fitted["eenet"].simulate(synthetic["exit_logits"], 0.5, synthetic["exit_features"])  # a budget, not an index


def test_call_time_budget_uses_nearest_fitted_budget_not_above(fitted):
    policy = fitted["eenet"]
    assert policy.budget_index(0.5) == 1 and policy.budget_index(0.64) == 1 and policy.budget_index(0.99) == 3
    with pytest.raises(ValueError, match="below the smallest fitted budget 0.35"):
        policy.budget_index(0.3)


def fit_on_model(model, policy, batches, seed=0, budgets=(0.4, 0.55, 0.7, 0.9)):
    with torch.no_grad():
        outputs = [model(**batch, output_all_exits=True, output_exit_features=True) for batch in batches]
    logits = torch.cat([o.all_exit_logits for o in outputs])
    features = [torch.cat(f) for f in zip(*(o.all_exit_features for o in outputs))]
    labels = torch.randint(
        0, model.config.num_labels, (logits.shape[0],), generator=torch.Generator().manual_seed(seed)
    )
    policy.fit(logits, labels, model.config.exit_costs, list(budgets), exit_features=features)
    return logits, features


@pytest.mark.parametrize("policy_class", [EENetPolicy, EENetPaperPolicy])
def test_engine_with_fitted_eenet_matches_simulation_and_survives_save_load(tmp_path, policy_class):
    model = EENetBertForSequenceClassification(tiny_bert_config(exit_pooling="mean")).eval()
    batches = [random_text_batch(32, seed=s) for s in range(3)]
    policy = policy_class(model.config.num_exits, **{**FAST, "max_epochs": 25})
    logits, features = fit_on_model(model, policy, batches)
    model.set_exit_policy(policy)
    model.save_pretrained(tmp_path)
    loaded = EENetBertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.exit_policy == model.config.exit_policy
    assert type(loaded.exit_policy) is policy_class
    with torch.no_grad():
        for index, budget in enumerate(policy.budgets):
            simulated = policy.simulate(logits, index, features if policy_class is EENetPolicy else None)
            engine = torch.cat([model(**batch, budget=budget).exit_index for batch in batches])
            reloaded = torch.cat([loaded(**batch, budget=budget).exit_index for batch in batches])
            assert torch.equal(engine, simulated), budget
            assert torch.equal(reloaded, engine), budget
        assert len(set(torch.cat([model(**b, budget=0.55).exit_index for b in batches]).tolist())) > 1


def test_engine_with_patience_matches_simulation():
    model = EENetBertForSequenceClassification(tiny_bert_config()).eval()
    batch = random_text_batch(24, seed=7)
    with torch.no_grad():
        logits = model(**batch, output_all_exits=True).all_exit_logits
        for patience in (1, 2):
            policy = PatiencePolicy(3, patience=patience)
            assert torch.equal(model(**batch, exit_policy=policy).exit_index, policy.simulate(logits, None))


# --- errors ------------------------------------------------------------------------------------------------------------
def test_clear_errors_for_bad_fit_input(synthetic):
    logits, labels, costs = synthetic["exit_logits"], synthetic["labels"], synthetic["exit_costs"]
    for policy in (ConfidenceThresholdPolicy(4), EENetPolicy(4, **FAST), EENetPaperPolicy(4, **FAST)):
        with pytest.raises(ValueError, match=r"`labels` must have shape \(1000,\)"):
            policy.fit(logits, labels[:-1], costs, [0.5])
        with pytest.raises(ValueError, match="zero samples"):
            policy.fit(logits[:0], labels[:0], costs, [0.5])
        with pytest.raises(ValueError, match=r"below the cheapest exit's cost 0\.26.*smallest budget allowed"):
            policy.fit(logits, labels, costs, [0.1, 0.5])
        with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 2\]"):
            policy.fit(logits, labels + 1, costs, [0.5])
        with pytest.raises(ValueError, match="at least one budget"):
            policy.fit(logits, labels, costs, [])
        with pytest.raises(ValueError, match="must have shape \\(num_samples, 4, num_labels\\)"):
            policy.fit(logits[:, :3], labels, costs, [0.5])
        with pytest.raises(ValueError, match="`exit_costs` must hold 4 costs"):
            policy.fit(logits, labels, costs[:3], [0.5])
    with pytest.raises(ValueError, match=r"`exit_features\[0\]` must have shape \(1000, feature_size\)"):
        EENetPolicy(4).fit(logits, labels, costs, [0.5], exit_features=[f[:10] for f in synthetic["exit_features"]])


def test_clear_errors_for_bad_policy_configs():
    with pytest.raises(ValueError, match=r"Unknown exit policy type 'nope'; known types: \["):
        exit_policy_from_config({"policy_type": "nope", "num_exits": 3})
    assert {"confidence-threshold", "eenet", "eenet-paper", "patience", "static"} <= set(EXIT_POLICY_CLASSES)
    with pytest.raises(ValueError, match="`score` must be 'max_prob' or 'entropy', got 'margin'"):
        ConfidenceThresholdPolicy(3, score="margin")
    with pytest.raises(ValueError, match=r"`patience` must be an integer in \[1, 2\], got 3"):
        PatiencePolicy(3, patience=3)
    with pytest.raises(ValueError, match=r"`exit` must be an integer in \[0, 2\], got 5"):
        StaticExitPolicy(3, exit=5)
    with pytest.raises(ValueError, match="`learning_rate` must be a finite number > 0"):
        EENetPolicy(3, learning_rate=-1.0)
    with pytest.raises(ValueError, match="needs `num_labels`"):
        EENetPaperPolicy(3, budgets=[0.5])


def test_eenet_fitted_with_features_needs_them_at_inference(synthetic, fitted):
    policy = fitted["eenet"]
    with pytest.raises(ValueError, match="fitted with exit features .* got `features=None`"):
        policy.simulate(synthetic["exit_logits"], 0)
    bad = [f[:, :5] for f in synthetic["exit_features"]]
    with pytest.raises(ValueError, match=r"Exit 0's features must have shape \(batch, 8\)"):
        policy.simulate(synthetic["exit_logits"], 0, bad)
    assert not fitted["eenet-no-features"].fitted_with_features
    fitted["eenet-no-features"].simulate(synthetic["exit_logits"], 0)  # works without features


def test_unbudgeted_policy_refuses_a_budget():
    policy = PatiencePolicy(3, patience=1)
    with pytest.raises(ValueError, match="not budget-matched, so it cannot honour budget 0.5"):
        policy.budget_index(0.5)
    model = EENetBertForSequenceClassification(tiny_bert_config()).eval()
    model.set_exit_policy(policy)
    with pytest.raises(ValueError, match="not budget-matched"):
        model(**random_text_batch(2), budget=0.5)


def test_a_stored_unbudgeted_policy_runs_without_a_budget(tmp_path):
    """A stored patience policy is what a plain call runs (it needs no budget); budget=1.0 still is the full model."""
    model = EENetBertForSequenceClassification(tiny_bert_config(num_hidden_layers=4)).eval()
    model.set_exit_policy(PatiencePolicy(model.config.num_exits, patience=1))
    model.save_pretrained(tmp_path)
    loaded = EENetBertForSequenceClassification.from_pretrained(tmp_path).eval()
    batch = random_text_batch(16, seed=1)
    with torch.no_grad():
        explicit = model(**batch, exit_policy=PatiencePolicy(model.config.num_exits, patience=1))
        for candidate in (model, loaded):
            plain = candidate(**batch)
            assert torch.equal(plain.exit_index, explicit.exit_index)
            torch.testing.assert_close(plain.logits, explicit.logits)
        assert int(explicit.exit_index.min()) < model.config.num_exits - 1  # it really exits early
        full = model(**batch, budget=1.0)
        assert bool((full.exit_index == model.config.num_exits - 1).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_policy_stays_float32_in_a_half_precision_model(tmp_path, dtype):
    """`.to(dtype)` and `from_pretrained(dtype=...)` cast the model, not its fitted policy; decisions still follow it."""
    model = EENetBertForSequenceClassification(tiny_bert_config(exit_pooling="mean")).eval()
    batches = [random_text_batch(32, seed=s) for s in range(3)]
    policy = EENetPolicy(model.config.num_exits, **{**FAST, "max_epochs": 25})
    fit_on_model(model, policy, batches)
    model.set_exit_policy(policy)
    model.save_pretrained(tmp_path)
    for half in (
        EENetBertForSequenceClassification.from_pretrained(tmp_path).eval().to(dtype),
        EENetBertForSequenceClassification.from_pretrained(tmp_path, dtype=dtype).eval(),
    ):
        assert half.bert.embeddings.word_embeddings.weight.dtype == dtype
        for name, buffer in half.exit_policy.named_buffers():
            assert buffer.dtype == torch.float32, name
            assert torch.equal(buffer, model.exit_policy.get_buffer(name)), name
        with torch.no_grad():
            for batch in batches:
                all_exits = half(**batch, output_all_exits=True, output_exit_features=True)
                assert all_exits.all_exit_logits.dtype == dtype
                simulated = half.exit_policy.simulate(all_exits.all_exit_logits, 1, all_exits.all_exit_features)
                assert torch.equal(half(**batch, budget=policy.budgets[1]).exit_index, simulated)


def test_budget_grids_costs_and_simulate_inputs_are_checked():
    data = synthetic_exit_outputs(num_samples=60, num_exits=3, num_labels=3, seed=0)
    logits, labels, costs = data["exit_logits"], data["labels"], data["exit_costs"]
    policy = ConfidenceThresholdPolicy(3)
    for grid in ([0.5, 1.5], [0.5, 1.0], [0.9999999]):  # 1.0 runs the full model: nothing to fit
        with pytest.raises(ValueError, match=r"`budgets` to fit must lie in \(0, 1\), got \[.*a budget of 1.0 runs"):
            policy.fit(logits, labels, costs, grid)
    with pytest.raises(ValueError, match="strictly increasing"):
        policy.fit(logits, labels, [costs[1], costs[0], costs[2]], [0.9])
    with pytest.raises(ValueError, match="strictly increasing"):
        policy.fit(logits, labels, [costs[0], math.nan, costs[2]], [0.9])
    with pytest.raises(ValueError, match="step > 0"):
        default_budget_grid(costs, step=0)
    # measured costs on a busy machine can put the last exit below budgets of the grid: those are left out
    assert default_budget_grid([0.13, 0.3, 0.54]) == [0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5]
    with pytest.raises(
        ValueError,
        match=r"between the cheapest exit's cost \(0.050\) and the cost of sending every sample to the last exit \(0.100\)",
    ):
        default_budget_grid([0.05, 0.1])
    with pytest.raises(ValueError, match="not been fitted"):
        policy.simulate(logits, 0)
    # float32 budgets (0.4 is 0.4000000059604645) are kept as the budgets they stand for
    policy.fit(logits, labels, costs, torch.tensor([0.6, 0.8]))
    assert policy.budgets == [0.6, 0.8] and policy.budget_index(0.6) == 0
    with pytest.raises(ValueError, match=r"shape \(num_samples, 3, num_labels\)"):
        policy.simulate(logits[:, :2], 0)
    with pytest.raises(ValueError, match=r"index of the fitted budgets, 0..1, got 2"):
        policy.simulate(logits, 2)
    with pytest.raises(ValueError, match=r"index of the fitted budgets, 0..1, got None"):
        policy.simulate(logits, None)


def test_unbudgeted_fit_and_feature_values_are_checked():
    data = synthetic_exit_outputs(num_samples=60, num_exits=3, num_labels=3, seed=0)
    logits, labels, costs = data["exit_logits"], data["labels"], data["exit_costs"]
    with pytest.raises(ValueError, match=r"`labels` must have shape \(60,\)"):
        StaticExitPolicy(3).fit(logits, labels[:3], costs)
    features = [torch.randn(60, 4) for _ in range(3)]
    features[1][5, 0] = math.nan
    with pytest.raises(ValueError, match=r"`exit_features\[1\]` contains NaN"):
        EENetPolicy(3, max_epochs=2).fit(logits, labels, costs, [0.9], features)


@pytest.mark.parametrize("make", ["global", "geometric", "eenet-paper", "eenet"])
def test_a_budget_above_the_last_exits_cost_sends_everything_there(make):
    """Measured costs can end below 1.0: a budget above the last exit's cost is met by every allocation."""
    data = synthetic_exit_outputs(num_samples=400, num_exits=3, num_labels=3, seed=0)
    policy = {
        "global": lambda: ConfidenceThresholdPolicy(3),
        "geometric": lambda: ConfidenceThresholdPolicy(3, allocation="geometric"),
        "eenet-paper": lambda: EENetPaperPolicy(3, max_epochs=5),
        "eenet": lambda: EENetPolicy(3, max_epochs=5),
    }[make]()
    policy.fit(data["exit_logits"], data["labels"], [0.2, 0.4, 0.6], [0.5, 0.8])
    assert (policy.simulate(data["exit_logits"], 1) == 2).all()
    assert torch.equal(geometric_exit_fractions([0.2, 0.4, 0.6], 0.8), geometric_exit_fractions([0.2, 0.4, 0.6], 0.6))
    with pytest.raises(ValueError, match="budget 0.1 is below the cheapest exit's cost 0.2000"):
        geometric_exit_fractions([0.2, 0.4, 0.6], 0.1)


def test_budgets_are_matched_at_six_decimals(synthetic):
    """
    A float32 budget (a tensor's 0.7 is 0.69999999) is the fitted 0.7, not the budget below it; a budget at an exit's
    exact cost stays meetable whichever way six decimals round it.
    """
    logits, labels, costs = synthetic["exit_logits"], synthetic["labels"], synthetic["exit_costs"]
    grid = torch.tensor([0.35, 0.45, 0.5, 0.7, 0.9])  # float32: 0.35, 0.45, 0.7 and 0.9 round down
    policy = ConfidenceThresholdPolicy(4).fit(logits, labels, costs, grid)
    assert policy.budgets == [0.35, 0.45, 0.5, 0.7, 0.9]
    for index, budget in enumerate(grid):
        assert policy.budget_index(budget.item()) == index
        assert policy.budget_index(float(budget) - 1e-7) == index  # within half a unit of the sixth decimal
    assert policy.budget_index(0.7 - 1e-5) == 2  # a real step below is the budget below
    for cheapest in (0.2601119255, 0.2601114):  # six decimals round these up and down
        exact = [cheapest, *costs[1:]]
        policy = ConfidenceThresholdPolicy(4).fit(logits, labels, exact, [cheapest, 0.5])
        assert policy.budgets[0] >= cheapest - 5e-7 and policy.budget_index(cheapest) == 0


def test_fit_refuses_probabilities_and_budgets_that_are_not_a_list_of_numbers(synthetic):
    logits, labels, costs = synthetic["exit_logits"], synthetic["labels"], synthetic["exit_costs"]
    for policy in (ConfidenceThresholdPolicy(4), EENetPolicy(4, **FAST)):
        with pytest.raises(ValueError, match="look like probabilities .* take the exits' logits"):
            policy.fit(logits.softmax(-1), labels, costs, [0.5])
    policy = ConfidenceThresholdPolicy(4).fit(logits.log_softmax(-1), labels, costs, [0.5])  # log-probabilities work
    with pytest.raises(ValueError, match="look like probabilities"):
        policy.simulate(logits.softmax(-1), 0)
    with pytest.raises(TypeError, match=r"`budgets` must be a sequence of budgets .* got float: 0\.5"):
        ConfidenceThresholdPolicy(4).fit(logits, labels, costs, 0.5)
    with pytest.raises(TypeError, match="`budgets` must be a number .* got str: '0.5'"):
        ConfidenceThresholdPolicy(4).fit(logits, labels, costs, ["0.5"])
    with pytest.raises(ValueError, match=r"`budgets` to fit must lie in \(0, 1\), got \[0.5, 1.5\]"):
        ConfidenceThresholdPolicy(4).fit(logits, labels, costs, [0.5, 1.5])
    with pytest.raises(
        ValueError, match=r"probabilities.clamp_min\(torch.finfo\(probabilities.dtype\).tiny\).log\(\)"
    ):
        ConfidenceThresholdPolicy(4).fit(logits.softmax(-1), labels, costs, [0.5])


def test_default_budget_grid_never_passes_stop():
    assert default_budget_grid([0.1, 0.4, 0.7, 1.02], 0.2, 0.95, 0.1) == [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert default_budget_grid([0.1, 0.4, 0.7, 1.02], 0.2, 0.9, 0.25) == [0.2, 0.45, 0.7]
    assert default_budget_grid([0.1, 0.4, 0.7, 1.0])[-1] == 0.95


def test_decisions_ignore_the_callers_autocast(synthetic, fitted):
    """Policies decide in float32 as fitted, also when the caller runs under `torch.autocast`."""
    logits, features = synthetic["exit_logits"], synthetic["exit_features"]
    policy = fitted["eenet"]
    plain = policy.simulate(logits, 1, features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(policy.simulate(logits, 1, features), plain)
    model = EENetBertForSequenceClassification(tiny_bert_config()).eval()
    confidence = ConfidenceThresholdPolicy(model.config.num_exits)
    fit_on_model(model, confidence, [random_text_batch(16, seed=s) for s in range(2)], budgets=(0.6,))
    model.set_exit_policy(confidence)
    seen = []
    decide = model.exit_policy.decide
    model.exit_policy.decide = lambda *args: seen.append(torch.is_autocast_enabled("cpu")) or decide(*args)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(**random_text_batch(8), budget=0.6)
    assert seen and not any(seen)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_eenet_fits_under_no_grad_and_inference_mode(synthetic, mode):
    """Fitting right after caching exit outputs, still inside the caller's `no_grad` / `inference_mode`."""
    data = {key: synthetic[key][:300] for key in ("exit_logits", "labels")}
    features = [f[:300] for f in synthetic["exit_features"]]
    fast = {**FAST, "max_epochs": 5}
    expected = EENetPaperPolicy(4, **fast).fit(**data, exit_costs=synthetic["exit_costs"], budgets=[0.5])
    with mode():
        for policy_class in (EENetPaperPolicy, EENetPolicy):
            policy = policy_class(4, **fast).fit(
                **data, exit_costs=synthetic["exit_costs"], budgets=[0.5], exit_features=features
            )
            assert policy.is_fitted
        paper = EENetPaperPolicy(4, **fast).fit(**data, exit_costs=synthetic["exit_costs"], budgets=[0.5])
    assert torch.equal(paper.thresholds, expected.thresholds)  # the same fit as with gradients on


def test_a_policy_fitted_under_inference_mode_holds_ordinary_tensors(synthetic):
    """Its tensors can be loaded into later (inference tensors refuse in-place updates outside inference mode)."""
    data = {key: synthetic[key][:300] for key in ("exit_logits", "labels")}
    policies = [
        ConfidenceThresholdPolicy(4),
        ConfidenceThresholdPolicy(4, allocation="geometric"),
        EENetPaperPolicy(4, **{**FAST, "max_epochs": 3}),
        EENetPolicy(4, **{**FAST, "max_epochs": 3}),
    ]
    with torch.inference_mode():
        for policy in policies:
            policy.fit(**data, exit_costs=synthetic["exit_costs"], budgets=[0.5, 0.7])
    for policy in policies:
        assert not any(tensor.is_inference() for tensor in policy.state_dict().values()), policy.policy_type
        policy.load_state_dict(policy.state_dict())
        assert policy.simulate(data["exit_logits"], 1).shape == (300,)


@pytest.mark.parametrize(("num_samples", "selection_folds"), [(20, 5), (100, 5), (1000, 1)])
def test_a_confidence_rule_chosen_without_cross_validation_makes_that_rules_decisions(num_samples, selection_folds):
    """Below 50 samples per fold (or with one held-out slice) EENet still keeps the chosen global rule's threshold."""
    calibration = synthetic_exit_outputs(num_samples, 4, 3, 16, seed=1)
    test = synthetic_exit_outputs(3000, 4, 3, 16, seed=99)["exit_logits"]
    fit = (calibration["exit_logits"], calibration["labels"], calibration["exit_costs"], [0.35, 0.5, 0.65, 0.8])
    eenet = EENetPolicy(4, selection_folds=selection_folds, **FAST).fit(*fit)
    baseline = ConfidenceThresholdPolicy(4).fit(*fit)
    kept = [m for m, row in enumerate(eenet.fit_summary_) if (row["scoring"], row["allocation"]) == (
        "max-prob (global)", "learned") and row["solution_of_budget"] == row["budget"]]  # fmt: skip
    assert kept  # the synthetic data make EENet keep the rule at some budget
    for m in kept:
        torch.testing.assert_close(eenet.thresholds[m], baseline.thresholds[m])
        assert torch.equal(eenet.simulate(test, m), baseline.simulate(test, m))


def test_quantile_matching_never_overspends_on_a_tiny_split():
    """Rounding the exit counts must not drop a sample that a tiny fraction sends early (one sample here)."""
    logits = torch.randn(1, 3, 3, generator=torch.Generator().manual_seed(0)) * 3
    costs = [0.3334659791821815, 0.666931958364363, 1.0003979375465444]
    fractions = torch.tensor([[[0.000597, 0.0, 0.999403]]])  # expected cost just below 1.0
    _, exits = match_thresholds(logits.softmax(-1).amax(-1)[None], fractions)
    assert int(exits[0, 0, 0]) == 0  # the one sample leaves at exit 0: its share rounds up, never down
    for policy in (EENetPaperPolicy(3, **FAST), EENetPolicy(3, **FAST), ConfidenceThresholdPolicy(3)):
        policy.fit(logits, torch.tensor([1]), costs, [0.9, 0.99])
        for m, budget in enumerate(policy.budgets):
            exit_index = policy.simulate(logits, m)
            assert costs[int(exit_index)] <= budget + 5e-7


def test_global_thresholds_do_not_depend_on_the_order_of_the_samples():
    """Costs priced in float64: a budget exactly at a reachable cost is met the same way in any sample order."""
    scores = torch.tensor([[0.1 * i, 1.0] for i in range(10)])
    for order in (
        torch.arange(10),
        torch.arange(9, -1, -1),
        torch.randperm(10, generator=torch.Generator().manual_seed(0)),
    ):
        thresholds = global_thresholds(scores[order], [0.1, 0.7], 0.4)
        assert int((scores[:, 0] >= thresholds[0]).sum()) == 5  # 5 x 0.1 + 5 x 0.7 = 0.4 per sample, exactly


def test_eenet_scores_do_not_depend_on_the_batch(fitted, synthetic):
    """A sample's score is the same alone as in the whole split (no batch-size-dependent summation order)."""
    policy = fitted["eenet"]
    logits, features = synthetic["exit_logits"][:64], [f[:64] for f in synthetic["exit_features"]]
    whole = policy.exit_scores(logits, 1, features)
    alone = torch.cat([policy.exit_scores(logits[i : i + 1], 1, [f[i : i + 1] for f in features]) for i in range(64)])
    assert torch.equal(alone, whole)
