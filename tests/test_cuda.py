"""
The early-exit engine on an accelerator: the same guarantees as on the CPU. Runs where a CUDA device is present
(`HF_EENET_TEST_DEVICE` picks another device, e.g. `mps`, or `cpu` to check these tests themselves).
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import left_padded, random_text_batch, tiny_bert_config
from test_exit_policies import FAST, fit_on_model
from test_modeling_eenet_vision import BACKBONES, exit_patterns, random_images
from test_scheduler_trainer import scheduler_args
from test_trainer import tiny_model, token_dataset
from transformers import BertTokenizer, pipeline

from hf_eenet import EENetBertForSequenceClassification, EENetPolicy, ForcedExitPolicy
from hf_eenet.trainer import ExitSchedulerTrainer

CUDA = torch.device(os.environ.get("HF_EENET_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")


def bert_case(batch_size: int, seed: int):
    model = EENetBertForSequenceClassification(tiny_bert_config(exit_pooling="mean")).eval()
    return model, random_text_batch(batch_size, seed=seed)


def vision_case(backbone, batch_size: int, seed: int):
    return backbone.model(), {"pixel_values": random_images(batch_size, seed=seed)}


CASES = {
    "bert": bert_case,
    **{b.name: (lambda batch_size, seed, b=b: vision_case(b, batch_size, seed)) for b in BACKBONES},
}
by_backbone = pytest.mark.parametrize("name", list(CASES))


def on_cuda(batch: dict) -> dict:
    return {key: value.to(CUDA) for key, value in batch.items()}


@by_backbone
@pytest.mark.parametrize("batch_size", [1, 7, 32])
def test_early_exit_logits_equal_all_exits_logits_on_cuda(name, batch_size):
    model, batch = CASES[name](batch_size, seed=batch_size)
    model, batch = model.to(CUDA), on_cuda(batch)
    with torch.no_grad():
        reference = model(**batch, output_all_exits=True).all_exit_logits
        assert reference.device.type == CUDA.type
        for pattern, targets in exit_patterns(batch_size, model.config.num_exits).items():
            out = model(**batch, exit_policy=ForcedExitPolicy(targets))
            assert out.logits.device.type == CUDA.type and out.exit_index.device.type == CUDA.type
            assert torch.equal(out.exit_index.cpu(), targets), pattern
            expected = reference[torch.arange(batch_size, device=CUDA), targets.to(CUDA)]
            torch.testing.assert_close(out.logits, expected, atol=1e-4, rtol=1e-4, msg=pattern)
            torch.testing.assert_close(out.exit_cost.cpu(), torch.tensor(model.config.exit_costs)[targets])


@by_backbone
def test_cuda_matches_cpu(name):
    model, batch = CASES[name](9, seed=5)
    with torch.no_grad():
        cpu = model(**batch, output_all_exits=True).all_exit_logits
        cuda = model.to(CUDA)(**on_cuda(batch), output_all_exits=True).all_exit_logits
    torch.testing.assert_close(cuda.cpu(), cpu, atol=1e-4, rtol=1e-4)


def fitted_eenet(model, batches) -> EENetPolicy:
    """EENet fitted on the model's own outputs for four budgets between its cheapest exit and the full model."""
    policy = EENetPolicy(model.config.num_exits, **{**FAST, "max_epochs": 25})
    cheapest = model.config.exit_costs[0]
    budgets = [round(cheapest + fraction * (1 - cheapest), 3) for fraction in (0.1, 0.35, 0.6, 0.85)]
    fit_on_model(model, policy, batches, budgets=budgets)
    return policy


@by_backbone
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fitted_eenet_on_cuda_decides_as_simulated(name, dtype, tmp_path):
    """Fit on CUDA outputs, store, reload on CUDA in `dtype`: the engine takes the simulated exits, budgets hold."""
    model, _ = CASES[name](1, seed=0)
    batches = [on_cuda(CASES[name](32, seed=seed)[1]) for seed in range(3)]
    model = model.to(CUDA)
    model.set_exit_policy(fitted_eenet(model, batches))
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path, dtype=dtype).eval().to(CUDA)
    assert all(buffer.dtype == torch.float32 for buffer in loaded.exit_policy.buffers())
    policy = loaded.exit_policy
    with torch.no_grad():
        for index, budget in enumerate(policy.budgets):
            engine, simulated = [], []
            for batch in batches:
                batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
                all_exits = loaded(**batch, output_all_exits=True, output_exit_features=True)
                simulated.append(policy.simulate(all_exits.all_exit_logits, index, all_exits.all_exit_features))
                engine.append(loaded(**batch, budget=budget).exit_index)
            engine, simulated = torch.cat(engine), torch.cat(simulated)
            if dtype == torch.float32:
                assert torch.equal(engine, simulated), budget
            else:  # half-precision kernels may round a compacted batch differently: near-threshold samples may move
                assert (engine == simulated).float().mean() >= 0.95, (budget, engine, simulated)


