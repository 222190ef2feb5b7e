"""Registration of the budget-aware classification pipelines.

`import hf_eenet` registers [`EENetTextClassificationPipeline`] under the built-in `"text-classification"` task (and
its `"sentiment-analysis"` alias) and [`EENetImageClassificationPipeline`] under `"image-classification"`, so
`pipeline("text-classification", model=..., budget=0.5)` works for EENet models while stock models behave exactly as
before. The classes live in `hf_eenet/models/pipeline_eenet.py` so they can also ship as Hub remote code.
"""

from __future__ import annotations

import logging as _logging

from .models.pipeline_eenet import (
    BudgetedPipelineMixin,
    EENetImageClassificationPipeline,
    EENetTextClassificationPipeline,
)

__all__ = [
    "BudgetedPipelineMixin",
    "EENetImageClassificationPipeline",
    "EENetTextClassificationPipeline",
    "register_pipelines",
]


def register_pipelines() -> None:
    """Register the budgeted pipelines under the built-in task names (quietly: the override is intended)."""
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification
    from transformers.pipelines import PIPELINE_REGISTRY

    registry_logger = _logging.getLogger("transformers.pipelines.base")
    level = registry_logger.level
    registry_logger.setLevel(_logging.ERROR)  # silence "Overwriting pipeline for task ..."
    try:
        PIPELINE_REGISTRY.register_pipeline(
            "text-classification",
            pipeline_class=EENetTextClassificationPipeline,
            pt_model=AutoModelForSequenceClassification,
            default=PIPELINE_REGISTRY.supported_tasks["text-classification"].get("default"),
            type="text",
        )
        PIPELINE_REGISTRY.register_pipeline(
            "image-classification",
            pipeline_class=EENetImageClassificationPipeline,
            pt_model=AutoModelForImageClassification,
            default=PIPELINE_REGISTRY.supported_tasks["image-classification"].get("default"),
            type="image",
        )
    finally:
        registry_logger.setLevel(level)
