"""Image datasets for the workflow scripts: parquet (the Hub layout) and image folders, augmentation, end to end."""

import json
import os
import random
import sys
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import SHARED_DATA  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import ViTImageProcessorPil  # noqa: E402

from hf_eenet import EENetResNetConfig  # noqa: E402
from hf_eenet.data import (  # noqa: E402
    DatasetArguments,
    augment_image,
    load_image_classification_data,
    load_processed_splits,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import evaluate_budgets  # noqa: E402
import fit_scheduler  # noqa: E402
import train_exits  # noqa: E402

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 210)}


def colour_image(name: str, seed: int) -> Image.Image:
    rng = random.Random(seed)
    base = COLOURS[name]
    pixels = [tuple(max(0, min(255, c + rng.randint(-40, 40))) for c in base) for _ in range(16 * 16)]
    image = Image.new("RGB", (16, 16))
    image.putdata(pixels)
    return image


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """train/ and test/ class folders of 16x16 colour images (the `imagefolder` layout)."""
    root = tmp_path_factory.mktemp("colours")
    for split, count in (("train", 16), ("validation", 8), ("test", 8)):
        for name in COLOURS:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                seed = zlib.crc32(f"{split}/{name}/{i}".encode()) % 10_000  # not hash(): the same images every run
                colour_image(name, seed).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory):
    """A tiny from-scratch EENet ResNet config (CIFAR stem) with its image processor, as `--config_name` takes."""
    path = tmp_path_factory.mktemp("tiny-resnet")
    EENetResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 32], depths=[1, 1, 1], layer_type="basic", stem_kernel_size=3,
        stem_stride=1, stem_pooling=False, exit_cost_reference_size=16,
    ).save_pretrained(path)  # fmt: skip
    ViTImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(path)
    return str(path)


def test_image_folder_loads_with_class_names(image_folder, tmp_path):
    args = DatasetArguments(str(image_folder), calibration_split="validation", cache_dir=str(tmp_path / "cache"))
    data = load_image_classification_data(args)
    assert data.label_names == ["blue", "green", "red"]
    assert data.splits["train"].column_names == ["image", "label"] and len(data.splits["test"]) == 24
    assert isinstance(data.splits["train"][0]["image"], Image.Image)