def test_text_pipeline_with_budget_on_cuda():
    words = "[PAD] [UNK] [CLS] [SEP] [MASK] a fine film dull and long , the end is mess . not worth ticket".split()
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(words)})
    config = tiny_bert_config(
        num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1}
    )
    model = EENetBertForSequenceClassification(config).eval()
    texts = ["a fine film", "dull", "not worth the ticket", "dull and long , the end is a mess ."] * 8
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    model.set_exit_policy(fitted_eenet(model, [batch]))
    budget = model.exit_policy.budgets[1]
    classifier = pipeline("text-classification", model=model, tokenizer=tokenizer, device=CUDA, budget=budget)
    assert classifier.model.device.type == CUDA.type
    results = classifier(texts, batch_size=4)
    assert len(results) == len(texts) and {r["label"] for r in results} <= {"negative", "positive"}
    expected = model(**on_cuda(batch), budget=budget).logits.softmax(-1).amax(-1)
    torch.testing.assert_close(torch.tensor([r["score"] for r in results]), expected.cpu(), atol=1e-4, rtol=1e-4)


def test_policy_on_cuda_simulates_exits_cached_on_the_cpu():
    model, _ = bert_case(1, seed=0)
    batches = [random_text_batch(32, seed=seed) for seed in range(3)]
    policy = fitted_eenet(model, batches)
    with torch.no_grad():
        outputs = [model(**batch, output_all_exits=True, output_exit_features=True) for batch in batches]
    logits = torch.cat([out.all_exit_logits for out in outputs])
    features = [torch.cat(per_exit) for per_exit in zip(*(out.all_exit_features for out in outputs))]
    expected = [policy.simulate(logits, index, features) for index in range(len(policy.budgets))]
    near = [near_a_threshold(policy, logits, index, features) for index in range(len(policy.budgets))]
    policy = policy.to(CUDA)
    for index, exits in enumerate(expected):
        simulated = policy.simulate(logits, index, features)
        on_device = policy.simulate(logits.to(CUDA), index, [f.to(CUDA) for f in features])
        assert simulated.device.type == "cpu" and torch.equal(simulated, on_device.cpu())
        # the device's kernels round differently: only a sample within rounding of a threshold may move
        assert near[index].float().mean() < 0.1
        assert torch.equal(simulated[~near[index]], exits[~near[index]])


def near_a_threshold(policy: EENetPolicy, logits, index: int, features) -> torch.Tensor:
    """
    Samples whose score at an early exit lies within float32 rounding of that exit's threshold: `1e-6` times the
    exit's weights' L1 norm plus its bias (a bound on the rounding of the weighted sum of features and earlier
    scores, which lie in [0, 1]).
    """
    scores = policy.exit_scores(logits, index, features)[:, :-1]
    weight, bias = policy.score_weight[index, :-1].float(), policy.score_bias[index, :-1].float()
    tolerance = 1e-6 * (weight.abs().sum(-1) + bias.abs() + 1)
    return ((scores - policy.thresholds[index, :-1]).abs() <= tolerance).any(-1)


def test_scheduler_trainer_fits_and_measures_on_cuda(tmp_path):
    """The trainer caches exit outputs on the CPU and stores the policy in the model on the accelerator."""
    args = scheduler_args(tmp_path, use_cpu=CUDA.type == "cpu")
    trainer = ExitSchedulerTrainer(model=tiny_model(), args=args, eval_dataset=token_dataset(64))
    assert trainer.model.device.type == CUDA.type
    fitted_rows = trainer.fit_scheduler(split="dev")
    assert trainer.model.exit_policy.thresholds.device.type == CUDA.type
    rows = trainer.evaluate_budgets(token_dataset(48, seed=3), split="test", measured_budgets=[0.5])
    measured = next(row for row in rows if row["mode"] == "measured" and row["budget"] == 0.5)
    simulated = next(
        row for row in rows if row["mode"] == "simulated" and row["policy"] == "eenet" and row["budget"] == 0.5
    )
    assert measured["exit_histogram"] == simulated["exit_histogram"]
    assert {row["policy"] for row in fitted_rows} >= {"eenet", "oracle"}


