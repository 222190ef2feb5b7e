"""Saving EENet models as Hub remote code, for users who load them without installing hf_eenet.

`model.save_pretrained(directory, remote_code=True)` (or `push_to_hub(..., remote_code=True)`) copies the model code
(`hf_eenet/models/*.py`: flat, torch/transformers imports only) next to the weights and records it in the config's
`auto_map` and `custom_pipelines`, so that

```python
from transformers import AutoModelForSequenceClassification, pipeline
model = AutoModelForSequenceClassification.from_pretrained(repo, trust_remote_code=True)
clf = pipeline("text-classification", model=repo, trust_remote_code=True, budget=0.5)
```

work without `hf_eenet`. As transformers does for custom models, a model loaded from such a save ships its code again
when saved (`remote_code=None`, the default: as loaded); `remote_code=False` saves its config without those entries.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

from . import models

__all__ = [
    "MODEL_CODE_DIR",
    "REMOTE_CODE_KEYS",
    "config_without_remote_code",
    "remote_code_entries",
    "save_remote_code",
    "ships_remote_code",
]

MODEL_CODE_DIR = Path(models.__file__).parent
REMOTE_CODE_KEYS = ("auto_map", "custom_pipelines")


def _module_file(cls: type) -> str:
    return cls.__module__.rsplit(".", 1)[-1]


def remote_code_entries(model) -> dict[str, dict]:
    """The config entries (`auto_map`, `custom_pipelines`) that point transformers at the code shipped with `model`."""
    is_text = model.main_input_name == "input_ids"
    auto_class = "AutoModelForSequenceClassification" if is_text else "AutoModelForImageClassification"
    task = "text-classification" if is_text else "image-classification"
    pipeline_class = "EENetTextClassificationPipeline" if is_text else "EENetImageClassificationPipeline"
    config_class = type(model.config)
    return {
        "auto_map": {
            "AutoConfig": f"{_module_file(config_class)}.{config_class.__name__}",
            auto_class: f"{_module_file(type(model))}.{type(model).__name__}",
        },
        "custom_pipelines": {
            task: {
                "impl": f"pipeline_eenet.{pipeline_class}",
                "pt": [auto_class],
                "type": "text" if is_text else "image",
            }
        },
    }


def ships_remote_code(model) -> bool:
    """Whether the model's config carries hf_eenet's `auto_map` (as a model loaded from a remote-code save does)."""
    return getattr(model.config, "auto_map", None) == remote_code_entries(model)["auto_map"]


def config_without_remote_code(config):
    """A copy of `config` without `auto_map` and `custom_pipelines`."""
    config = copy.deepcopy(config)
    for key in REMOTE_CODE_KEYS:
        if hasattr(config, key):
            delattr(config, key)
    return config


def save_remote_code(model, directory: str | Path, remote_code: bool | None = True) -> list[Path]:
    """
    Ship the model code with a model saved in `directory`, or make sure its config does not claim it (the model's own
    config object is left unchanged either way).

    Args:
        model: the saved EENet model.
        directory (`str` or `Path`): where it was saved (holds its `config.json`).
        remote_code (`bool`, *optional*, defaults to `True`): `True` copies the model code into `directory` and
            rewrites its `config.json` with `auto_map` and `custom_pipelines`; `False` rewrites it without them if the
            model's config carries hf_eenet's; `None` does what the model's config says ([`ships_remote_code`]).

    Returns:
        `list[Path]`: the code files written.
    """
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} holds no config.json: save the model there first.")
    if remote_code is None:
        remote_code = ships_remote_code(model)
    if not remote_code:
        if ships_remote_code(model):
            config_without_remote_code(model.config).save_pretrained(directory)
        return []
    written = []
    for source in sorted(MODEL_CODE_DIR.glob("*.py")):
        if source.name != "__init__.py":
            written.append(Path(shutil.copyfile(source, directory / source.name)))
    config = copy.deepcopy(model.config)
    for key, value in remote_code_entries(model).items():
        setattr(config, key, value)
    config.save_pretrained(directory)
    return written
