"""Model code of hf_eenet: only torch/transformers imports, so this folder can also ship as Hub remote code."""

from .budget_tracking import BudgetTracker
from .configuration_eenet import (
    EENET_CONFIG_FORMAT,
    EENET_VERSION,
    EENetBertConfig,
    EENetConfigMixin,
    EENetResNetConfig,
    EENetViTConfig,
)
from .early_exit import EarlyExitMixin, multi_exit_loss
from .exit_cost_model import ExitCostModel
from .exit_policies import (
    EXIT_POLICY_CLASSES,
    ConfidenceThresholdPolicy,
    EENetPaperPolicy,
    EENetPolicy,
    ExitPolicy,
    ForcedExitPolicy,
    PatiencePolicy,
    StaticExitPolicy,
    default_budget_grid,
    exit_policy_from_config,
    register_exit_policy,
)
from .modeling_eenet_bert import EENetBertForSequenceClassification
from .modeling_eenet_resnet import EENetResNetForImageClassification
from .modeling_eenet_vit import EENetViTForImageClassification
from .modeling_outputs import EarlyExitClassifierOutput

__all__ = [
    "BudgetTracker",
    "EENET_CONFIG_FORMAT",
    "EENET_VERSION",
    "EXIT_POLICY_CLASSES",
    "ConfidenceThresholdPolicy",
    "EENetPaperPolicy",
    "EENetPolicy",
    "PatiencePolicy",
    "StaticExitPolicy",
    "EENetBertConfig",
    "EENetBertForSequenceClassification",
    "EENetConfigMixin",
    "EENetResNetConfig",
    "EENetResNetForImageClassification",
    "EENetViTConfig",
    "EENetViTForImageClassification",
    "EarlyExitClassifierOutput",
    "EarlyExitMixin",
    "ExitCostModel",
    "ExitPolicy",
    "ForcedExitPolicy",
    "default_budget_grid",
    "exit_policy_from_config",
    "multi_exit_loss",
    "register_exit_policy",
]
