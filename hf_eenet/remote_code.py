"""Saving EENet models as Hub remote code, for users who load them without installing hf_eenet.

`model.save_pretrained(directory, remote_code=True)` (or `push_to_hub(..., remote_code=True)`) copies the model code
(`hf_eenet/models/*.py`: flat, torch/transformers imports only) next to the weights and records it in the config's
`auto_map` and `custom_pipelines`, so that

```python
from transformers import AutoModelForSequenceClassification, pipeline
model = AutoModelForSequenceClassification.from_pretrained(repo, trust_remote_code=True)
clf = pipeline("text-classification", model=repo, trust_remote_code=True, budget=0.5)
```

work without `hf_eenet`.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

from . import models

__all__ = ["MODEL_CODE_DIR", "save_remote_code"]

MODEL_CODE_DIR = Path(models.__file__).parent


def _module_file(cls: type) -> str:
    return cls.__module__.rsplit(".", 1)[-1]


def save_remote_code(model, directory: str | Path) -> list[Path]:
    """
    Copy the model code into `directory` and rewrite its `config.json` with `auto_map` and `custom_pipelines`
    (the model's own config object is left unchanged).

    Returns:
        `list[Path]`: the code files written.
    """
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} holds no config.json: save the model there first.")
    written = []
    for source in sorted(MODEL_CODE_DIR.glob("*.py")):
        if source.name != "__init__.py":
            written.append(Path(shutil.copyfile(source, directory / source.name)))
    is_text = model.main_input_name == "input_ids"
    auto_class = "AutoModelForSequenceClassification" if is_text else "AutoModelForImageClassification"
    task = "text-classification" if is_text else "image-classification"
    pipeline_class = "EENetTextClassificationPipeline" if is_text else "EENetImageClassificationPipeline"
    config = copy.deepcopy(model.config)
    config.auto_map = {
        "AutoConfig": f"{_module_file(type(config))}.{type(config).__name__}",
        auto_class: f"{_module_file(type(model))}.{type(model).__name__}",
    }
    config.custom_pipelines = {
        task: {"impl": f"pipeline_eenet.{pipeline_class}", "pt": [auto_class], "type": "text" if is_text else "image"}
    }
    config.save_pretrained(directory)
    return written
