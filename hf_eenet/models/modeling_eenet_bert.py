"""Multi-exit BERT for sequence classification: a thin adapter of BERT to the early-exit engine."""

from __future__ import annotations

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.bert.modeling_bert import BertModel, BertPreTrainedModel

from .budget_tracking import BudgetTracker
from .configuration_eenet import EENetBertConfig
from .early_exit import EarlyExitMixin, add_early_exit_forward_docstring
from .exit_policies import ExitPolicy
from .modeling_outputs import EarlyExitClassifierOutput

# imported so that a remote-code save ships the pipeline module its config names in `custom_pipelines`
from .pipeline_eenet import EENetTextClassificationPipeline  # noqa: F401

__all__ = ["EENetBertExitHead", "EENetBertForSequenceClassification"]


class EENetBertExitHead(nn.Module):
    """
    An early exit's head, shaped like BERT's own: pooler (dense + tanh), dropout, linear classifier. With
    `config.exit_head_pooling="attention"` it also holds the scorer of its attention pooling (`attention_scorer`: one
    logit per token).
    """

    def __init__(self, config: EENetBertConfig):
        super().__init__()
        if config.head_pooling == "attention":
            self.attention_scorer = nn.Linear(config.hidden_size, 1)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.activation(self.dense(pooled))))


class EENetBertForSequenceClassification(EarlyExitMixin, BertPreTrainedModel):
    r"""
    BERT with a classifier head after several encoder layers (`config.exit_layers`) that exits early, per sample,
    inside a batch.

    The backbone, pooler and classifier keep the names of [`BertForSequenceClassification`], so a stock BERT
    checkpoint (a pretrained `BertModel` or a fine-tuned `BertForSequenceClassification`) loads with only the early
    exits (and the exit policy) newly initialised. The last exit *is* the stock classifier.

    Example:

    ```python
    >>> import hf_eenet
    >>> from transformers import AutoModelForSequenceClassification, AutoTokenizer
    >>> model = AutoModelForSequenceClassification.from_pretrained("org/bert-eenet-sst2")
    >>> tokenizer = AutoTokenizer.from_pretrained("org/bert-eenet-sst2")
    >>> inputs = tokenizer(["a gorgeous, witty film", "dull"], padding=True, return_tensors="pt")
    >>> out = model(**inputs, budget=0.5)
    >>> out.logits, out.exit_index, out.exit_cost
    ```
    """

    config_class = EENetBertConfig
    state_names = ("hidden_states", "attention_mask")
    padding_mask_name = "attention_mask"  # right padding, trimmed after each compaction

    def __init__(self, config: EENetBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=True)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.exit_heads = nn.ModuleList(EENetBertExitHead(config) for _ in config.exit_layers[:-1])
        self._init_early_exit()
        self.post_init()

    # --- adapter --------------------------------------------------------------------------------------------------
    def embed_inputs(
        self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        hidden_states = self.bert.embeddings(
            input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids, inputs_embeds=inputs_embeds
        )
        batch_size, length = hidden_states.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch_size, length, dtype=torch.long, device=hidden_states.device)
        elif attention_mask.shape != (batch_size, length):
            raise ValueError(
                f"`attention_mask` must have shape {(batch_size, length)} like the inputs, got {tuple(attention_mask.shape)}."
            )
        return {"hidden_states": hidden_states, "attention_mask": attention_mask}

    def run_blocks(self, state, start, end):
        hidden_states = state["hidden_states"]
        if "attention_bias" not in state:  # built once per batch (as BertModel does), kept through compaction if 4-D
            bias = create_bidirectional_mask(
                config=self.config, inputs_embeds=hidden_states, attention_mask=state["attention_mask"]
            )
            state = {**state, "attention_bias": bias if bias is not None else hidden_states.new_empty(0)}
        bias = state["attention_bias"] if state["attention_bias"].numel() else None
        for layer in self.bert.encoder.layer[start:end]:
            hidden_states = layer(hidden_states, bias)
        return {**state, "hidden_states": hidden_states}

    def select_samples(self, state, index, length=None):
        kept = super().select_samples(state, index, length)
        bias = state.get("attention_bias")
        if torch.is_tensor(bias) and (bias.ndim == 4 or not bias.numel()):  # else `run_blocks` builds it again
            # the kept samples' attention mask `(batch, heads or 1, queries or 1, keys)`, trimmed like the sequence
            kept["attention_bias"] = bias[..., :length, :length].index_select(0, index) if bias.numel() else bias
        return kept

    def exit_features(self, state, exit_index):
        hidden_states = state["hidden_states"]
        is_head = exit_index < len(self.exit_heads)
        pooling = self.config.head_pooling if is_head else self.config.exit_pooling
        if pooling == "cls":
            return hidden_states[:, 0]
        mask = state["attention_mask"].unsqueeze(-1)
        if pooling == "attention":  # softmax over the non-padding tokens: independent of how the batch is padded
            scores = self.exit_heads[exit_index].attention_scorer(hidden_states).float()
            weights = scores.masked_fill(mask == 0, torch.finfo(scores.dtype).min).softmax(1)
            weights = weights.masked_fill(mask == 0, 0.0).to(hidden_states.dtype)  # an all-padding row pools to 0
            return (weights * hidden_states).sum(1)
        mask = mask.to(hidden_states.dtype)
        return (hidden_states * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def exit_logits(self, exit_index, features):
        if exit_index < len(self.exit_heads):
            return self.exit_heads[exit_index](features)
        pooler = self.bert.pooler
        return self.classifier(self.dropout(pooler.activation(pooler.dense(features))))

    # --- forward --------------------------------------------------------------------------------------------------
    @add_early_exit_forward_docstring(
        """
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds:
                As for [`BertForSequenceClassification`]. Padding must be on the right (BERT tokenizers' default)
                for padding trimming.
        """,
        unit="sample",
        features_receiver="exit head",
        extra="""
            output_attentions (`bool`, *optional*):
                Not supported, as `output_hidden_states`: `True` raises a `ValueError`.
        """,
    )
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        budget: float | BudgetTracker | None = None,
        exit_policy: ExitPolicy | None = None,
        output_all_exits: bool | None = None,
        output_exit_features: bool | None = None,
        return_dict: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> EarlyExitClassifierOutput | tuple:
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
            "position_ids": position_ids,
            "inputs_embeds": inputs_embeds,
        }
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
