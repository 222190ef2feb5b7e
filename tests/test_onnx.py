"""ONNX export and the onnxruntime early-exit runtime: same exits and logits as torch, clear errors."""

import importlib
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import random_text_batch, tiny_bert_config  # noqa: E402
from test_modeling_eenet_vision import RESNET, VIT  # noqa: E402

from hf_eenet import BudgetTracker, EENetBertForSequenceClassification  # noqa: E402
from hf_eenet.evaluation import cache_exit_outputs  # noqa: E402
from hf_eenet.models.exit_policies import (  # noqa: E402
    ConfidenceThresholdPolicy,
    EENetPolicy,
    PatiencePolicy,
    StaticExitPolicy,
)
from hf_eenet.onnx import MANIFEST_FILE, EENetONNXModel, export_onnx  # noqa: E402

BUDGETS = [0.4, 0.6, 0.8]


def budgets_for(model) -> list[float]:
    """Three budgets between the cheapest exit and the full model (BUDGETS where the model can meet them)."""
    cheapest = model.config.exit_costs[0]
    if cheapest < BUDGETS[0]:
        return BUDGETS
    return [round(cheapest + (1 - cheapest) * f, 3) for f in (0.2, 0.5, 0.8)]


def fitted(model, batches, policy):
    """Fit `policy` on the model's own exit outputs for `batches` and store it."""
    model.eval()
    cached = cache_exit_outputs(model, batches)
    labels = cached["exit_logits"][:, -1].argmax(-1)  # labels the last exit gets right: a usable calibration set
    labels[::3] = (labels[::3] + 1) % model.config.num_labels
    cached["labels"] = labels
    if policy.requires_budget:
        policy.fit(**cached, exit_costs=model.config.exit_costs, budgets=budgets_for(model))
    model.set_exit_policy(policy)
    return model


def text_batches(count=4, batch_size=24):
    return [random_text_batch(batch_size, seed=seed) for seed in range(count)]


@pytest.fixture(scope="module")
def bert_export(tmp_path_factory):
    torch.manual_seed(0)
    # early exits with attention pooling, the last exit with mean pooling: both pooling graphs are exported
    model = EENetBertForSequenceClassification(tiny_bert_config(exit_pooling="mean", exit_head_pooling="attention"))
    policy = EENetPolicy(model.config.num_exits, max_epochs=30, patience=5)
    fitted(model, text_batches(), policy)
    directory = export_onnx(model, tmp_path_factory.mktemp("bert-onnx"))
    return model, directory, EENetONNXModel.from_pretrained(directory)


