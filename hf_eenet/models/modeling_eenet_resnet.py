"""Multi-exit ResNet for image classification: a thin adapter of ResNet to the early-exit engine."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.resnet.modeling_resnet import ResNetConvLayer, ResNetModel, ResNetPreTrainedModel

from .budget_tracking import BudgetTracker
from .configuration_eenet import EENetResNetConfig
from .early_exit import EarlyExitMixin, add_early_exit_forward_docstring
from .exit_policies import ExitPolicy
from .modeling_outputs import EarlyExitClassifierOutput

# imported so that a remote-code save ships the pipeline module its config names in `custom_pipelines`
from .pipeline_eenet import EENetImageClassificationPipeline  # noqa: F401

__all__ = ["EENetResNetExitHead", "EENetResNetForImageClassification"]


class EENetResNetExitHead(nn.Module):
    """
    An early exit's head, sized for its stage's feature map: a 3x3 convolution (stride 2 on large maps) with batch
    norm and the backbone's activation, a global average pool (the exit's features), then a linear classifier.
    """

    def __init__(self, in_channels: int, channels: int, stride: int, config: EENetResNetConfig):
        super().__init__()
        self.convolution = nn.Conv2d(in_channels, channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.normalization = nn.BatchNorm2d(channels)
        self.activation = ACT2FN[config.hidden_act]
        self.pooler = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(channels, config.num_labels)

    def features(self, hidden_state: torch.Tensor) -> torch.Tensor:
        hidden_state = self.activation(self.normalization(self.convolution(hidden_state)))
        return self.pooler(hidden_state).flatten(1)


class EENetResNetForImageClassification(EarlyExitMixin, ResNetPreTrainedModel):
    r"""
    ResNet with a classifier after several stages (`config.exit_layers` counts stages, or residual blocks with
    `config.exit_layer_unit="block"`) that exits early, per image, inside a batch.

    The backbone and classifier keep the names of [`ResNetForImageClassification`] (`resnet`, and `classifier` =
    flatten + linear), so a stock ResNet checkpoint (a pretrained `ResNetModel` or a fine-tuned
    `ResNetForImageClassification`, e.g. `microsoft/resnet-50`) loads with only the early exits (and the exit policy)
    newly initialised. The last exit *is* the stock head: the global average pool and the classifier. Each earlier
    exit has an [`EENetResNetExitHead`] sized for its stage (see [`EENetResNetConfig`]).

    An exit's features (`output_exit_features`, and what exit policies see) are the globally pooled feature vector
    that its linear classifier receives, of shape `(batch_size, channels_k)`. The heads' batch norms use their running
    statistics in eval mode, so an image's prediction never depends on the rest of its batch.

    In the channels-last layout (`model.to(memory_format=torch.channels_last)`, usually the faster one for
    convolutions) the images are taken channels-last too, and the early-exit forward keeps every stage's input
    channels-last through the batch compaction.

    Example:

    ```python
    >>> import hf_eenet
    >>> from transformers import AutoImageProcessor, AutoModelForImageClassification
    >>> model = AutoModelForImageClassification.from_pretrained("org/resnet-eenet-cifar10")
    >>> processor = AutoImageProcessor.from_pretrained("org/resnet-eenet-cifar10")
    >>> out = model(**processor(images, return_tensors="pt"), budget=0.5)
    >>> out.logits, out.exit_index, out.exit_cost
    ```
    """

    config_class = EENetResNetConfig

    def __init__(self, config: EENetResNetConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.resnet = ResNetModel(config)
        if (config.stem_kernel_size, config.stem_stride, config.stem_pooling) != (7, 2, True):
            embeddings = self.resnet.embedder  # a non-stock stem (e.g. CIFAR's 3x3, stride 1, no pooling)
            embeddings.embedder = ResNetConvLayer(
                config.num_channels,
                config.embedding_size,
                kernel_size=config.stem_kernel_size,
                stride=config.stem_stride,
                activation=config.hidden_act,
            )
            if not config.stem_pooling:
                embeddings.pooler = nn.Identity()
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(config.hidden_sizes[-1], config.num_labels))
        self.exit_heads = nn.ModuleList(
            EENetResNetExitHead(in_channels, channels, stride, config)
            for in_channels, channels, stride in zip(
                config.exit_input_channels(), config.exit_head_channels(), config.exit_head_strides
            )
        )
        stages = self.resnet.encoder.stages
        # a plain tuple (not registered again as submodules), built once for `run_blocks`
        self._exit_units = (
            tuple(stages)
            if config.exit_layer_unit == "stage"
            else tuple(layer for stage in stages for layer in stage.layers)
        )
        self._init_early_exit()
        self.post_init()

    # --- adapter --------------------------------------------------------------------------------------------------
    def embed_inputs(self, pixel_values=None):
        if pixel_values is None:
            raise ValueError("`pixel_values` are required.")
        if pixel_values.ndim != 4:
            raise ValueError(
                "`pixel_values` must have shape (batch_size, num_channels, height, width), got "
                f"{tuple(pixel_values.shape)}."
            )
        if pixel_values.shape[0] == 0:
            raise ValueError("The batch is empty: pass at least one image.")
        if self.resnet.embedder.embedder.convolution.weight.is_contiguous(memory_format=torch.channels_last):
            # a model moved to channels-last (`model.to(memory_format=torch.channels_last)`) takes its images in that
            # layout too: the stem convolution would otherwise convert them on every call, and run slower
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        return {"hidden_states": self.resnet.embedder(pixel_values)}

    def exit_units(self) -> tuple[nn.Module, ...]:
        """The modules `config.exit_layers` counts: the stages, or (`exit_layer_unit="block"`) their residual blocks."""
        return self._exit_units

    def run_blocks(self, state, start, end):
        hidden_state = state["hidden_states"]
        for unit in self.exit_units()[start:end]:
            hidden_state = unit(hidden_state)
        return {"hidden_states": hidden_state}

    def exit_features(self, state, exit_index):
        hidden_state = state["hidden_states"]
        if exit_index < len(self.exit_heads):
            return self.exit_heads[exit_index].features(hidden_state)
        return self.resnet.pooler(hidden_state).flatten(1)

    def exit_logits(self, exit_index, features):
        if exit_index < len(self.exit_heads):
            return self.exit_heads[exit_index].classifier(features)
        return self.classifier(features)

    # --- forward --------------------------------------------------------------------------------------------------
    @add_early_exit_forward_docstring(
        """
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Images, as the model's image processor returns them.
        """,
        unit="image",
        features_receiver="exit's classifier",
    )
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        budget: float | BudgetTracker | None = None,
        exit_policy: ExitPolicy | None = None,
        output_all_exits: bool | None = None,
        output_exit_features: bool | None = None,
        return_dict: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> EarlyExitClassifierOutput | tuple:
        return self.early_exit_forward(
            {"pixel_values": pixel_values},
            labels=labels,
            budget=budget,
            exit_policy=exit_policy,
            output_all_exits=output_all_exits,
            output_exit_features=output_exit_features,
            return_dict=return_dict,
            output_hidden_states=output_hidden_states,
        )
