"""Dataset loading for the hf_eenet scripts: a Hub dataset id or local files, the same arguments for both.

The pipeline is split so that the vision path can reuse the generic parts:

1. [`load_raw_splits`] (generic): a Hub id (`datasets.load_dataset(name, config)`) or local files (csv, tsv,
   json/jsonl, parquet; one file or a directory of split files such as `train.tsv` / `dev.tsv` or the Hub's
   `data/train-00000-of-00001.parquet`), keyed by *role* (`"train"`, `"calibration"`, `"test"`), validated and cut to
   the maximum number of samples.
2. [`resolve_column`] and [`encode_labels`] (generic): columns by name or 0-based index; labels as integer class ids
   with one label list shared by every split.
3. Text only: [`prepare_text_columns`], [`load_text_classification_data`], [`tokenize_text_splits`] and
   [`text_data_collator`] (dynamic padding: the tokenized rows stay unpadded, so `train_sampling_strategy=
   "group_by_length"` groups them by their real length).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from datasets import ClassLabel, Dataset, DatasetDict, Value
from transformers import BaseImageProcessor, DataCollatorWithPadding, DefaultDataCollator, PreTrainedTokenizerBase
from transformers.utils import logging

__all__ = [
    "DATA_ROLES",
    "ClassificationData",
    "DatasetArguments",
    "RowSlice",
    "encode_labels",
    "augment_image",
    "load_image_classification_data",
    "load_processed_splits",
    "load_raw_splits",
    "load_text_classification_data",
    "parse_split",
    "prepare_text_columns",
    "process_image_splits",
    "resolve_column",
    "text_data_collator",
    "tokenize_text_splits",
]

logger = logging.get_logger(__name__)

# The roles a split plays in the EENet workflow, and the `DatasetArguments` field naming the split of each.
DATA_ROLES = ("train", "calibration", "test")

# Local file suffixes -> `datasets` builder.
LOCAL_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}

# Image file suffixes of an `imagefolder` directory.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

# Column names tried, in order, when no image column is given (after the columns of the `Image` feature type).
IMAGE_COLUMN_CANDIDATES = ("img", "image", "picture", "photo")

# Column names tried, in order, when no text column is given.
TEXT_COLUMN_CANDIDATES = ("sentence", "text", "sentence1", "question", "content", "review", "document")

# Interchangeable names of the validation split (GLUE's files call it "dev", the Hub calls it "validation").
SPLIT_ALIASES = {
    "validation": ("dev", "valid", "val"),
    "dev": ("validation", "valid", "val"),
    "valid": ("validation", "dev", "val"),
    "val": ("validation", "dev", "valid"),
}

_SHARD_SUFFIX = re.compile(r"[-_]\d{5}[-_]of[-_]\d{5}$")


@dataclass
class DatasetArguments:
    r"""
    Which dataset to load and how to read it, as [`~transformers.HfArgumentParser`] flags. The same arguments work
    for a Hub dataset id (online) and local files (offline).

    Args:
        dataset_name (`str`):
            A Hub dataset id (e.g. `"nyu-mll/glue"`), a local file (csv, tsv, json/jsonl or parquet: one split named
            `"train"`), or a local directory of split files named after their split (`train.tsv`, `dev.tsv`,
            `test.tsv`, `train.parquet`, or the Hub's layout `data/train-00000-of-00001.parquet`).
        dataset_config_name (`str`, *optional*):
            Configuration of a Hub dataset (e.g. `"sst2"` for `"nyu-mll/glue"`).
        train_split, calibration_split, test_split (`str`):
            Split names for training the exits, fitting the exit scheduler, and reporting. `"validation"` and
            `"dev"` stand for each other when only one of them exists. A row slice in the `datasets` syntax takes
            part of a split, e.g. `"validation[:50%]"` to calibrate and `"validation[50%:]"` to report.
        text_column (`str`, *optional*):
            Column holding the text, by name or 0-based index. Defaults to the first of `sentence`, `text`,
            `sentence1`, ... that exists, else the first string column.
        text_pair_column (`str`, *optional*):
            Column holding the second text of a pair (e.g. the hypothesis of NLI), by name or index.
        image_column (`str`, *optional*):
            Column holding the images (image data), by name or 0-based index. Defaults to the first column of the
            `datasets.Image` feature type, else the first of `img`, `image`, ... that exists.
        augment_train (`bool`, *optional*, defaults to `False`):
            Augment the training images (image data): a random crop of the image padded by 1/8 of its side, and a
            random horizontal flip (PIL only; seeded through Python's `random`, which `Trainer` seeds).
        label_column (`str`, *optional*, defaults to `"label"`):
            Column holding the label, by name or 0-based index. Labels may be integer class ids, integral floats,
            or strings (mapped through `class_names`).
        class_names (`list[str]`, *optional*):
            The label list, in class-id order (named so as not to clash with `TrainingArguments.label_names`). String labels are mapped through it; without it they are mapped
            through their sorted set over every loaded split (pass the model's labels when loading data for a
            trained model).
        has_header (`bool`, *optional*, defaults to `True`):
            Whether local csv/tsv files start with a header row. Without one their columns are named `column_0`,
            `column_1`, ... and are usually selected by index.
        delimiter (`str`, *optional*):
            Field delimiter of local csv/tsv files; defaults to `","` for `.csv` and a tab for `.tsv`. tsv files are
            read without quote handling (as GLUE's are), csv files with standard double quotes.
        shuffle_seed (`int`, *optional*):
            Shuffle every split with this seed before row slices and `max_*_samples` apply, so that slices of files
            sorted by label (CIFAR-10's parquet files are) hold every class. The same seed gives the same order in
            every script, so `"train[:90%]"` and `"train[90%:]"` stay disjoint.
        max_train_samples, max_calibration_samples, max_test_samples (`int`, *optional*):
            Keep only the first this many rows of a split (after shuffling, with `shuffle_seed`).
        max_seq_length (`int`, *optional*, defaults to 128):
            Truncate tokenized texts to this many tokens. `None` uses the tokenizer's maximum.
        cache_dir (`str`, *optional*):
            Where `datasets` caches downloaded and converted data.
    """

    dataset_name: str = field(
        metadata={"help": "A Hub dataset id, a local data file (csv/tsv/json/jsonl/parquet) or a directory of them."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of a Hub dataset."})
    train_split: str = field(default="train", metadata={"help": "Split the exits are trained on."})
    calibration_split: str = field(
        default="validation",
        metadata={"help": "Held-out labelled split the exit scheduler is fitted on ('validation' and 'dev' alias)."},
    )
    test_split: str = field(default="test", metadata={"help": "Labelled split the budget tables are reported on."})
    text_column: str | None = field(
        default=None,
        metadata={"help": "Text column, by name or 0-based index (default: 'sentence', 'text', ... if present)."},
    )
    text_pair_column: str | None = field(
        default=None, metadata={"help": "Optional second text column of a text pair, by name or 0-based index."}
    )
    image_column: str | None = field(
        default=None,
        metadata={"help": "Image column, by name or 0-based index (default: the first `Image` column, 'img', ...)."},
    )
    augment_train: bool = field(
        default=False,
        metadata={"help": "Augment training images: random crop (padding 1/8 of the side) and horizontal flip."},
    )
    label_column: str = field(default="label", metadata={"help": "Label column, by name or 0-based index."})
    class_names: list[str] | None = field(
        default=None, metadata={"help": "Label list in class-id order; string labels are mapped through it."}
    )
    has_header: bool = field(default=True, metadata={"help": "Whether local csv/tsv files start with a header row."})
    delimiter: str | None = field(
        default=None, metadata={"help": "Delimiter of local csv/tsv files (default: ',' for .csv, tab for .tsv)."}
    )
    shuffle_seed: int | None = field(
        default=None,
        metadata={
            "help": "Shuffle every split with this seed before row slices and `max_*_samples` (for files sorted by "
            "label, such as CIFAR-10's parquet files)."
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training rows."})
    max_calibration_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N calibration rows."}
    )
    max_test_samples: int | None = field(default=None, metadata={"help": "Keep only the first N test rows."})
    max_seq_length: int | None = field(
        default=128, metadata={"help": "Truncate tokenized texts to this many tokens (None: tokenizer maximum)."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Cache directory of `datasets`."})

    def __post_init__(self):
        if not self.dataset_name:
            raise ValueError("`dataset_name` must be a Hub dataset id or a local path.")
        for role in DATA_ROLES:
            limit = getattr(self, f"max_{role}_samples")
            if limit is not None and limit < 1:
                raise ValueError(f"`max_{role}_samples` must be >= 1 or None, got {limit}.")
        if self.max_seq_length is not None and self.max_seq_length < 1:
            raise ValueError(f"`max_seq_length` must be >= 1 or None, got {self.max_seq_length}.")
        if self.shuffle_seed is not None and self.shuffle_seed < 0:
            raise ValueError(f"`shuffle_seed` must be a non-negative integer or None, got {self.shuffle_seed}.")

    def split_name(self, role: str) -> str:
        """The split name given for a role (`"train"`, `"calibration"` or `"test"`)."""
        if role not in DATA_ROLES:
            raise ValueError(f"Unknown data role {role!r}; roles are {list(DATA_ROLES)}.")
        return getattr(self, f"{role}_split")


@dataclass
class ClassificationData:
    r"""
    Splits prepared for classification, keyed by role, and their label list.

    Args:
        splits (`datasets.DatasetDict`):
            One dataset per requested role, with an integer `label` column (a `ClassLabel`) and the input columns
            (`text` and optionally `text_pair` for text).
        label_names (`list[str]`):
            Label of each class id.
    """

    splits: DatasetDict
    label_names: list[str]

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.label_names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: index for index, name in enumerate(self.label_names)}

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


# --- generic: loading ---------------------------------------------------------------------------------------------
def load_raw_splits(args: DatasetArguments, roles: Sequence[str] = DATA_ROLES) -> DatasetDict:
    """
    Load the splits that play `roles`, as they are stored (no column processing).

    Args:
        args ([`DatasetArguments`]): the dataset and split names.
        roles (`Sequence[str]`, *optional*): any of `"train"`, `"calibration"`, `"test"`.

    Returns:
        `datasets.DatasetDict`: keyed by role, each cut to its `max_<role>_samples`.

    Raises:
        `FileNotFoundError`: a local path that does not exist. `ValueError`: an empty file, an unknown split (the
        message lists the available ones) or a split without rows.
    """
    if not roles:
        raise ValueError("Ask for at least one data role.")
    for role in roles:
        args.split_name(role)  # validates the role
    path = Path(args.dataset_name).expanduser()
    if path.exists():
        if args.dataset_config_name is not None:
            raise ValueError(
                f"`dataset_config_name` {args.dataset_config_name!r} names a configuration of a Hub dataset, but "
                f"{args.dataset_name!r} is a local path: point `dataset_name` at the configuration's files instead."
            )
        source = str(path)
        available = _load_local(path, args)
    else:
        if _looks_like_a_path(args.dataset_name):
            raise FileNotFoundError(f"No such file or directory: {args.dataset_name!r}.")
        available = _load_hub(args)
        source = args.dataset_name + (f" ({args.dataset_config_name})" if args.dataset_config_name else "")
    result = DatasetDict()
    for role in roles:
        split = _match_split(parse_split(args.split_name(role))[0], list(available), source, role)
        result[role] = _select_rows(available[split], args, role, source)
    return result


def _select_rows(dataset: Dataset, args: DatasetArguments, role: str, source: str) -> Dataset:
    """The rows of a whole stored split that `args` select for `role`: shuffled, sliced, cut to `max_<role>_samples`."""
    split_name = args.split_name(role)
    name, row_slice = parse_split(split_name)
    if args.shuffle_seed is not None:
        dataset = dataset.shuffle(seed=args.shuffle_seed)
    if row_slice is not None:
        rows = row_slice.rows(len(dataset))
        if len(rows) == 0:
            raise ValueError(
                f"The {split_name!r} split of {source} ({role} data) selects no rows: the {name!r} split has "
                f"{len(dataset)}."
            )
        dataset = dataset.select(rows)
    if len(dataset) == 0:
        raise ValueError(f"The {split_name!r} split of {source} ({role} data) has no rows.")
    limit = getattr(args, f"max_{role}_samples")
    if limit is not None and limit < len(dataset):
        dataset = dataset.select(range(limit))
    return dataset


def shared_rows(args: DatasetArguments, role: str, other_args: DatasetArguments, other_role: str) -> int:
    """
    How many rows the `role` data of `args` and the `other_role` data of `other_args` share: `0` unless both come
    from the same dataset and the same stored split (e.g. training on `train[:90%]` and calibrating on `train[90%:]`),
    where slices of different shuffles (`shuffle_seed`) or overlapping slices of one shuffle share rows.
    """
    same_dataset = (
        Path(args.dataset_name).expanduser().resolve() == Path(other_args.dataset_name).expanduser().resolve()
    )
    if not same_dataset or args.dataset_config_name != other_args.dataset_config_name:
        return 0
    name, other_name = parse_split(args.split_name(role))[0], parse_split(other_args.split_name(other_role))[0]
    if name != other_name and other_name not in SPLIT_ALIASES.get(name, ()):
        return 0
    whole = dataclasses.replace(args, **{f"{role}_split": name, f"max_{role}_samples": None, "shuffle_seed": None})
    num_rows = len(load_raw_splits(whole, roles=(role,))[role])
    row_ids = Dataset.from_dict({"row": list(range(num_rows))})
    rows = _select_rows(row_ids, args, role, args.dataset_name)["row"]
    other_rows = _select_rows(row_ids, other_args, other_role, other_args.dataset_name)["row"]
    return len(set(rows) & set(other_rows))


_SPLIT_SLICE = re.compile(r"^(?P<name>[^\[\]]+)\[(?P<start>[^:\]]*):(?P<stop>[^:\]]*)\]$")
_SLICE_BOUND = re.compile(r"^-?\d+%?$")


@dataclass(frozen=True)
class RowSlice:
    """Rows `[start:stop]` of a split; each bound is a row number or, with `percent`, a percentage of the rows."""

    start: str = ""
    stop: str = ""

    def rows(self, num_rows: int) -> range:
        """
        The row indices this slice selects from a split of `num_rows` rows (a percentage to the nearest row, as
        `datasets` rounds it: `[:50%]` of 15 rows is 8 rows).
        """

        def resolve(bound: str) -> int | None:
            if not bound:
                return None
            if bound.endswith("%"):
                return round(int(bound[:-1]) * num_rows / 100)
            return int(bound)

        return range(num_rows)[resolve(self.start) : resolve(self.stop)]


def parse_split(split: str) -> tuple[str, RowSlice | None]:
    """
    Read a split name with an optional row slice, in the `datasets` syntax: `"validation"`, `"validation[:50%]"`,
    `"validation[50%:]"`, `"train[:2000]"`, `"train[-500:]"`.

    Returns:
        `tuple[str, RowSlice | None]`: the split name and the slice of its rows (`None`: every row).
    """
    if "[" not in split:
        return split, None
    match = _SPLIT_SLICE.match(split.strip())
    bounds = (match.group("start").strip(), match.group("stop").strip()) if match else ()
    if not match or any(bound and not _SLICE_BOUND.match(bound) for bound in bounds):
        raise ValueError(
            f"Cannot read the split {split!r}: use a split name, optionally with a row slice such as "
            "'validation[:50%]', 'validation[50%:]' or 'train[:2000]'."
        )
    if any(bound.endswith("%") and abs(int(bound[:-1])) > 100 for bound in bounds):
        raise ValueError(f"The row slice of {split!r} has a percentage beyond 100%; use -100% to 100%.")
    return match.group("name").strip(), RowSlice(*bounds)


def _looks_like_a_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~"))
        or "\\" in name
        or Path(name).suffix.lower() in LOCAL_FORMATS
        or name.count("/") > 1
    )


def _load_hub(args: DatasetArguments) -> DatasetDict:
    """A Hub dataset id with its configuration (every split)."""
    loaded = datasets.load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir)
    if not isinstance(loaded, DatasetDict):
        raise ValueError(f"Expected the splits of {args.dataset_name!r}, got a {type(loaded).__name__}.")
    return loaded


def _match_split(split: str, available: list[str], source: str, role: str) -> str:
    if split in available:
        return split
    for alias in SPLIT_ALIASES.get(split, ()):
        if alias in available:
            logger.info(f"Using split {alias!r} of {source} for the requested {split!r} ({role} data).")
            return alias
    raise ValueError(
        f"Unknown split {split!r} ({role} data) in {source}; available splits: {sorted(available)}. "
        f"Choose one with `--{role}_split`."
    )


def _split_of_file(path: Path) -> str:
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    return _SHARD_SUFFIX.sub("", stem)


def _local_data_files(path: Path) -> dict[str, list[Path]]:
    """Split name -> files of a local file or directory."""
    if path.is_file():
        if path.suffix.lower() not in LOCAL_FORMATS:
            raise ValueError(
                f"Unsupported data file {str(path)!r}: use one of {sorted(LOCAL_FORMATS)} (or a Hub dataset id)."
            )
        return {"train": [path]}
    for folder in (path, path / "data"):
        files = sorted(f for f in folder.glob("*") if f.is_file() and f.suffix.lower() in LOCAL_FORMATS)
        if files:
            break
    else:
        present = sorted(p.name for p in path.iterdir())[:20]
        raise ValueError(
            f"The directory {str(path)!r} holds no data files ({', '.join(sorted(LOCAL_FORMATS))}), directly or "
            f"under data/; it holds: {present}."
        )
    kinds = {".json" if f.suffix.lower() == ".jsonl" else f.suffix.lower() for f in files}
    if len(kinds) > 1:
        raise ValueError(
            f"The directory {str(path)!r} mixes data formats ({[f.name for f in files]}); keep one format per "
            "directory or point `dataset_name` at one file."
        )
    by_split: dict[str, list[Path]] = {}
    for file in files:
        by_split.setdefault(_split_of_file(file), []).append(file)
    return by_split


def _check_not_empty(file: Path, header_rows: int = 0) -> None:
    """Refuse a data file without data rows: empty, only whitespace, or (csv/tsv) only its header row."""
    size = file.stat().st_size
    if size == 0:
        raise ValueError(f"The data file {str(file)!r} is empty.")
    if file.suffix.lower() == ".parquet" or size >= 1 << 16:
        return
    lines = [line for line in file.read_bytes().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"The data file {str(file)!r} is empty (only whitespace).")
    if len(lines) <= header_rows:
        raise ValueError(f"The data file {str(file)!r} holds a header row but no data rows.")


def _is_image_folder(path: Path) -> bool:
    """A directory of class folders of images (`train/cat/1.png`, or `cat/1.png`): the `imagefolder` layout."""
    if not path.is_dir() or any(f.suffix.lower() in LOCAL_FORMATS for f in path.glob("*") if f.is_file()):
        return False
    return any(f.suffix.lower() in IMAGE_SUFFIXES for f in path.glob("*/*")) or any(
        f.suffix.lower() in IMAGE_SUFFIXES for f in path.glob("*/*/*")
    )


def _load_local(path: Path, args: DatasetArguments) -> Mapping[str, Dataset]:
    """Local files: csv/tsv (with or without header), json/jsonl, parquet, or an image folder."""
    if _is_image_folder(path):
        return datasets.load_dataset("imagefolder", data_dir=str(path), cache_dir=args.cache_dir)
    return _LocalSplits(path, args)


class _LocalSplits(Mapping):
    """
    The splits of local data files by name, each read on first access and on its own, so that a split that is not
    used, or has other columns (such as GLUE's unlabelled `test.tsv` beside `train.tsv` and `dev.tsv`), does not stop
    the others from loading.
    """

    def __init__(self, path: Path, args: DatasetArguments):
        self.path, self.args, self.files = path, args, _local_data_files(path)
        first = next(iter(self.files.values()))[0]
        suffix = first.suffix.lower()
        self.builder, self.kwargs = LOCAL_FORMATS[suffix], {}
        if self.builder == "csv":
            delimiter = args.delimiter if args.delimiter is not None else ("\t" if suffix == ".tsv" else ",")
            quoting = csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL
            self.kwargs = {"sep": delimiter, "quoting": quoting}
            if not args.has_header:
                self.kwargs["header"] = None
                self.kwargs["column_names"] = [f"column_{i}" for i in range(_count_fields(first, delimiter, quoting))]
        self.loaded: dict[str, Dataset] = {}

    def __iter__(self):
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, split: str) -> Dataset:
        if split not in self.loaded:
            files = self.files[split]
            for file in files:
                _check_not_empty(file, header_rows=1 if self.builder == "csv" and self.args.has_header else 0)
            self.loaded[split] = _load_local_split(
                self.path, self.builder, split, [str(f) for f in files], self.args, self.kwargs
            )
        return self.loaded[split]


def _load_local_split(path: Path, builder: str, split: str, files: list[str], args: DatasetArguments, kwargs: dict):
    """One split's local files through the `datasets` builder, with a clear error when they cannot be read."""
    try:
        return datasets.load_dataset(builder, data_files={split: files}, cache_dir=args.cache_dir, **kwargs)[split]
    except Exception as error:  # pandas/pyarrow parse errors: say which files could not be read
        if re.search(r'Instruction "(.+?)" corresponds to no data', str(error)):
            raise ValueError(f"The {split!r} split of {path} has no rows ({files}).") from error
        hint, chain, cause = "", [], error
        while cause is not None and len(chain) < 10:  # datasets wraps the cast error in a generation error
            chain.append(str(cause))
            cause = cause.__cause__ or cause.__context__
        mismatched = ("must have the same columns", "column names don't match")
        if builder == "csv" and args.has_header and any(marker in " ".join(chain) for marker in mismatched):
            hint = (
                " The files' first rows differ, so they are read as different headers: if the files have no header "
                "row, pass `--no_has_header` (`has_header=False`) and name columns by index."
            )
        raise ValueError(
            f"Could not read the {builder} files of the {split!r} split {files} ({type(error).__name__}: {error})."
            f"{hint}"
        ) from error


def _count_fields(file: Path, delimiter: str, quoting: int) -> int:
    with file.open(newline="", encoding="utf-8-sig") as handle:
        for row in csv.reader(handle, delimiter=delimiter, quoting=quoting):
            if any(cell.strip() for cell in row):
                return len(row)
    raise ValueError(f"The data file {str(file)!r} is empty.")


# --- generic: columns and labels ----------------------------------------------------------------------------------
def resolve_column(dataset: Dataset, column: str | int, *, what: str = "column", where: str = "") -> str:
    """
    The name of a column given by name or 0-based index (a name wins over an index).

    Args:
        dataset (`datasets.Dataset`): the dataset.
        column (`str` or `int`): a column name, or an index such as `1` or `"1"`.
        what (`str`, *optional*): what the column is for, for the error message (e.g. `"label column"`).
        where (`str`, *optional*): which split, for the error message.

    Raises:
        `ValueError` listing the available columns.
    """
    names = dataset.column_names
    if isinstance(column, str) and column in names:
        return column
    index = column if isinstance(column, int) else int(column) if str(column).strip().isdigit() else None
    if index is not None and 0 <= index < len(names):
        return names[index]
    location = f" of {where}" if where else ""
    raise ValueError(f"The {what} {column!r} is not a column{location}; available columns (0-based): {names}.")


def check_distinct_columns(dataset: Dataset, columns: Mapping[str, str | int | None], where: str) -> None:
    """
    Raise if two roles (e.g. `"text column"` and `"label column"`) name the same column of `dataset`, by name or by
    index; roles given as `None` (guessed later) are skipped.
    """
    resolved = {
        what: resolve_column(dataset, column, what=what, where=where)
        for what, column in columns.items()
        if column is not None
    }
    for what, name in resolved.items():
        others = [other for other, other_name in resolved.items() if other != what and other_name == name]
        if others:
            shadowed = str(columns[what]) != str(columns[others[0]])  # a column named like an index, e.g. "0"
            hint = (
                f" {name!r} is a column name here, which wins over the index: is a first data row read as the "
                "header? Pass `has_header=False` (`--no_has_header`) for files without one."
                if shadowed
                else ""
            )
            raise ValueError(
                f"The {what} and the {others[0]} of {where} are the same column ({name!r}); each must be its own "
                f"column (available, 0-based: {dataset.column_names}).{hint}"
            )


def encode_labels(
    splits: DatasetDict, label_column: str | int = "label", label_names: Sequence[str] | None = None
) -> ClassificationData:
    """
    Turn the label column of every split into integer class ids (a `ClassLabel` column named `label`) with one label
    list for all splits.

    - `ClassLabel` columns keep their names (they must agree across splits, and with `label_names` if given).
    - Integers (and integral floats, and booleans) are class ids; their names are `label_names` or `"0"`, `"1"`, ...
    - Strings are mapped through `label_names`, or through their sorted set over all splits; strings that all
      spell integers are class ids.

    Args:
        splits (`datasets.DatasetDict`): keyed by role.
        label_column (`str` or `int`, *optional*): by name or 0-based index.
        label_names (`Sequence[str]`, *optional*): the label list in class-id order.

    Returns:
        [`ClassificationData`].

    Raises:
        `ValueError` for missing labels, negative ids (e.g. GLUE's unlabelled test splits use -1), ids beyond the
        label list, non-integral numbers or strings not in `label_names`.
    """
    resolved = {
        role: resolve_column(ds, label_column, what="label column", where=f"the {role} split")
        for role, ds in splits.items()
    }
    label_names = [str(name) for name in label_names] if label_names is not None else None
    if label_names is not None and len(set(label_names)) != len(label_names):
        raise ValueError(f"`label_names` must be distinct, got {label_names}.")

    values: dict[str, list] = {}
    class_names: dict[str, list[str]] = {}
    for role, dataset in splits.items():
        feature = dataset.features[resolved[role]]
        column = dataset[resolved[role]]
        values[role] = list(column)
        if not isinstance(feature, ClassLabel) and resolved[role] in {str(value) for value in values[role]}:
            raise ValueError(
                f"The label column of the {role} split is named {resolved[role]!r}, which is also one of its labels: "
                "is the first row of a file without a header read as its header? Pass `has_header=False` "
                "(`--no_has_header`) for such files."
            )
        missing = sum(value is None for value in values[role])
        if missing:
            raise ValueError(f"The {role} split has {missing} rows without a label in column {resolved[role]!r}.")
        if isinstance(feature, ClassLabel):
            class_names[role] = list(feature.names)

    if class_names:
        name_lists = {tuple(names) for names in class_names.values()}
        if len(name_lists) > 1 or len(class_names) != len(splits):
            raise ValueError(f"The splits label their classes differently: {class_names}.")
        feature_names = list(next(iter(name_lists)))
        if label_names is not None and label_names != feature_names:
            remap = _mapping_from_names(feature_names, label_names)
            values = {role: [remap[v] if v >= 0 else v for v in column] for role, column in values.items()}
        else:
            label_names = feature_names

    kinds = {_label_kind(column) for column in values.values()}
    if len(kinds) > 1:
        raise ValueError(f"The splits mix label types ({sorted(kinds)}); use one type of label in every split.")
    kind = kinds.pop()
    if kind == "float":
        for role, column in values.items():
            bad = [v for v in column if not float(v).is_integer()]
            if bad:
                raise ValueError(
                    f"The {role} split has non-integer labels such as {bad[0]!r}: hf_eenet trains classifiers, so "
                    "labels must be class ids or label names (regression is not supported)."
                )
        values = {role: [int(v) for v in column] for role, column in values.items()}
        kind = "int"
    if kind == "str":
        values = {role: [v.strip() for v in column] for role, column in values.items()}  # "pos " is "pos"
        spelled_ids = all(_is_int_string(v) for column in values.values() for v in column)
        if label_names is not None and spelled_ids and not any(v in label_names for c in values.values() for v in c):
            label_names_given, label_names = label_names, None  # class ids stored as text, named by `label_names`
        else:
            label_names_given = None
        if (
            label_names is None
            and all(_is_int_string(v) for column in values.values() for v in column[1:])
            and not all(_is_int_string(column[0]) for column in values.values() if column)
        ):
            first = next(column[0] for column in values.values() if column and not _is_int_string(column[0]))
            raise ValueError(
                f"The label column {label_column!r} holds class ids except in a first row ({first!r}): is a header "
                "row read as data? Drop `has_header=False` (`--no_has_header`) for files with a header."
            )
        if label_names is None and spelled_ids:
            values = {role: [int(v) for v in column] for role, column in values.items()}
            kind, label_names = "int", label_names_given
        else:
            if label_names is None:
                label_names = sorted({v for column in values.values() for v in column})
                num_rows = sum(len(column) for column in values.values())
                phrases = sum(len(name.split()) > 1 for name in label_names)  # labels that read like text
                if num_rows >= 10 and len(label_names) > 0.9 * num_rows and phrases > len(label_names) / 2:
                    raise ValueError(
                        f"The label column {label_column!r} has {len(label_names)} distinct values in {num_rows} "
                        f"rows (e.g. {label_names[0]!r}): class labels repeat across samples. Is it the text "
                        "column? Pass `class_names` to name the classes explicitly."
                    )
            index = {name: i for i, name in enumerate(label_names)}
            for role, column in values.items():
                unknown = sorted({v for v in column if v not in index})
                if unknown:
                    raise ValueError(
                        f"The {role} split has labels {unknown[:10]} that are not in the label list {label_names}."
                    )
            values = {role: [index[v] for v in column] for role, column in values.items()}
    if kind in ("int", "bool"):
        values = {role: [int(v) for v in column] for role, column in values.items()}
        for role, column in values.items():
            negative = sum(v < 0 for v in column)
            if negative:
                raise ValueError(
                    f"The {role} split has {negative} rows with a negative label (e.g. -1, how GLUE marks the "
                    "unlabelled rows of its test splits): every split used here must be labelled."
                )
        largest = max(max(column) for column in values.values())
        if label_names is None:
            label_names = [str(i) for i in range(largest + 1)]
        elif largest >= len(label_names):
            raise ValueError(f"Label id {largest} is out of range for the {len(label_names)} labels {label_names}.")
    if len(label_names) < 2:
        logger.warning(f"Only one class ({label_names}) was found: a classifier needs at least two.")
    if "train" in values:
        unseen = sorted(set(range(len(label_names))) - set(values["train"]))
        if unseen:
            logger.warning(
                f"The train split has no rows of the classes {[label_names[i] for i in unseen]} (of {label_names}): "
                "their classifier rows and exit heads learn nothing for them."
            )

    feature = ClassLabel(names=label_names)
    result = DatasetDict()
    for role, dataset in splits.items():
        dataset = dataset.remove_columns(resolved[role])
        if "label" in dataset.column_names:
            dataset = dataset.remove_columns("label")
        result[role] = dataset.add_column("label", values[role], feature=feature)
    return ClassificationData(splits=result, label_names=list(label_names))


def _mapping_from_names(source: list[str], target: list[str]) -> dict[int, int]:
    missing = [name for name in source if name not in target]
    if missing:
        raise ValueError(f"The dataset's labels {missing} are not in `label_names` {target}.")
    return {i: target.index(name) for i, name in enumerate(source)}


def _label_kind(column: list) -> str:
    kinds = set()
    for value in column:
        if isinstance(value, bool):
            kinds.add("bool")
        elif isinstance(value, int):
            kinds.add("int")
        elif isinstance(value, float):
            kinds.add("float")
        elif isinstance(value, str):
            kinds.add("str")
        else:
            raise ValueError(f"Labels must be class ids or label names, got a {type(value).__name__}: {value!r}.")
    if kinds <= {"int", "bool"}:
        return "int" if "int" in kinds else "bool"
    if kinds <= {"int", "float"}:
        return "float"
    if len(kinds) > 1:
        raise ValueError(f"A label column mixes label types: {sorted(kinds)}.")
    return kinds.pop()


def _is_int_string(value: str) -> bool:
    return bool(re.fullmatch(r"\s*\d+\s*", value))


def resolve_label_list(args: DatasetArguments, label_names: Sequence[str] | None) -> list[str] | None:
    """
    The label list to encode labels with: `label_names` (a model's labels, in class-id order) or `args.class_names`.
    Both given must agree: a model's classifier, and the exits trained beside it, know their classes by id.
    """
    if label_names is None:
        return args.class_names
    label_names = [str(name) for name in label_names]
    if args.class_names is not None and [str(name) for name in args.class_names] != label_names:
        raise ValueError(
            f"`class_names` {list(args.class_names)} differ from the model's labels {label_names} (in class-id "
            "order): drop `class_names` to use the model's, or list them in the model's order."
        )
    return label_names


# --- text ---------------------------------------------------------------------------------------------------------
def prepare_text_columns(
    splits: DatasetDict, text_column: str | int | None = None, text_pair_column: str | int | None = None
) -> DatasetDict:
    """
    Keep a split's text in a string column `text` (and `text_pair` when given), dropping the other input columns
    (the `label` column is kept). Missing texts become empty strings.

    Args:
        splits (`datasets.DatasetDict`): keyed by role.
        text_column (`str` or `int`, *optional*): by name or 0-based index; guessed when `None`.
        text_pair_column (`str` or `int`, *optional*): by name or 0-based index.
    """
    result = DatasetDict()
    for role, dataset in splits.items():
        where = f"the {role} split"
        if text_column is None:
            text = _guess_text_column(dataset, where)
        else:
            text = resolve_column(dataset, text_column, what="text column", where=where)
        columns = {"text": text}
        if text_pair_column is not None:
            columns["text_pair"] = resolve_column(dataset, text_pair_column, what="text-pair column", where=where)
            if columns["text_pair"] == text:
                raise ValueError(f"The text and text-pair columns are the same column ({text!r}).")
        for target, source in columns.items():
            if source == "label":
                raise ValueError(f"The {target} column cannot be the label column.")
        texts = {
            target: [("" if v is None else str(v)) for v in dataset[source]] for target, source in columns.items()
        }
        keep = dataset.select_columns(["label"]) if "label" in dataset.column_names else None
        if keep is None:
            prepared = Dataset.from_dict(texts, features=datasets.Features({t: Value("string") for t in texts}))
        else:
            prepared = keep
            for target, column in texts.items():
                prepared = prepared.add_column(target, column, feature=Value("string"))
        result[role] = prepared
    return result


def _guess_text_column(dataset: Dataset, where: str) -> str:
    for name in TEXT_COLUMN_CANDIDATES:
        if name in dataset.column_names:
            return name
    for name, feature in dataset.features.items():
        if name != "label" and isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
            return name
    raise ValueError(
        f"Could not find a text column in {where}; pass `--text_column` (name or 0-based index). Available columns: "
        f"{dataset.column_names}."
    )


def load_text_classification_data(
    args: DatasetArguments, roles: Sequence[str] = DATA_ROLES, label_names: Sequence[str] | None = None
) -> ClassificationData:
    """
    Load, validate and standardise text-classification splits: columns `text` (and `text_pair`) and `label`.

    Args:
        args ([`DatasetArguments`]): the dataset, splits and columns.
        roles (`Sequence[str]`, *optional*): which of `"train"`, `"calibration"`, `"test"` to load.
        label_names (`Sequence[str]`, *optional*):
            The label list to map labels through, e.g. a trained model's labels in class-id order;
            `args.class_names`, if given, must be the same list.

    Returns:
        [`ClassificationData`]: the splits keyed by role, and the label list.

    Example:

    ```python
    >>> from hf_eenet.data import DatasetArguments, load_text_classification_data
    >>> args = DatasetArguments("../shared/data/sst2", calibration_split="dev", max_train_samples=2000)
    >>> data = load_text_classification_data(args)
    >>> data.splits["calibration"][0], data.label_names
    ```
    """
    raw = load_raw_splits(args, roles)
    names = resolve_label_list(args, label_names)
    # labels first (while the columns still have their original positions), then the text columns
    label_column = args.label_column
    text_column, pair_column = args.text_column, args.text_pair_column
    for role, ds in raw.items():
        columns = {"text column": text_column, "text-pair column": pair_column, "label column": label_column}
        check_distinct_columns(ds, columns, f"the {role} split")
    positions = {
        role: {
            "text": None
            if text_column is None
            else resolve_column(ds, text_column, what="text column", where=f"the {role} split"),
            "pair": None
            if pair_column is None
            else resolve_column(ds, pair_column, what="text-pair column", where=f"the {role} split"),
        }
        for role, ds in raw.items()
    }
    data = encode_labels(raw, label_column, names)
    splits = DatasetDict()
    for role, dataset in data.splits.items():
        prepared = prepare_text_columns(DatasetDict({role: dataset}), positions[role]["text"], positions[role]["pair"])
        splits[role] = prepared[role]
    return ClassificationData(splits=splits, label_names=data.label_names)


def check_max_seq_length(args: DatasetArguments, processor, config) -> None:
    """
    Raise early if texts would be longer than the model's position embeddings (`config.max_position_embeddings`):
    `args.max_seq_length`, or without it the tokenizer's `model_max_length`, must not exceed them. Image processors
    and models without a position limit pass.
    """
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None or not isinstance(processor, PreTrainedTokenizerBase):
        return
    length = args.max_seq_length if args.max_seq_length is not None else processor.model_max_length
    if length > limit:
        source = "`max_seq_length`" if args.max_seq_length is not None else "the tokenizer's `model_max_length`"
        raise ValueError(
            f"{source} is {length}, but the model has {limit} position embeddings: texts would be truncated to "
            f"{length} tokens and fail in the model; pass `max_seq_length` <= {limit}."
        )


def tokenize_text_splits(
    splits: DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int | None = 128,
    num_proc: int | None = None,
) -> DatasetDict:
    """
    Tokenize the `text` (and `text_pair`) columns without padding (pad per batch with [`text_data_collator`]),
    truncating to `max_seq_length`. The text columns are replaced by the tokenizer's outputs; `label` is kept.

    Args:
        splits (`datasets.DatasetDict`): as returned in [`ClassificationData.splits`].
        tokenizer ([`PreTrainedTokenizerBase`]): the model's tokenizer.
        max_seq_length (`int`, *optional*, defaults to 128): `None` uses the tokenizer's `model_max_length`.
        num_proc (`int`, *optional*): processes for `Dataset.map`.
    """
    max_length = max_seq_length if max_seq_length is not None else tokenizer.model_max_length

    def tokenize(batch):
        pair = batch.get("text_pair")
        return tokenizer(batch["text"], pair, truncation=True, max_length=max_length)

    result = DatasetDict()
    for role, dataset in splits.items():
        if "text" not in dataset.column_names:
            raise ValueError(f"The {role} split has no `text` column; prepare it with `prepare_text_columns` first.")
        remove = [c for c in ("text", "text_pair") if c in dataset.column_names]
        result[role] = dataset.map(
            tokenize, batched=True, remove_columns=remove, num_proc=num_proc, desc=f"Tokenizing the {role} split"
        )
    return result


def text_data_collator(
    tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None
) -> DataCollatorWithPadding:
    """Dynamic padding to the longest sequence of each batch (`label` becomes `labels`)."""
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)


def load_processed_splits(
    args: DatasetArguments,
    processor,
    roles: Sequence[str] = DATA_ROLES,
    label_names: Sequence[str] | None = None,
):
    """
    Load the splits that play `roles` and process them for a model: tokenized (unpadded) text with a
    [`text_data_collator`], or images turned into `pixel_values` on the fly by the model's image processor (with
    `args.augment_train`, the training split is augmented). The one entry point of the workflow scripts.

    Args:
        args ([`DatasetArguments`]): the dataset, splits and columns.
        processor: the model's tokenizer or image processor.
        roles (`Sequence[str]`, *optional*): which of `"train"`, `"calibration"`, `"test"` to load.
        label_names (`Sequence[str]`, *optional*): the model's labels in class-id order (for a trained model).

    Returns:
        `tuple[ClassificationData, datasets.DatasetDict, Callable]`: the raw standardised data (label list
        included), the processed splits keyed by role, and the data collator.
    """
    is_text = isinstance(processor, PreTrainedTokenizerBase)
    other_modality = (
        {"image_column": args.image_column, "augment_train": args.augment_train}
        if is_text
        else {"text_column": args.text_column, "text_pair_column": args.text_pair_column}
    )
    given = {name: value for name, value in other_modality.items() if value not in (None, False)}
    if given and (is_text or isinstance(processor, BaseImageProcessor)):
        raise ValueError(
            f"{given} apply to {'image' if is_text else 'text'} data, but this model takes "
            f"{'text' if is_text else 'images'}."
        )
    if is_text:
        data = load_text_classification_data(args, roles, label_names=label_names)
        splits = tokenize_text_splits(data.splits, processor, args.max_seq_length)
        return data, splits, text_data_collator(processor)
    if isinstance(processor, BaseImageProcessor):
        data = load_image_classification_data(args, roles, label_names=label_names)
        augmented = ("train",) if args.augment_train else ()
        return data, process_image_splits(data.splits, processor, augmented), DefaultDataCollator()
    raise TypeError(
        f"Expected a tokenizer (text data) or an image processor (image data), got {type(processor).__name__}."
    )


# --- images ----------------------------------------------------------------------------------------------------------
def _guess_image_column(dataset: Dataset, where: str) -> str:
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            return name
    for name in IMAGE_COLUMN_CANDIDATES:
        if name in dataset.column_names:
            return name
    raise ValueError(
        f"No image column found in {where} (columns: {dataset.column_names}); name it with `--image_column`."
    )


def load_image_classification_data(
    args: DatasetArguments, roles: Sequence[str] = DATA_ROLES, label_names: Sequence[str] | None = None
) -> ClassificationData:
    """
    Load, validate and standardise image-classification splits: columns `image` (a `datasets.Image` feature, decoded
    to PIL images on access) and `label`.

    Args:
        args ([`DatasetArguments`]): the dataset (Hub id, parquet files such as the Hub's layout, or an image folder),
            splits and columns.
        roles (`Sequence[str]`, *optional*): which of `"train"`, `"calibration"`, `"test"` to load.
        label_names (`Sequence[str]`, *optional*): the label list in class-id order (e.g. a trained model's);
            `args.class_names`, if given, must be the same list.

    Returns:
        [`ClassificationData`]: the splits keyed by role, and the label list.
    """
    raw = load_raw_splits(args, roles)
    for role, ds in raw.items():
        columns = {"image column": args.image_column, "label column": args.label_column}
        check_distinct_columns(ds, columns, f"the {role} split")
    image_columns = {
        role: resolve_column(ds, args.image_column, what="image column", where=f"the {role} split")
        if args.image_column is not None
        else _guess_image_column(ds, f"the {role} split")
        for role, ds in raw.items()
    }
    data = encode_labels(raw, args.label_column, resolve_label_list(args, label_names))
    splits = DatasetDict()
    for role, dataset in data.splits.items():
        column = image_columns[role]
        dataset = dataset.select_columns([column, "label"])
        if column != "image":
            dataset = dataset.rename_column(column, "image")
        if not isinstance(dataset.features["image"], datasets.Image):
            dataset = _resolve_image_paths(dataset, args, role)
            dataset = dataset.cast_column("image", datasets.Image())  # e.g. file paths or encoded bytes
        splits[role] = dataset
    return ClassificationData(splits=splits, label_names=data.label_names)


def _resolve_image_paths(dataset: Dataset, args: DatasetArguments, role: str) -> Dataset:
    """
    Image file paths of local data files: a relative path is read against the data files' folder where the file is
    there (so that a dataset folder can move), else against the working directory (as `datasets` reads it). The first
    row's file must exist, so that a wrong path fails here rather than at the first batch of training.
    """
    first = dataset[0]["image"]
    if not isinstance(first, str) or first.startswith(("http://", "https://", "hf://")):
        return dataset
    local = Path(args.dataset_name).expanduser()
    base = next(iter(_local_data_files(local).values()))[0].parent if local.exists() else None
    candidates = [Path(first)] if Path(first).is_absolute() or base is None else [base / first, Path(first)]
    found = next((candidate for candidate in candidates if candidate.is_file()), None)
    if found is None:
        raise FileNotFoundError(
            f"The image file {first!r} of the first row of the {role} split does not exist (looked for "
            f"{' and '.join(repr(str(c)) for c in candidates)}); relative paths are read against the data files' "
            "folder or the working directory."
        )
    if base is None or found != base / first:
        return dataset
    return dataset.map(
        lambda batch: {"image": [p if os.path.isabs(p) else str(base / p) for p in batch["image"]]},
        batched=True,
        desc="Resolving image paths",
    )


def augment_image(image, rng: random.Random | None = None):
    """
    The standard small-image augmentation, with PIL only: a random crop of the image padded (with zeros) by 1/8 of
    its side, and a random horizontal flip.
    """
    from PIL import ImageOps  # the vision extra

    rng = rng or random
    width, height = image.size
    pad = max(1, round(min(width, height) / 8))
    padded = ImageOps.expand(image, border=pad, fill=0)
    left, top = rng.randint(0, 2 * pad), rng.randint(0, 2 * pad)
    image = padded.crop((left, top, left + width, top + height))
    return ImageOps.mirror(image) if rng.random() < 0.5 else image


def process_image_splits(
    splits: DatasetDict, image_processor: BaseImageProcessor, augmented_roles: Sequence[str] = ()
) -> DatasetDict:
    """
    Turn the `image` column into the model's `pixel_values` on access (`Dataset.with_transform`, so nothing is
    stored), augmenting the splits of `augmented_roles` with [`augment_image`]. Use with
    `remove_unused_columns=False` in the training arguments (the transform needs the `image` column).
    """
    result = DatasetDict()
    for role, dataset in splits.items():
        if "image" not in dataset.column_names:
            raise ValueError(f"The {role} split has no `image` column; load it with `load_image_classification_data`.")
        augment = role in augmented_roles

        def transform(batch, augment=augment):
            images = [image.convert("RGB") for image in batch["image"]]
            if augment:
                images = [augment_image(image) for image in images]
            pixel_values = image_processor(images, return_tensors="pt")["pixel_values"]
            return {"pixel_values": pixel_values, "label": batch["label"]}

        result[role] = dataset.with_transform(transform)
    return result
