"""Loading an EENet model from either an EENet checkpoint or a stock backbone checkpoint."""

from __future__ import annotations

import os

from transformers import AutoConfig, PretrainedConfig

from .models import (
    EENetBertForSequenceClassification,
    EENetResNetForImageClassification,
    EENetViTForImageClassification,
)
from .models.early_exit import hub_loading_kwargs

__all__ = ["EENET_MODEL_FOR_BACKBONE", "checkpoint_config", "eenet_model_class", "load_eenet_model", "local_or_hub"]

# Stock backbone model type -> the EENet class that loads its checkpoints (only exits and policy newly initialised).
EENET_MODEL_FOR_BACKBONE: dict[str, type] = {
    "bert": EENetBertForSequenceClassification,
    "vit": EENetViTForImageClassification,
    "resnet": EENetResNetForImageClassification,
}


def local_or_hub(pretrained_model_name_or_path: str) -> str:
    """
    A model reference as `from_pretrained` should get it: a local path with `~` expanded; a path that must be local
    but does not exist (absolute, `./`/`../`, `~`, a backslash, more than one `/`, or `dir/name` whose `dir` exists
    here) raises `FileNotFoundError`, which transformers would report as a malformed or unknown Hub repo id.
    """
    path = str(pretrained_model_name_or_path)
    local = os.path.expanduser(path)
    if os.path.isdir(local):
        return local
    first = path.split("/")[0]
    must_be_local = (
        path.startswith(("/", "./", "../", "~"))
        or path in (".", "..")
        or "\\" in path
        or path.count("/") > 1
        or ("/" in path and os.path.isdir(first))
    )
    if must_be_local:
        raise FileNotFoundError(f"No model directory at {path!r} (a local path, not a Hub id).")
    return path


def checkpoint_config(pretrained_model_name_or_path: str, **hub_kwargs) -> PretrainedConfig:
    """`AutoConfig.from_pretrained` of [`local_or_hub`]'s reference: a clear error for a missing local directory."""
    return AutoConfig.from_pretrained(local_or_hub(pretrained_model_name_or_path), **hub_kwargs)


def eenet_model_class(config: PretrainedConfig) -> type:
    """The EENet class for a config: its own class for an EENet config, the matching EENet class for a stock one."""
    for cls in EENET_MODEL_FOR_BACKBONE.values():
        if config.model_type == cls.config_class.model_type:
            return cls
    if config.model_type in EENET_MODEL_FOR_BACKBONE:
        return EENET_MODEL_FOR_BACKBONE[config.model_type]
    supported = sorted(EENET_MODEL_FOR_BACKBONE) + sorted(
        c.config_class.model_type for c in EENET_MODEL_FOR_BACKBONE.values()
    )
    raise ValueError(f"No EENet model for checkpoints of type {config.model_type!r}; supported types: {supported}.")


def is_eenet_config(config: PretrainedConfig) -> bool:
    """Whether a config is an EENet model's (rather than a stock backbone's that would load into one)."""
    return any(config.model_type == cls.config_class.model_type for cls in EENET_MODEL_FOR_BACKBONE.values())


def load_eenet_model(pretrained_model_name_or_path: str, **kwargs):
    """
    Load an EENet model from an EENet checkpoint, or from a stock checkpoint of a supported backbone (e.g. a BERT
    `BertModel` / `BertForSequenceClassification`), in which case only the exits (and the policy) are new.

    Args:
        pretrained_model_name_or_path (`str`): Hub id or local directory.
        kwargs: config overrides and `from_pretrained` arguments (e.g. `num_labels`, `exit_pooling`).
    """
    pretrained_model_name_or_path = local_or_hub(pretrained_model_name_or_path)
    config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **hub_loading_kwargs(kwargs))
    return eenet_model_class(config).from_pretrained(pretrained_model_name_or_path, **kwargs)


def load_processor(pretrained_model_name_or_path: str, **kwargs):
    """
    The processor of a checkpoint or model config directory: its tokenizer for a text model, its image processor for
    an image model (decided by the EENet class its config maps to).
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    pretrained_model_name_or_path = local_or_hub(pretrained_model_name_or_path)
    config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **hub_loading_kwargs(kwargs))
    if eenet_model_class(config).main_input_name == "pixel_values":
        return AutoImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs)
    return AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)
