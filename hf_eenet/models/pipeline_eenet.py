"""Budget-aware classification pipelines (model code: also ships as Hub remote code with `custom_pipelines`).

Both classes are strict supersets of the stock pipelines: for a stock model they behave exactly as before, and an
EENet-only argument (`budget`, `exit_policy`) given to a stock model is an error rather than silently ignored.
"""

from __future__ import annotations

from typing import Any

from transformers import ImageClassificationPipeline, TextClassificationPipeline

from .budget_tracking import is_budget_tracker
from .configuration_eenet import validate_budget
from .early_exit import EarlyExitMixin

__all__ = ["BudgetedPipelineMixin", "EENetImageClassificationPipeline", "EENetTextClassificationPipeline"]


class BudgetedPipelineMixin:
    """
    Adds the `budget` and `exit_policy` arguments (at construction and per call) and the exit taken to a
    classification pipeline.
    """

    @property
    def is_early_exit_model(self) -> bool:
        # duck-typed: as Hub remote code, the model and this pipeline may come from separately loaded module copies
        return isinstance(self.model, EarlyExitMixin) or callable(getattr(self.model, "early_exit_forward", None))

    def check_model_type(self, supported_models):
        """Every early-exit model serves its task (the onnxruntime one too, which no auto mapping lists)."""
        if not self.is_early_exit_model:
            super().check_model_type(supported_models)

    def _early_exit_forward_params(self, budget, exit_policy) -> dict[str, Any]:
        """
        The call's (or, at build time, the pipeline's) `budget` and `exit_policy`, checked together with what the
        pipeline was built with (a call's arguments override those): unreachable or unfitted budgets, and policies of
        another model, fail now, not mid-batch. A call's policy that decides its own cost (patience, static) runs
        without the pipeline's budget.
        """
        given = {
            name: value for name, value in (("budget", budget), ("exit_policy", exit_policy)) if value is not None
        }
        if not given:
            return {}
        if not self.is_early_exit_model:
            raise ValueError(
                f"`{'` and `'.join(given)}` {'are' if len(given) > 1 else 'is'} only accepted by early-exit (hf_eenet) "
                f"models, but this pipeline's model is a {type(self.model).__name__}. Remove "
                f"{'them' if len(given) > 1 else 'it'} or load an EENet model."
            )
        if budget is not None and not is_budget_tracker(budget):
            given["budget"] = budget = validate_budget(budget)
        built = getattr(self, "_forward_params", {})  # not yet set while the pipeline is built
        if budget is None and exit_policy is not None and not getattr(exit_policy, "requires_budget", True):
            given["budget"] = None  # overrides the pipeline's budget for this call
        budget = budget if "budget" in given else built.get("budget")
        exit_policy = exit_policy if exit_policy is not None else built.get("exit_policy")
        self.model._resolve_policy(budget.budget if is_budget_tracker(budget) else budget, exit_policy)
        return given

    def __call__(self, inputs, *args, **kwargs):
        if self.is_early_exit_model and isinstance(inputs, (list, tuple)) and len(inputs) == 0:
            raise ValueError(
                f"{type(self).__name__} was called with an empty {type(inputs).__name__}: nothing to classify."
            )
        return super().__call__(inputs, *args, **kwargs)

    def _sanitize_parameters(self, budget=None, exit_policy=None, **kwargs):
        preprocess_params, forward_params, postprocess_params = super()._sanitize_parameters(**kwargs)
        forward_params.update(self._early_exit_forward_params(budget, exit_policy))
        return preprocess_params, forward_params, postprocess_params

    def _forward(self, model_inputs, budget=None, exit_policy=None):
        if not self.is_early_exit_model:
            return super()._forward(model_inputs)
        return self.model(**model_inputs, budget=budget, exit_policy=exit_policy)

    def postprocess(self, model_outputs, **postprocess_params):
        return self._with_exit(super().postprocess(model_outputs, **postprocess_params), model_outputs)

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
        budget (`float` or [`BudgetTracker`], *optional*):
            Allowed average cost per sample relative to the full model (EENet models only), given when the pipeline
            is built and/or per call (`clf(texts, budget=0.3)`); a call without one (or with `None`) keeps the
            pipeline's, and a pipeline built without one uses the model's `config.default_budget`. A
            [`BudgetTracker`] keeps the average over every call it serves at its budget.
        exit_policy ([`ExitPolicy`], *optional*):
            A policy to decide the exits instead of the model's stored one (EENet models only), as the model's
            `forward` takes it, at build time and/or per call.
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


class EENetImageClassificationPipeline(BudgetedPipelineMixin, ImageClassificationPipeline):
    r"""
    [`ImageClassificationPipeline`] with an early-exit budget.

    Args:
        budget (`float` or [`BudgetTracker`], *optional*):
            Allowed average cost per image relative to the full model (EENet models only), given when the pipeline
            is built and/or per call (`classifier(images, budget=0.3)`); a call without one (or with `None`) keeps
            the pipeline's, and a pipeline built without one uses the model's `config.default_budget`. A
            [`BudgetTracker`] keeps the average over every call it serves at its budget.
        exit_policy ([`ExitPolicy`], *optional*):
            A policy to decide the exits instead of the model's stored one (EENet models only), as the model's
            `forward` takes it, at build time and/or per call.
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