def assert_same_outputs(torch_out, onnx_out):
    assert torch.equal(torch_out.exit_index, onnx_out.exit_index)
    assert torch.equal(torch_out.exit_cost, onnx_out.exit_cost)
    torch.testing.assert_close(onnx_out.logits, torch_out.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("batch_size", [1, 7, 32])
@pytest.mark.parametrize("budget", [*BUDGETS, 1.0])
def test_bert_same_exits_and_logits_as_torch(bert_export, batch_size, budget):
    model, _, onnx_model = bert_export
    inputs = random_text_batch(batch_size, seed=100 + batch_size)
    with torch.no_grad():
        expected = model(**inputs, budget=budget)
    assert_same_outputs(expected, onnx_model(**inputs, budget=budget))


def test_bert_several_exits_are_taken_and_inputs_may_be_numpy(bert_export):
    model, _, onnx_model = bert_export
    inputs = random_text_batch(64, seed=5)
    out = onnx_model(**{name: value.numpy() for name, value in inputs.items()}, budget=0.6)
    assert out.exit_index.unique().numel() >= 2  # the comparison above covers real early exits
    with torch.no_grad():
        assert_same_outputs(model(**inputs, budget=0.6), out)


def test_bert_budget_tracker_makes_the_torch_models_choices(bert_export):
    model, _, onnx_model = bert_export
    ours, theirs = BudgetTracker(0.5), BudgetTracker(0.5)  # between the fitted 0.4 and 0.6
    with torch.no_grad():
        for seed in range(6):
            inputs = random_text_batch(8, seed=200 + seed)
            # the tracker reads the batch size of numpy arrays and of nested lists alike
            given = {name: value.numpy() if seed % 2 else value.tolist() for name, value in inputs.items()}
            assert_same_outputs(model(**inputs, budget=theirs), onnx_model(**given, budget=ours))
    assert ours.samples_per_budget == theirs.samples_per_budget and len(ours.samples_per_budget) > 1
    assert ours.total_cost == pytest.approx(theirs.total_cost)


def test_bert_all_exits_and_optional_inputs(bert_export):
    model, _, onnx_model = bert_export
    inputs = random_text_batch(5, seed=9)
    inputs["attention_mask"][:] = 1
    with torch.no_grad():
        expected = model(**inputs, output_all_exits=True)
    out = onnx_model(input_ids=inputs["input_ids"], output_all_exits=True)  # attention_mask, token_type_ids filled
    torch.testing.assert_close(out.all_exit_logits, expected.all_exit_logits, atol=1e-4, rtol=1e-4)


def test_manifest_lists_graphs_costs_budgets_and_labels(bert_export):
    model, directory, _ = bert_export
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    assert manifest["exit_costs"] == model.config.exit_costs and manifest["policy"]["budgets"] == BUDGETS
    assert len(manifest["segments"]) == len(manifest["exits"]) == model.config.num_exits
    assert len(manifest["policy"]["graphs"]) == model.config.num_exits - 1
    assert manifest["label_names"] == [model.config.id2label[i] for i in range(model.config.num_labels)]
    assert manifest["policy"]["thresholds"] == model.exit_policy.thresholds.tolist() and manifest["opset"] == 17
    assert all((directory / entry["file"]).is_file() for entry in manifest["segments"] + manifest["exits"])


@pytest.mark.parametrize("policy", ["patience", "static", "max-prob"])
def test_other_stored_policies(tmp_path, policy):
    torch.manual_seed(1)
    model = EENetBertForSequenceClassification(tiny_bert_config())
    num_exits = model.config.num_exits
    stored = {
        "patience": lambda: PatiencePolicy(num_exits, patience=1),
        "static": lambda: StaticExitPolicy(num_exits, exit=1),
        "max-prob": lambda: ConfidenceThresholdPolicy(num_exits),
    }[policy]()
    fitted(model, text_batches(2), stored)
    onnx_model = EENetONNXModel(export_onnx(model, tmp_path))
    inputs = random_text_batch(16, seed=3)
    budget = 0.6 if stored.requires_budget else None
    with torch.no_grad():
        expected = model(**inputs, budget=budget)  # an unbudgeted stored policy runs on a call without a budget
    assert_same_outputs(expected, onnx_model(**inputs, budget=budget))
    if policy == "static":
        assert expected.exit_index.tolist() == [1] * 16
    if not stored.requires_budget:  # an exported unbudgeted policy refuses budgets as the torch one does
        for bad in (0.5, BudgetTracker(0.5)):
            with pytest.raises(ValueError, match="is not budget-matched, so it cannot honour budget 0.5"):
                onnx_model(**inputs, budget=bad)


@pytest.mark.parametrize(
    ("backbone", "overrides"),
    [
        (VIT, {}),
        (RESNET, {}),
        (RESNET, {"depths": [2, 1, 2], "exit_layer_unit": "block", "exit_layers": [1, 2, 4, 5]}),
        (RESNET, {"exit_segment_costs": [0.05, 0.04], "exit_cost_batch_size": 16}),
    ],
    ids=["vit", "resnet", "resnet-block-exits", "resnet-segment-costs"],
)
def test_vision_backbones_export_the_same_way(tmp_path, backbone, overrides):
    torch.manual_seed(0)
    model = backbone.model(**overrides)
    size = 32
    images = [{"pixel_values": torch.randn(16, model.config.num_channels, size, size)} for _ in range(2)]
    fitted(model, images, ConfidenceThresholdPolicy(model.config.num_exits, allocation="geometric"))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    onnx_model = EENetONNXModel(export_onnx(model, tmp_path))
    # the export leaves the model as it was: no batch-norm statistic moves while the graphs are traced
    assert not model.training
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    pixel_values = torch.randn(9, model.config.num_channels, size, size)
    for budget in [*budgets_for(model), 1.0]:
        with torch.no_grad():
            expected = model(pixel_values=pixel_values, budget=budget)
        assert_same_outputs(expected, onnx_model(pixel_values=pixel_values, budget=budget))


def test_budgeted_pipeline_runs_on_the_onnx_model(bert_export, tmp_path):
    from transformers import BertTokenizerFast, pipeline
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging as transformers_logging

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[f"w{i}" for i in range(94)]]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    model, _, onnx_model = bert_export
    texts = ["w1 w2 w3", "w5", "w7 w8 w9 w10 w11 w12", "w40 w41"]
    with CaptureLogger(transformers_logging.get_logger("transformers.pipelines.base")) as captured:
        clf = pipeline("text-classification", model=onnx_model, tokenizer=tokenizer, budget=0.6)
    assert "is not supported" not in captured.out  # the onnxruntime model is no auto class, yet serves the task
    reference = pipeline("text-classification", model=model, tokenizer=tokenizer, budget=0.6)
    results, expected = clf(texts, batch_size=4), reference(texts, batch_size=4)
    assert [r["exit_index"] for r in results] == [r["exit_index"] for r in expected]
    assert [r["label"] for r in results] == [r["label"] for r in expected]
    assert clf(texts[0], budget=0.4)[0]["exit_cost"] <= 1.0


