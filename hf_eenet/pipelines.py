"""Budget-aware classification pipelines.

`import hf_eenet` registers [`EENetTextClassificationPipeline`] under the built-in `"text-classification"` task (and
its `"sentiment-analysis"` alias), so `pipeline("text-classification", model=..., budget=0.5)` works for EENet
models. The class is a strict superset of the stock pipeline: for a stock model it behaves exactly as before, and an
EENet-only argument (`budget`) given to a stock model is an error rather than silently ignored.
"""

from __future__ import annotations

import logging as _logging
from typing import Any

from transformers import ImageClassificationPipeline, TextClassificationPipeline

from .models.configuration_eenet import validate_budget
from .models.early_exit import EarlyExitMixin

__all__ = ["BudgetedPipelineMixin", "EENetImageClassificationPipeline", "EENetTextClassificationPipeline"]


class BudgetedPipelineMixin:
    """Adds the `budget` argument (at construction and per call) and the exit taken to a classification pipeline."""

    @property
    def is_early_exit_model(self) -> bool:
        return isinstance(self.model, EarlyExitMixin)

    def _budget_forward_params(self, budget) -> dict[str, Any]:
        if budget is None:
            return {}
        if not self.is_early_exit_model:
            raise ValueError(
                f"`budget` is only accepted by early-exit (hf_eenet) models, but this pipeline's model is a "
                f"{type(self.model).__name__}. Remove `budget` or load an EENet model."
            )
        budget = validate_budget(budget)
        self.model._resolve_policy(budget, None)  # unreachable or unfitted budgets fail now, not mid-batch
        return {"budget": budget}

    def _early_exit_forward(self, model_inputs, budget=None):
        return self.model(**model_inputs, budget=budget)

    def _with_exit(self, result, model_outputs):
        """Attach the exit taken and its cost to each result dict (EENet models only)."""
        if not self.is_early_exit_model:
            return result
        extra = {
            "exit_index": int(model_outputs["exit_index"][0]),
            "exit_cost": float(model_outputs["exit_cost"][0]),
        }
        if isinstance(result, dict):
            return {**result, **extra}
        return [{**item, **extra} for item in result]


class EENetTextClassificationPipeline(BudgetedPipelineMixin, TextClassificationPipeline):
    r"""
    [`TextClassificationPipeline`] with an early-exit budget.

    Args:
        budget (`float`, *optional*):
            Allowed average cost per sample relative to the full model (EENet models only), given when the pipeline
            is built and/or per call (`clf(texts, budget=0.3)`); `None` uses the model's `config.default_budget`.
        kwargs:
            As for [`TextClassificationPipeline`].

    Each result also carries `exit_index` (the exit the text took) and `exit_cost` (its relative cost) for EENet
    models.

    Example:

    ```python
    >>> import hf_eenet
    >>> from transformers import pipeline
    >>> clf = pipeline("text-classification", model="path/to/eenet-bert-sst2", budget=0.5)
    >>> clf(["a gorgeous, witty film", "dull"], batch_size=32)
    [{'label': 'positive', 'score': 0.98, 'exit_index': 0, 'exit_cost': 0.17}, ...]
    ```
    """

    def _sanitize_parameters(self, budget=None, **kwargs):
        preprocess_params, forward_params, postprocess_params = super()._sanitize_parameters(**kwargs)
        forward_params.update(self._budget_forward_params(budget))
        return preprocess_params, forward_params, postprocess_params

    def _forward(self, model_inputs, budget=None):
        if not self.is_early_exit_model:
            return super()._forward(model_inputs)
        return self._early_exit_forward(model_inputs, budget)

    def postprocess(self, model_outputs, **postprocess_params):
        return self._with_exit(super().postprocess(model_outputs, **postprocess_params), model_outputs)


class EENetImageClassificationPipeline(BudgetedPipelineMixin, ImageClassificationPipeline):
    r"""
    [`ImageClassificationPipeline`] with an early-exit budget.

    Args:
        budget (`float`, *optional*):
            Allowed average cost per image relative to the full model (EENet models only), given when the pipeline
            is built and/or per call (`classifier(images, budget=0.3)`); `None` uses the model's
            `config.default_budget`.
        kwargs:
            As for [`ImageClassificationPipeline`].

    Each of an image's top-k results also carries `exit_index` (the exit the image took) and `exit_cost` (its
    relative cost) for EENet models.

    Example:

    ```python
    >>> import hf_eenet
    >>> from transformers import pipeline
    >>> classifier = pipeline("image-classification", model="path/to/eenet-resnet-cifar10", budget=0.5)
    >>> classifier(images, batch_size=64, top_k=1)
    [[{'label': 'cat', 'score': 0.91, 'exit_index': 1, 'exit_cost': 0.42}], ...]
    ```
    """

    def _sanitize_parameters(self, budget=None, **kwargs):
        preprocess_params, forward_params, postprocess_params = super()._sanitize_parameters(**kwargs)
        forward_params.update(self._budget_forward_params(budget))
        return preprocess_params, forward_params, postprocess_params

    def _forward(self, model_inputs, budget=None):
        if not self.is_early_exit_model:
            return super()._forward(model_inputs)
        return self._early_exit_forward(model_inputs, budget)

    def postprocess(self, model_outputs, **postprocess_params):
        return self._with_exit(super().postprocess(model_outputs, **postprocess_params), model_outputs)


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
