"""Registration of the EENet classes with the transformers Auto classes (idempotent)."""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForImageClassification, AutoModelForSequenceClassification

from . import hub
from .models import (
    EarlyExitMixin,
    EENetBertConfig,
    EENetBertForSequenceClassification,
    EENetResNetConfig,
    EENetResNetForImageClassification,
    EENetViTConfig,
    EENetViTForImageClassification,
)
from .pipelines import register_pipelines

__all__ = ["register"]

_registered = False


def register() -> None:
    """Register configs, models and budgeted pipelines with transformers; safe to call more than once."""
    global _registered
    if _registered:
        return
    AutoConfig.register(EENetBertConfig.model_type, EENetBertConfig, exist_ok=True)
    AutoModelForSequenceClassification.register(EENetBertConfig, EENetBertForSequenceClassification, exist_ok=True)
    AutoConfig.register(EENetViTConfig.model_type, EENetViTConfig, exist_ok=True)
    AutoModelForImageClassification.register(EENetViTConfig, EENetViTForImageClassification, exist_ok=True)
    AutoConfig.register(EENetResNetConfig.model_type, EENetResNetConfig, exist_ok=True)
    AutoModelForImageClassification.register(EENetResNetConfig, EENetResNetForImageClassification, exist_ok=True)
    register_pipelines()
    EarlyExitMixin.hub_integration = hub
    _registered = True