def test_cifar10_parquet_shuffled_slices_hold_every_class(tmp_path):
    args = DatasetArguments(
        str(SHARED_DATA / "cifar10"), train_split="train[:90%]", calibration_split="train[90%:]", shuffle_seed=0,
        max_train_samples=200, max_calibration_samples=100, cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    data = load_image_classification_data(args, roles=("train", "calibration"))
    assert data.label_names[:3] == ["airplane", "automobile", "bird"]
    assert len(set(data.splits["train"]["label"])) == 10  # the file is sorted by label: shuffling matters
    processor = ViTImageProcessorPil(size={"height": 32, "width": 32})
    _, splits, collator = load_processed_splits(args, processor, roles=("calibration",))
    batch = collator([splits["calibration"][i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["labels"].shape == (4,)


def test_augmentation_keeps_size_and_changes_pixels():
    image = colour_image("red", 0)
    image.putpixel((0, 0), (0, 0, 0))
    augmented = [augment_image(image, random.Random(seed)) for seed in range(8)]
    assert all(a.size == image.size for a in augmented)
    assert any(list(a.getdata()) != list(image.getdata()) for a in augmented)


def test_image_column_errors(image_folder, tmp_path):
    args = DatasetArguments(str(image_folder), image_column="photo", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="image column 'photo'"):
        load_image_classification_data(args, roles=("train",))
    with pytest.raises(TypeError, match="tokenizer .* or an image processor"):
        load_processed_splits(args, object(), roles=("train",))


def test_token_pooling_on_a_resnet_is_an_error(image_folder, processor_dir, tmp_path):
    arguments = ["--dataset_name", str(image_folder), "--calibration_split", "validation", "--report_to", "none",
                 "--config_name", processor_dir, "--output_dir", str(tmp_path / "out"), "--max_steps", "1"]  # fmt: skip
    with pytest.raises(ValueError, match="`exit_pooling` applies to BERT and ViT models"):
        train_exits.main([*arguments, "--exit_pooling", "cls"])
    with pytest.raises(ValueError, match="`exit_head_pooling` applies to BERT models only .* 'eenet-resnet'"):
        train_exits.main([*arguments, "--exit_head_pooling", "attention"])


def test_vision_workflow_end_to_end(image_folder, processor_dir, tmp_path):
    data = ["--dataset_name", str(image_folder), "--calibration_split", "validation", "--report_to", "none",
            "--per_device_eval_batch_size", "16"]  # fmt: skip
    trained = tmp_path / "trained"
    metrics = train_exits.main(
        [
            *data,
            "--config_name",
            processor_dir,
            "--output_dir",
            str(trained),
            "--max_steps",
            "3",
            "--per_device_train_batch_size",
            "16",
            "--augment_train",
            "--learning_rate",
            "0.01",
        ]  # fmt: skip
    )
    assert {"eval_exit_0_accuracy", "eval_exit_2_accuracy"} <= set(metrics)
    config = json.loads((trained / "config.json").read_text())
    assert config["model_type"] == "eenet-resnet" and config["stem_stride"] == 1
    assert config["id2label"] == {"0": "blue", "1": "green", "2": "red"}
    assert (trained / "preprocessor_config.json").is_file()
    fitted = tmp_path / "fitted"
    fit_scheduler.main(
        [
            *data,
            "--model_name_or_path",
            str(trained),
            "--output_dir",
            str(fitted),
            "--budgets",
            "0.6",
            "0.8",
            "--policy_kwargs",
            '{"max_epochs": 20, "patience": 5}',
        ]  # fmt: skip
    )
    rows = evaluate_budgets.main(
        [*data, "--model_name_or_path", str(fitted), "--output_dir", str(fitted), "--measured_budgets", "0.6"]
    )
    measured = [row for row in rows if row["mode"] == "measured"]
    assert [row["policy"] for row in measured] == ["full model", "eenet"] and measured[1]["num_samples"] == 24
    assert (fitted / "budget_plot_test.png").is_file()
    # channels-last (the faster layout for convolutions) makes the same decisions
    channels_last = evaluate_budgets.main(
        [*data, "--model_name_or_path", str(fitted), "--output_dir", str(tmp_path / "channels-last"),
         "--measured_budgets", "0.6", "--channels_last", "--plot", "False", "--update_model_card", "False"]
    )  # fmt: skip
    same = ("policy", "budget", "accuracy", "cost", "exit_histogram")
    assert [[row[key] for key in same] for row in channels_last] == [[row[key] for key in same] for row in rows]


def test_cifar_stem_changes_the_architecture_and_the_costs():
    stock = EENetResNetConfig(hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", exit_cost_reference_size=32)
    cifar = EENetResNetConfig(
        hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", exit_cost_reference_size=32, stem_kernel_size=3,
        stem_stride=1, stem_pooling=False,
    )  # fmt: skip
    assert cifar.stage_output_sizes() == [32, 16] and stock.stage_output_sizes() == [8, 4]
    from hf_eenet import EENetResNetForImageClassification

    model = EENetResNetForImageClassification(cifar).eval()
    assert model.resnet.embedder.embedder.convolution.kernel_size == (3, 3)
    assert isinstance(model.resnet.embedder.pooler, torch.nn.Identity)
    with torch.no_grad():
        out = model(pixel_values=torch.randn(2, 3, 32, 32), output_all_exits=True)
    assert out.all_exit_logits.shape == (2, 2, 2)
    with pytest.raises(ValueError, match="stem_kernel_size"):
        EENetResNetConfig(stem_kernel_size=4)


def test_image_dataset_is_a_datasets_image_feature(image_folder, tmp_path):
    args = DatasetArguments(str(image_folder), cache_dir=str(tmp_path / "cache"))
    data = load_image_classification_data(args, roles=("test",))
    assert isinstance(data.splits["test"].features["image"], datasets.Image)


def test_image_paths_in_a_csv_are_read_against_its_folder(tmp_path, monkeypatch):
    root = tmp_path / "pets"
    (root / "imgs").mkdir(parents=True)
    for i in range(4):
        colour_image("red" if i % 2 else "blue", seed=i).save(root / "imgs" / f"{i}.png")
    (root / "train.csv").write_text("image,label\n" + "".join(f"imgs/{i}.png,{i % 2}\n" for i in range(4)))
    monkeypatch.chdir(tmp_path)  # elsewhere than the csv's folder
    args = DatasetArguments(str(root / "train.csv"), image_column="image", cache_dir=str(tmp_path / "cache"))
    data = load_image_classification_data(args, roles=["train"])
    assert data.splits["train"][3]["image"].size == (16, 16)
    (root / "train.csv").write_text("image,label\nimgs/missing.png,0\nimgs/0.png,1\n")
    with pytest.raises(FileNotFoundError, match="'imgs/missing.png' of the first row of the train split"):
        load_image_classification_data(args, roles=["train"])