def test_a_policy_passed_at_call_time_follows_the_model_to_cuda():
    model, _ = bert_case(1, seed=0)
    batches = [random_text_batch(32, seed=seed) for seed in range(3)]
    policy = fitted_eenet(model, batches)  # fitted on the CPU
    assert policy.thresholds.device.type == "cpu"
    model, batch = model.to(CUDA), on_cuda(batches[0])
    with torch.no_grad():
        out = model(**batch, budget=policy.budgets[1], exit_policy=policy)
        assert policy.thresholds.device.type == CUDA.type
        all_exits = model(**batch, output_all_exits=True, output_exit_features=True)
        expected = policy.simulate(all_exits.all_exit_logits, 1, all_exits.all_exit_features)
    assert torch.equal(out.exit_index, expected)


def test_left_padding_is_refused_on_cuda():
    """The left-padding check rides on the engine's one device-to-host copy after exit 0: it must hold on a GPU too."""
    model, batch = bert_case(6, seed=3)
    left = left_padded(batch)
    model, left = model.to(CUDA), on_cuda(left)
    with torch.no_grad():
        model(**left, output_all_exits=True)  # every exit on every sample: no trimming, as stock BERT
        with pytest.raises(ValueError, match="padding on the left in some rows .*padding_side"):
            model(**left, exit_policy=ForcedExitPolicy(torch.tensor([0, 0, 2, 1, 2, 2])))


@by_backbone
def test_decisions_ignore_a_cuda_autocast(name):
    """Under the caller's half-precision autocast the blocks run in bfloat16, but the policy decides in float32."""
    model, _ = CASES[name](1, seed=0)
    batches = [on_cuda(CASES[name](32, seed=seed)[1]) for seed in range(3)]
    model = model.to(CUDA)
    model.set_exit_policy(fitted_eenet(model, batches))
    policy, seen = model.exit_policy, []
    decide = policy.decide
    policy.decide = lambda *args: seen.append(torch.is_autocast_enabled(CUDA.type)) or decide(*args)
    with torch.no_grad(), torch.autocast(CUDA.type, dtype=torch.bfloat16):
        for budget in policy.budgets:
            out = model(**batches[0], budget=budget)
            assert out.exit_index.device.type == CUDA.type
        all_exits = model(**batches[0], output_all_exits=True, output_exit_features=True)
        features = all_exits.all_exit_features
        assert torch.equal(
            policy.simulate(all_exits.all_exit_logits, 1, features),
            policy.simulate(all_exits.all_exit_logits.float(), 1, [f.float() for f in features]),
        )
    assert seen and not any(seen)


def test_onnx_model_takes_inputs_on_the_accelerator(tmp_path):
    """A pipeline on a GPU machine moves the inputs to the GPU; onnxruntime's model runs them on the host."""
    pytest.importorskip("onnxruntime")
    from hf_eenet.onnx import EENetONNXModel, export_onnx

    model, _ = bert_case(1, seed=0)
    batches = [random_text_batch(32, seed=seed) for seed in range(3)]
    model.set_exit_policy(fitted_eenet(model, batches))
    onnx_model = EENetONNXModel(export_onnx(model, tmp_path / "onnx"))
    budget, labels = model.exit_policy.budgets[1], torch.arange(32) % model.config.num_labels
    on_host = onnx_model(**batches[0], budget=budget)
    on_device = onnx_model(**on_cuda(batches[0]), budget=budget)
    assert on_device.logits.device.type == "cpu" and torch.equal(on_device.exit_index, on_host.exit_index)
    torch.testing.assert_close(on_device.logits, on_host.logits)
    loss = onnx_model(**on_cuda(batches[0]), labels=labels.to(CUDA)).loss
    torch.testing.assert_close(loss, onnx_model(**batches[0], labels=labels).loss)


def test_policy_decisions_ignore_tf32_matrix_products():
    """The scoring functions and the feature projection do not use TF32, so decisions are those of float32 fits."""
    model, _ = bert_case(1, seed=0)
    batches = [random_text_batch(32, seed=seed) for seed in range(3)]
    policy = fitted_eenet(model, batches).to(CUDA)
    model = model.to(CUDA)
    with torch.no_grad():
        outputs = [model(**on_cuda(batch), output_all_exits=True, output_exit_features=True) for batch in batches]
    logits = torch.cat([out.all_exit_logits for out in outputs])
    features = [torch.cat(per_exit) for per_exit in zip(*(out.all_exit_features for out in outputs))]
    before = CUDA.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    try:
        if CUDA.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
        exact = [policy.simulate(logits, index, features) for index in range(len(policy.budgets))]
        if CUDA.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
        tf32 = [policy.simulate(logits, index, features) for index in range(len(policy.budgets))]
    finally:
        if CUDA.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = before
    for index, (a, b) in enumerate(zip(exact, tf32)):
        assert torch.equal(a, b), index
