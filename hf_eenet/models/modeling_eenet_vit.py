"""Multi-exit ViT for image classification: a thin adapter of ViT to the early-exit engine."""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.vit.modeling_vit import ViTModel, ViTPreTrainedModel

from .budget_tracking import BudgetTracker
from .configuration_eenet import EENetViTConfig
from .early_exit import EarlyExitMixin, add_early_exit_forward_docstring
from .exit_policies import ExitPolicy
from .modeling_outputs import EarlyExitClassifierOutput

# imported so that a remote-code save ships the pipeline module its config names in `custom_pipelines`
from .pipeline_eenet import EENetImageClassificationPipeline  # noqa: F401

__all__ = ["EENetViTExitHead", "EENetViTForImageClassification"]


class EENetViTExitHead(nn.Module):
    """An early exit's head, shaped like ViT's own: a layer norm on the pooled token state, then a linear classifier."""

    def __init__(self, config: EENetViTConfig):
        super().__init__()
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)


class EENetViTForImageClassification(EarlyExitMixin, ViTPreTrainedModel):
    r"""
    ViT with a classifier after several transformer layers (`config.exit_layers`) that exits early, per image, inside
    a batch.

    The backbone and classifier keep the names of [`ViTForImageClassification`] (`vit`, without pooling layer, and
    `classifier`), so a stock ViT checkpoint (a pretrained `ViTModel` or a fine-tuned `ViTForImageClassification`)
    loads with only the early exits (and the exit policy) newly initialised. The last exit *is* the stock head: the
    backbone's final layer norm and the classifier on the CLS token (with `exit_pooling="cls"`). Each earlier exit has
    its own layer norm and linear classifier.

    An exit's features (`output_exit_features`, and what exit policies see) are the normalised pooled token state that
    its linear classifier receives, of shape `(batch_size, hidden_size)`.

    Example:

    ```python
    >>> import hf_eenet
    >>> from transformers import AutoImageProcessor, AutoModelForImageClassification
    >>> model = AutoModelForImageClassification.from_pretrained("org/vit-eenet-cifar10")
    >>> processor = AutoImageProcessor.from_pretrained("org/vit-eenet-cifar10")
    >>> out = model(**processor(images, return_tensors="pt"), budget=0.5)
    >>> out.logits, out.exit_index, out.exit_cost
    ```
    """

    config_class = EENetViTConfig

    def __init__(self, config: EENetViTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vit = ViTModel(config, add_pooling_layer=False)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.exit_heads = nn.ModuleList(EENetViTExitHead(config) for _ in config.exit_layers[:-1])
        self._init_early_exit()
        self.post_init()

    # --- adapter --------------------------------------------------------------------------------------------------
    def embed_inputs(self, pixel_values=None, interpolate_pos_encoding=None):
        if pixel_values is None:
            raise ValueError("`pixel_values` are required.")
        if pixel_values.ndim != 4:
            raise ValueError(
                "`pixel_values` must have shape (batch_size, num_channels, height, width), got "
                f"{tuple(pixel_values.shape)}."
            )
        if pixel_values.shape[0] == 0:
            raise ValueError("The batch is empty: pass at least one image.")
        embeddings = self.vit.embeddings
        pixel_values = pixel_values.to(embeddings.patch_embeddings.projection.weight.dtype)
        hidden_states = embeddings(pixel_values, interpolate_pos_encoding=bool(interpolate_pos_encoding))
        return {"hidden_states": hidden_states}

    def run_blocks(self, state, start, end):
        hidden_states = state["hidden_states"]
        for layer in self.vit.layers[start:end]:
            hidden_states = layer(hidden_states, None)  # every image has every patch: no attention mask
        return {"hidden_states": hidden_states}

    def exit_features(self, state, exit_index):
        hidden_states = state["hidden_states"]
        pooled = hidden_states[:, 0] if self.config.exit_pooling == "cls" else hidden_states[:, 1:].mean(1)
        if exit_index < len(self.exit_heads):
            return self.exit_heads[exit_index].layernorm(pooled)
        return self.vit.layernorm(pooled)  # per-token norm: the same as normalising every token, then pooling CLS

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
        extra="""
            interpolate_pos_encoding (`bool`, *optional*):
                Interpolate the position embeddings to the images' resolution, as in [`ViTModel`]. The FLOPs-based
                exit costs stay those of `config.image_size`.
            output_attentions (`bool`, *optional*):
                Not supported, as `output_hidden_states`: `True` raises a `ValueError`.
        """,
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
        interpolate_pos_encoding: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> EarlyExitClassifierOutput | tuple:
        inputs = {"pixel_values": pixel_values, "interpolate_pos_encoding": interpolate_pos_encoding}
        return self.early_exit_forward(
            inputs,
            labels=labels,
            budget=budget,
            exit_policy=exit_policy,
            output_all_exits=output_all_exits,
            output_exit_features=output_exit_features,
            return_dict=return_dict,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
