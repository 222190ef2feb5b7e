import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import pytest  # noqa: E402
from datasets import ClassLabel, Dataset, DatasetDict  # noqa: E402
from transformers import BertConfig, BertTokenizerFast, HfArgumentParser  # noqa: E402

from hf_eenet import data as data_module  # noqa: E402
from hf_eenet.data import (  # noqa: E402
    DatasetArguments,
    check_max_seq_length,
    encode_labels,
    load_processed_splits,
    load_raw_splits,
    load_text_classification_data,
    parse_split,
    shared_rows,
    text_data_collator,
    tokenize_text_splits,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def make_args(name, tmp_path, **kwargs) -> DatasetArguments:
    return DatasetArguments(dataset_name=str(name), cache_dir=str(tmp_path / "hf_cache"), **kwargs)


@pytest.fixture
def tokenizer(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "good", "bad", "film", "is", "not", "very", "it"]
    vocab_file = write(tmp_path / "vocab.txt", "\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True)


# --- local files ----------------------------------------------------------------------------------------------------
def test_tsv_directory_with_header_and_dev_alias(tmp_path):
    folder = tmp_path / "sst"
    write(folder / "train.tsv", 'sentence\tlabel\na good film\t1\n"quoted" bad film\t0\nnot good\t0\n')
    write(folder / "dev.tsv", "sentence\tlabel\nvery good\t1\nbad\t0\n")
    write(folder / "test.tsv", "sentence\tlabel\nit is good\t1\n")
    data = load_text_classification_data(make_args(folder, tmp_path))  # calibration_split="validation" -> dev
    assert set(data.splits) == {"train", "calibration", "test"}
    train = data.splits["train"]
    assert train["text"] == ["a good film", '"quoted" bad film', "not good"]  # tsv: quotes are plain characters
    assert train["label"] == [1, 0, 0]
    assert data.splits["calibration"]["text"] == ["very good", "bad"]
    assert data.label_names == ["0", "1"] and data.num_labels == 2
    assert isinstance(train.features["label"], ClassLabel)


def test_headerless_tsv_columns_by_index(tmp_path):
    file = write(tmp_path / "train.tsv", "1\ta good film\n0\tbad\n1\tvery good\n")
    args = make_args(file, tmp_path, has_header=False, text_column="1", label_column="0")
    data = load_text_classification_data(args, roles=["train"])
    assert data.splits["train"]["text"] == ["a good film", "bad", "very good"]
    assert data.splits["train"]["label"] == [1, 0, 1]


def test_headerless_files_read_as_headers_suggest_no_has_header(tmp_path):
    folder = tmp_path / "reviews"
    write(folder / "train.csv", "1,a good film\n0,bad\n")
    write(folder / "validation.csv", "0,not good\n1,very good\n")
    args = make_args(folder, tmp_path, text_column="1", label_column="0")
    with pytest.raises(ValueError, match=r"first data row read as the header\? Pass `has_header=False`"):
        load_text_classification_data(args, roles=["train", "calibration"])


def test_glue_folder_with_an_unlabelled_test_file(tmp_path):
    """GLUE's own download: `test.tsv` has other columns (`index, sentence`); train and dev still load."""
    folder = tmp_path / "SST-2"
    write(folder / "train.tsv", "sentence\tlabel\na good film\t1\nbad\t0\n")
    write(folder / "dev.tsv", "sentence\tlabel\nnot good\t0\nvery good\t1\n")
    write(folder / "test.tsv", "index\tsentence\n0\tfine\n1\tdull\n")
    args = make_args(folder, tmp_path, text_column="sentence", label_column="label")
    data = load_text_classification_data(args, roles=["train", "calibration"])
    assert data.splits["calibration"]["text"] == ["not good", "very good"]
    with pytest.raises(ValueError, match="label column 'label' .*test split"):
        load_text_classification_data(args, roles=["train", "test"])


def test_headerless_csv_with_string_labels_and_label_names(tmp_path):
    file = write(tmp_path / "reviews.csv", 'neg,"bad, very bad"\npos,good\nneg,not good\n')
    args = make_args(file, tmp_path, has_header=False, text_column="1", label_column="0")
    data = load_text_classification_data(args, roles=["train"])
    assert data.label_names == ["neg", "pos"]  # sorted when no label list is given
    assert data.splits["train"]["text"] == ["bad, very bad", "good", "not good"]
    assert data.splits["train"]["label"] == [0, 1, 0]
    # a given label list fixes the class ids (e.g. a trained model's id2label)
    data = load_text_classification_data(args, roles=["train"], label_names=["pos", "neg"])
    assert data.label_names == ["pos", "neg"] and data.splits["train"]["label"] == [1, 0, 1]
    with pytest.raises(ValueError, match=r"labels \['neg'\] that are not in the label list \['pos', 'meh'\]"):
        load_text_classification_data(args, roles=["train"], label_names=["pos", "meh"])


def test_string_labels_map_consistently_across_splits(tmp_path):
    folder = tmp_path / "d"
    write(folder / "train.csv", "text,label\na,pos\nb,neg\nc,pos\n")
    write(folder / "test.csv", "text,label\nd,neutral\ne,neg\n")
    data = load_text_classification_data(make_args(folder, tmp_path), roles=["train", "test"])
    assert data.label_names == ["neg", "neutral", "pos"]
    assert data.splits["train"]["label"] == [2, 0, 2]
    assert data.splits["test"]["label"] == [1, 0]


def test_jsonl_text_pairs_and_integral_float_labels(tmp_path):
    rows = [
        {"premise": "a good film", "hypothesis": "it is good", "y": 1.0},
        {"premise": "bad", "hypothesis": "good", "y": 0.0},
    ]
    file = write(tmp_path / "nli.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    args = make_args(file, tmp_path, text_column="premise", text_pair_column="hypothesis", label_column="y")
    data = load_text_classification_data(args, roles=["train"])
    train = data.splits["train"]
    assert train["text"] == ["a good film", "bad"] and train["text_pair"] == ["it is good", "good"]
    assert train["label"] == [1, 0]


def test_json_list_by_index(tmp_path):
    rows = [{"id": 7, "body": "good", "target": 2}, {"id": 8, "body": "bad", "target": 0}]
    file = write(tmp_path / "train.json", json.dumps(rows))
    data = load_text_classification_data(make_args(file, tmp_path, text_column="1", label_column="2"), roles=["train"])
    assert data.splits["train"]["text"] == ["good", "bad"]
    assert data.label_names == ["0", "1", "2"]


def test_parquet_hub_layout_keeps_class_label_names(tmp_path):
    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": ClassLabel(names=["negative", "positive"])}
    )
    for split, rows in {"train": (["good", "bad"], [1, 0]), "validation": (["fine"], [1])}.items():
        path = tmp_path / "glue" / "data" / f"{split}-00000-of-00001.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        Dataset.from_dict({"sentence": rows[0], "label": rows[1]}, features=features).to_parquet(str(path))
    data = load_text_classification_data(make_args(tmp_path / "glue", tmp_path), roles=["train", "calibration"])
    assert data.label_names == ["negative", "positive"]
    assert data.splits["train"]["label"] == [1, 0] and data.splits["calibration"]["text"] == ["fine"]
    # a model whose label list is in the other order: ids are remapped by name
    data = load_text_classification_data(
        make_args(tmp_path / "glue", tmp_path), roles=["train"], label_names=["positive", "negative"]
    )
    assert data.splits["train"]["label"] == [0, 1]


def test_max_samples_per_split(tmp_path):
    folder = tmp_path / "d"
    write(folder / "train.csv", "text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(10)))
    write(folder / "test.csv", "text,label\n" + "".join(f"s{i},{i % 2}\n" for i in range(10)))
    args = make_args(folder, tmp_path, max_train_samples=3, max_test_samples=20)
    data = load_text_classification_data(args, roles=["train", "test"])
    assert data.splits["train"]["text"] == ["t0", "t1", "t2"] and len(data.splits["test"]) == 10


def test_split_slices_in_datasets_syntax(tmp_path):
    folder = tmp_path / "d"
    write(folder / "validation.csv", "text,label\n" + "".join(f"v{i},{i % 2}\n" for i in range(10)))
    args = make_args(folder, tmp_path, calibration_split="validation[:50%]", test_split="dev[-3:]")
    data = load_text_classification_data(args, roles=["calibration", "test"])
    assert data.splits["calibration"]["text"] == ["v0", "v1", "v2", "v3", "v4"]
    assert data.splits["test"]["text"] == ["v7", "v8", "v9"]  # "dev" is the validation split's alias
    args = make_args(folder, tmp_path, calibration_split="validation[50%:]", max_calibration_samples=2)
    assert load_text_classification_data(args, roles=["calibration"]).splits["calibration"]["text"] == ["v5", "v6"]
    with pytest.raises(ValueError, match=r"'validation\[9:2\]'.*no rows"):
        load_raw_splits(make_args(folder, tmp_path, test_split="validation[9:2]"), roles=["test"])


@pytest.mark.parametrize("num_rows", [7, 15, 33])
@pytest.mark.parametrize("split", ["train[:50%]", "train[50%:]", "train[10%:90%]", "train[-30%:]", "train[:-25%]"])
def test_percent_slices_select_the_rows_datasets_selects(split, num_rows):
    instruction = datasets.ReadInstruction.from_spec(split).to_absolute({"train": num_rows})[0]
    assert list(parse_split(split)[1].rows(num_rows)) == list(range(instruction.from_, instruction.to))


@pytest.mark.parametrize("split", ["dev[a:]", "dev[:5", "dev[1:2:3]", "[1:2]", "dev[1.5:]"])
def test_bad_split_slices(split):
    with pytest.raises(ValueError, match="Cannot read the split"):
        parse_split(split)


def test_real_sst2_dev():
    args = DatasetArguments(str(SHARED_DATA / "sst2"), calibration_split="dev")
    data = load_text_classification_data(args, roles=["calibration"])
    dev = data.splits["calibration"]
    assert len(dev) == 872
    assert dev[0]["text"].startswith("it 's a charming and often affecting journey")
    assert dev[0]["label"] == 1
    assert set(dev["label"]) == {0, 1} and data.label_names == ["0", "1"]


# --- errors ---------------------------------------------------------------------------------------------------------
def test_missing_column_lists_available_columns(tmp_path):
    file = write(tmp_path / "train.csv", "review,stars\ngood,1\n")
    with pytest.raises(ValueError, match=r"label column 'label' is not a column.*\['review', 'stars'\]"):
        load_text_classification_data(make_args(file, tmp_path), roles=["train"])
    with pytest.raises(ValueError, match=r"text column 'body' is not a column.*\['review', 'stars'\]"):
        load_text_classification_data(
            make_args(file, tmp_path, text_column="body", label_column="stars"), roles=["train"]
        )
    with pytest.raises(ValueError, match=r"text column '5' is not a column"):
        load_text_classification_data(make_args(file, tmp_path, text_column="5", label_column="1"), roles=["train"])


def test_unknown_split_lists_available_splits(tmp_path):
    folder = tmp_path / "d"
    write(folder / "train.csv", "text,label\na,1\n")
    write(folder / "dev.csv", "text,label\nb,0\n")
    with pytest.raises(
        ValueError, match=r"Unknown split 'heldout' \(test data\).*available splits: \['dev', 'train'\]"
    ):
        load_raw_splits(make_args(folder, tmp_path, test_split="heldout"), roles=["train", "test"])


def test_empty_files_give_clear_errors(tmp_path):
    empty = write(tmp_path / "empty" / "train.tsv", "")
    with pytest.raises(ValueError, match=r"train.tsv' is empty"):
        load_raw_splits(make_args(empty, tmp_path), roles=["train"])
    blank = write(tmp_path / "blank" / "train.csv", "\n\n  \n")
    with pytest.raises(ValueError, match="is empty"):
        load_raw_splits(make_args(blank, tmp_path), roles=["train"])
    header_only = write(tmp_path / "header" / "train.csv", "text,label\n")
    with pytest.raises(ValueError, match=r"train.csv' holds a header row but no data rows"):
        load_raw_splits(make_args(header_only, tmp_path), roles=["train"])


def test_bad_labels_and_paths(tmp_path):
    unlabelled = write(tmp_path / "a" / "train.csv", "text,label\na,-1\nb,-1\n")
    with pytest.raises(ValueError, match="negative label"):
        load_text_classification_data(make_args(unlabelled, tmp_path), roles=["train"])
    scores = write(tmp_path / "b" / "train.csv", "text,label\na,0.5\nb,1.0\n")
    with pytest.raises(ValueError, match="regression is not supported"):
        load_text_classification_data(make_args(scores, tmp_path), roles=["train"])
    missing = write(tmp_path / "c" / "train.csv", "text,label\na,1\nb,\n")
    with pytest.raises(ValueError, match="1 rows without a label"):
        load_text_classification_data(make_args(missing, tmp_path), roles=["train"])
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        load_raw_splits(make_args(tmp_path / "no_such_dir", tmp_path), roles=["train"])
    mixed = tmp_path / "mixed"
    write(mixed / "train.csv", "text,label\na,1\n")
    write(mixed / "test.tsv", "text\tlabel\na\t1\n")
    with pytest.raises(ValueError, match="mixes data formats"):
        load_raw_splits(make_args(mixed, tmp_path), roles=["train"])
    with pytest.raises(ValueError, match="Unknown data role"):
        load_raw_splits(make_args(mixed, tmp_path), roles=["validation"])


def test_label_id_out_of_range(tmp_path):
    file = write(tmp_path / "train.csv", "text,label\na,0\nb,2\n")
    with pytest.raises(ValueError, match=r"Label id 2 is out of range for the 2 labels"):
        load_text_classification_data(make_args(file, tmp_path, class_names=["neg", "pos"]), roles=["train"])


# --- the Hub branch (at the `datasets.load_dataset` boundary) --------------------------------------------------------
def test_hub_dataset_id(monkeypatch, tmp_path):
    features = datasets.Features(
        {
            "sentence": datasets.Value("string"),
            "label": ClassLabel(names=["negative", "positive"]),
            "idx": datasets.Value("int32"),
        }
    )
    hub = DatasetDict(
        {
            "train": Dataset.from_dict(
                {"sentence": ["good", "bad"], "label": [1, 0], "idx": [0, 1]}, features=features
            ),
            "validation": Dataset.from_dict({"sentence": ["fine"], "label": [1], "idx": [0]}, features=features),
            "test": Dataset.from_dict({"sentence": ["what"], "label": [-1], "idx": [0]}, features=features),
        }
    )
    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs.get("cache_dir")))
        return hub

    monkeypatch.setattr(data_module.datasets, "load_dataset", fake_load_dataset)
    args = DatasetArguments("nyu-mll/glue", dataset_config_name="sst2", cache_dir=str(tmp_path))
    data = load_text_classification_data(args, roles=["train", "calibration"])
    assert calls == [("nyu-mll/glue", "sst2", str(tmp_path))]
    assert data.label_names == ["negative", "positive"]
    assert data.splits["calibration"]["text"] == ["fine"] and data.splits["train"]["label"] == [1, 0]
    with pytest.raises(ValueError, match="negative label"):  # GLUE withholds its test labels
        load_text_classification_data(args, roles=["test"])
    with pytest.raises(ValueError, match=r"available splits: \['test', 'train', 'validation'\]"):
        load_raw_splits(DatasetArguments("nyu-mll/glue", "sst2", calibration_split="dev2"), roles=["calibration"])


# --- tokenization and arguments -------------------------------------------------------------------------------------
def test_tokenize_pairs_truncate_and_pad_dynamically(tmp_path, tokenizer):
    splits = DatasetDict(
        {
            "train": Dataset.from_dict(
                {
                    "label": [1, 0],
                    "text": ["a good film", "bad bad bad bad bad bad bad bad"],
                    "text_pair": ["good", "not"],
                }
            )
        }
    )
    tokenized = tokenize_text_splits(splits, tokenizer, max_seq_length=8)["train"]
    assert set(tokenized.column_names) == {"label", "input_ids", "token_type_ids", "attention_mask"}
    first, second = tokenized[0], tokenized[1]
    assert len(first["input_ids"]) == 7  # [CLS] a good film [SEP] good [SEP]: unpadded
    assert first["token_type_ids"] == [0, 0, 0, 0, 0, 1, 1]
    assert len(second["input_ids"]) == 8  # truncated
    batch = text_data_collator(tokenizer)([first, second])
    assert batch["input_ids"].shape == (2, 8) and batch["labels"].tolist() == [1, 0]
    assert batch["attention_mask"][0].tolist() == [1] * 7 + [0]


def test_hf_argument_parser(tmp_path):
    parser = HfArgumentParser(DatasetArguments)
    (args,) = parser.parse_args_into_dataclasses(
        [
            "--dataset_name",
            "d",
            "--no_has_header",
            "--class_names",
            "neg",
            "pos",
            "--text_column",
            "1",
            "--max_seq_length",
            "64",
        ]
    )
    assert args.has_header is False and args.class_names == ["neg", "pos"] and args.text_column == "1"
    assert args.max_seq_length == 64 and args.calibration_split == "validation"
    with pytest.raises(ValueError, match="max_train_samples"):
        DatasetArguments("d", max_train_samples=0)


def test_encode_labels_rejects_mixed_types():
    splits = DatasetDict(
        {"train": Dataset.from_dict({"label": [1, 2]}), "test": Dataset.from_dict({"label": ["a", "b"]})}
    )
    with pytest.raises(ValueError, match="mix label types"):
        encode_labels(splits)


def test_a_header_row_read_as_data_and_a_data_row_read_as_header(tmp_path):
    headerless = write(tmp_path / "headerless" / "train.tsv", "a good film\t1\nbad\t0\nvery good\t1\n")
    # read with a header: the first data row names the columns, so its label is also a column name
    args = make_args(headerless.parent, tmp_path, text_column="0", label_column="1")
    with pytest.raises(ValueError, match="named '1', which is also one of its labels.*`--no_has_header`"):
        load_text_classification_data(args, roles=["train"])
    args = make_args(headerless.parent, tmp_path, text_column="0", label_column="0")
    with pytest.raises(ValueError, match="same column"):
        load_text_classification_data(args, roles=["train"])

    with_header = write(tmp_path / "header" / "train.tsv", "sentence\tlabel\na good film\t1\nbad\t0\n")
    args = make_args(with_header.parent, tmp_path, has_header=False, text_column="0", label_column="1")
    with pytest.raises(ValueError, match=r"class ids except in a first row \('label'\).*header row read as data"):
        load_text_classification_data(args, roles=["train"])


def test_text_and_label_columns_must_be_distinct_and_not_swapped(tmp_path):
    rows = "".join(f"sentence number {i}\t{i % 2}\n" for i in range(12))
    folder = tmp_path / "d"
    write(folder / "train.tsv", "sentence\tlabel\n" + rows)
    args = make_args(folder, tmp_path, text_column="sentence", label_column="sentence")
    with pytest.raises(ValueError, match=r"text column and the label column of the train split are the same column"):
        load_text_classification_data(args, roles=["train"])
    args = make_args(folder, tmp_path, text_column="label", label_column="sentence")
    with pytest.raises(ValueError, match="12 distinct values in 12 rows.*Is it the text column"):
        load_text_classification_data(args, roles=["train"])
    # many classes, each seen once in a small slice, are labels all the same
    write(folder / "dev.tsv", "sentence\tlabel\n" + "".join(f"sentence number {i}\tintent_{i}\n" for i in range(12)))
    args = make_args(folder, tmp_path, calibration_split="dev")
    assert len(load_text_classification_data(args, roles=["calibration"]).label_names) == 12


def test_shuffle_seed_must_be_a_valid_seed():
    with pytest.raises(ValueError, match="`shuffle_seed` must be a non-negative integer or None, got -1"):
        DatasetArguments("d", shuffle_seed=-1)


def test_slices_beyond_the_split(tmp_path):
    folder = tmp_path / "d"
    write(folder / "train.csv", "text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(8)))
    with pytest.raises(ValueError, match=r"'train\[100:\]'.*selects no rows: the 'train' split has 8"):
        load_raw_splits(make_args(folder, tmp_path, train_split="train[100:]"), roles=["train"])
    with pytest.raises(ValueError, match="percentage beyond 100%"):
        parse_split("train[:150%]")


def test_the_model_labels_and_class_names_must_agree(tmp_path):
    file = write(tmp_path / "train.tsv", "sentence\tlabel\na good film\t1\nbad\t0\n")
    args = make_args(file, tmp_path, class_names=["pos", "neg"])
    with pytest.raises(ValueError, match=r"`class_names` \['pos', 'neg'\] differ from the model's labels"):
        load_text_classification_data(args, roles=["train"], label_names=["neg", "pos"])
    args = make_args(file, tmp_path, class_names=["neg", "pos"])
    assert load_text_classification_data(args, roles=["train"], label_names=["neg", "pos"]).label_names == [
        "neg",
        "pos",
    ]


def test_flags_of_the_other_modality_and_too_long_texts_are_refused(tmp_path, tokenizer):
    file = write(tmp_path / "train.tsv", "sentence\tlabel\na good film\t1\nbad\t0\n")
    for flag in ({"image_column": "img"}, {"augment_train": True}):
        with pytest.raises(ValueError, match="apply to image data, but this model takes text"):
            load_processed_splits(make_args(file, tmp_path, **flag), tokenizer, roles=["train"])
    config = BertConfig(max_position_embeddings=64)
    check_max_seq_length(make_args(file, tmp_path, max_seq_length=64), tokenizer, config)
    with pytest.raises(ValueError, match="`max_seq_length` is 65, but the model has 64 position embeddings"):
        check_max_seq_length(make_args(file, tmp_path, max_seq_length=65), tokenizer, config)


def test_label_text_is_stripped_and_class_ids_stored_as_text_take_class_names(tmp_path):
    folder = tmp_path / "ids"
    write(folder / "train.csv", "text,label\ngood,1\nbad,0\nfine,1\n")
    write(folder / "dev.csv", "text,label\nok,1 \nmeh, 0\n")
    args = make_args(folder, tmp_path, class_names=["negative", "positive"])
    data = load_text_classification_data(args, roles=["train", "calibration"])
    assert data.label_names == ["negative", "positive"] and data.splits["calibration"]["label"] == [1, 0]
    named = tmp_path / "named"
    write(named / "train.csv", "text,label\ngood,pos\nbad,neg\n")
    write(named / "dev.csv", "text,label\nok,pos \nmeh,neg\n")
    data = load_text_classification_data(make_args(named, tmp_path), roles=["train", "calibration"])
    assert data.label_names == ["neg", "pos"] and data.splits["calibration"]["label"] == [1, 0]


def test_classes_without_training_rows_are_reported(tmp_path):
    from transformers.testing_utils import CaptureLogger

    folder = tmp_path / "unseen"
    write(folder / "train.csv", "text,label\na,neg\nb,pos\nc,neg\n")
    write(folder / "dev.csv", "text,label\nd,neutral\ne,pos\n")
    with CaptureLogger(data_module.logger) as captured:
        data = load_text_classification_data(make_args(folder, tmp_path), roles=["train", "calibration"])
    assert data.label_names == ["neg", "neutral", "pos"]
    assert "The train split has no rows of the classes ['neutral']" in captured.out


def test_a_hub_configuration_of_local_files_is_refused(tmp_path):
    file = write(tmp_path / "train.csv", "text,label\na,0\nb,1\n")
    with pytest.raises(ValueError, match="`dataset_config_name` 'sst2' names a configuration of a Hub dataset"):
        load_raw_splits(make_args(file, tmp_path, dataset_config_name="sst2"), roles=["train"])


def test_shared_rows_between_training_and_calibration_selections(tmp_path):
    folder = tmp_path / "d"
    write(folder / "train.csv", "text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(40)))
    write(folder / "dev.csv", "text,label\nd,0\ne,1\n")

    def selection(split, seed=None, **limits):
        return make_args(folder, tmp_path, train_split=split, calibration_split=split, shuffle_seed=seed, **limits)

    assert shared_rows(selection("train[:90%]", 0), "train", selection("train[90%:]", 0), "calibration") == 0
    assert shared_rows(selection("train[:90%]", 0), "train", selection("train[80%:]", 0), "calibration") == 4
    reshuffled = shared_rows(selection("train[:90%]", 0), "train", selection("train[90%:]", 1), "calibration")
    unshuffled = shared_rows(selection("train[:90%]", 0), "train", selection("train[90%:]"), "calibration")
    assert 0 < reshuffled <= 4 and 0 < unshuffled <= 4
    limited = selection("train", 0, max_train_samples=10)
    assert shared_rows(limited, "train", selection("train[25%:]", 0), "calibration") == 0
    assert shared_rows(selection("train"), "train", selection("dev"), "calibration") == 0