def test_bad_directories_and_manifests_fail_clearly(bert_export, tmp_path):
    _, directory, onnx_model = bert_export
    with pytest.raises(FileNotFoundError, match="not a directory"):
        EENetONNXModel(tmp_path / "nowhere")
    copy = shutil.copytree(directory, tmp_path / "copy")
    (copy / "exit_1.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="exit_1.onnx"):
        EENetONNXModel(copy)
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    without_segments = {key: value for key, value in manifest.items() if key != "segments"}
    for broken_manifest, match in (
        ({**manifest, "format_version": 99}, "format version 99"),
        ({**manifest, "exit_costs": [0.5, -1.0, 1.0]}, "invalid exit costs"),
        ({**manifest, "segments": manifest["segments"][:1]}, "1 segments"),
        ({**manifest, "exit_segment_costs": [0.1, 0.1], "exit_cost_batch_size": 8}, "disagree on the exit costs"),
        (without_segments, r"is not an hf_eenet ONNX manifest: it lacks \['segments'\]"),
    ):
        broken = shutil.copytree(directory, tmp_path / f"broken{len(list(tmp_path.iterdir()))}")
        (broken / MANIFEST_FILE).write_text(json.dumps(broken_manifest))
        with pytest.raises(ValueError, match=match):
            EENetONNXModel(broken)
    no_config = shutil.copytree(directory, tmp_path / "no_config")
    (no_config / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="holds no config.json; write the directory with `export_onnx`"):
        EENetONNXModel(no_config)
    (copy / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        EENetONNXModel(copy)
    (copy / MANIFEST_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=MANIFEST_FILE):
        EENetONNXModel(copy)
    with pytest.raises(ValueError, match="Unknown inputs"):
        onnx_model(input_ids=torch.ones(1, 4, dtype=torch.long), pixel_values=torch.ones(1))
    empty = {"input_ids": torch.zeros(0, 5, dtype=torch.long), "attention_mask": torch.zeros(0, 5, dtype=torch.long)}
    for budget in (None, 0.5):
        with pytest.raises(ValueError, match="The batch is empty"):
            onnx_model(**empty, budget=budget)
    with pytest.raises(ValueError, match="below the smallest fitted budget"):
        onnx_model(**random_text_batch(2), budget=0.35)


def test_export_without_policy_runs_only_full_budgets(tmp_path):
    model = EENetBertForSequenceClassification(tiny_bert_config())
    onnx_model = EENetONNXModel(export_onnx(model, tmp_path))
    inputs = random_text_batch(3)
    with torch.no_grad():
        assert_same_outputs(model.eval()(**inputs), onnx_model(**inputs))
    with pytest.raises(ValueError, match="needs a fitted exit policy"):
        onnx_model(**inputs, budget=0.5)


def test_a_failed_export_leaves_no_loadable_directory(bert_export, tmp_path, monkeypatch):
    import hf_eenet.onnx

    _, directory, _ = bert_export
    target = shutil.copytree(directory, tmp_path / "export")  # an earlier export of the fixture's model
    other = EENetBertForSequenceClassification(tiny_bert_config())
    fitted(other, text_batches(1), ConfidenceThresholdPolicy(other.config.num_exits))

    def fail(*args, **kwargs):
        raise RuntimeError("export failed")

    monkeypatch.setattr(hf_eenet.onnx, "_export_policy", fail)  # after the other model's first segment and exit
    with pytest.raises(RuntimeError, match="export failed"):
        export_onnx(other, target)
    with pytest.raises(FileNotFoundError, match=MANIFEST_FILE):
        EENetONNXModel(target)  # not the earlier export's manifest over a mix of both models' graphs


def test_onnx_model_calibrates_costs_and_caches_exit_outputs(bert_export):
    from hf_eenet.evaluation import cache_exit_outputs

    model, directory, _ = bert_export
    onnx_model = EENetONNXModel(directory)  # its own: calibration changes the costs in its config
    batches = text_batches(2, batch_size=6)
    cached, expected = cache_exit_outputs(onnx_model, batches), cache_exit_outputs(model, batches)
    torch.testing.assert_close(cached["exit_logits"], expected["exit_logits"], atol=1e-4, rtol=1e-4)
    for features, reference in zip(cached["exit_features"], expected["exit_features"], strict=True):
        torch.testing.assert_close(features, reference, atol=1e-4, rtol=1e-4)
    costs = onnx_model.calibrate_exit_costs(batches[0], num_repeats=1, num_warmup=0)
    assert len(costs) == model.config.num_exits and onnx_model.config.exit_cost_source == "latency"
    assert onnx_model.config.exit_costs == costs and not onnx_model.training
    with pytest.raises(ValueError, match="inference only"):
        onnx_model.train()


def test_export_script_loads_the_processor_before_exporting(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts"))
    script = importlib.import_module("export_onnx")
    VIT.model().save_pretrained(tmp_path / "model")  # no image processor
    with pytest.raises(OSError, match="image processor"):
        script.main(["--model_name_or_path", str(tmp_path / "model"), "--output_dir", str(tmp_path / "onnx")])
    assert not (tmp_path / "onnx").exists()  # nothing exported without the processor it would lack


def test_an_onnx_model_serves_several_threads_at_once(bert_export):
    """onnxruntime sessions run concurrently; the model's hand-over of each exit's logits is per thread."""
    from concurrent.futures import ThreadPoolExecutor

    _, _, onnx_model = bert_export
    batches = [random_text_batch(5, seed=seed) for seed in range(96)]
    expected = [onnx_model(**batch, budget=0.6) for batch in batches]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda batch: onnx_model(**batch, budget=0.6), batches))
    for result, reference in zip(results, expected):
        assert torch.equal(result.exit_index, reference.exit_index)
        torch.testing.assert_close(result.logits, reference.logits, atol=0, rtol=0)
