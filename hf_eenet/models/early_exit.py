"""The early-exit engine shared by every EENet backbone.

A backbone plugs in through a thin adapter (the four `*_` methods of [`EarlyExitMixin`] that it implements):

- `embed_inputs(**inputs)`: model inputs -> a *state*, a dict of batch-first tensors (hidden states, masks, ...);
- `run_blocks(state, start, end)`: run backbone blocks `start..end-1` on the state;
- `exit_features(state, k)`: pool the state for exit `k`'s head;
- `exit_logits(k, features)`: exit `k`'s head;
- `select_samples(state, index, length)` (optional): keep only some samples (the default indexes every state tensor
  and, for text backbones, trims padding to the longest survivor; an override may also carry per-batch caches).

The engine owns everything else: the three forward modes, the policy calls, batch compaction, cost accounting, the
multi-exit loss, latency calibration and the output.
"""

from __future__ import annotations

import json
import logging as logging_module
import statistics
import textwrap
import time
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from transformers.utils import logging

from .budget_tracking import BudgetTracker, is_budget_tracker
from .configuration_eenet import strictly_increasing, validate_budget
from .exit_cost_model import ExitCostModel
from .exit_policies import BUDGET_TOLERANCE, ExitPolicy, exit_policy_from_config
from .modeling_outputs import EarlyExitClassifierOutput

__all__ = ["EarlyExitMixin", "add_early_exit_forward_docstring", "multi_exit_loss"]

logger = logging.get_logger(__name__)

State = dict[str, torch.Tensor]


def multi_exit_loss(all_exit_logits: torch.Tensor, labels: torch.Tensor, weights) -> torch.Tensor:
    """
    `sum_k w_k CE(logits_k, labels) / sum_k w_k`.

    Args:
        all_exit_logits (`torch.FloatTensor` of shape `(batch, num_exits, num_labels)`)
        labels (`torch.LongTensor` of shape `(batch,)`)
        weights (`Sequence[float]`): one weight per exit.
    """
    batch, num_exits, num_labels = all_exit_logits.shape
    per_exit = F.cross_entropy(
        all_exit_logits.reshape(batch * num_exits, num_labels).float(),
        labels.long().repeat_interleave(num_exits),  # int32 / int16 class indices too
        reduction="none",
    ).view(batch, num_exits)
    weights = torch.as_tensor(weights, dtype=per_exit.dtype, device=per_exit.device)
    return (per_exit.mean(0) * weights).sum() / weights.sum()


def _select_rows(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """
    `tensor[index]` along the batch axis, in the tensor's memory format: a channels-last feature map stays channels-last
    (`index_select` would return it contiguous, and every later convolution would convert it back and run slower).
    """
    if tensor.ndim == 4 and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last):
        return tensor[index]
    return tensor.index_select(0, index)


def _median_segment_times(cumulative_times: list[list[float]], full: float) -> list[float]:
    """Median time of each segment (exit 0's path, then the blocks and head between consecutive exits) over repeats."""
    num_exits = len(cumulative_times[0])
    return [
        statistics.median(times[k] - (times[k - 1] if k else 0.0) for times in cumulative_times) / full
        for k in range(num_exits)
    ]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# The config fields that decide which exit tensors a model has (changing one at load drops or adds tensors on purpose).
EXIT_DESCRIPTION_KEYS = ("exit_layers", "exit_layer_unit", "exit_pooling", "exit_head_pooling", "exit_policy")
# `from_pretrained` arguments that say where a saved config is read from.
HUB_LOADING_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


class _StockCheckpointWarningFilter(logging_module.Filter):
    """Drops transformers' model-type mismatch warning for the stock type an EENet config converts, and that alone."""

    def __init__(self, stock_type: str, eenet_type: str):
        super().__init__()
        self.message = f"type `{stock_type}` to instantiate a model of type `{eenet_type}`"

    def filter(self, record: logging_module.LogRecord) -> bool:
        return self.message not in record.getMessage()


@contextmanager
def _quiet_stock_checkpoint_loading(config_class):
    """
    Loading a stock checkpoint of the backbone (e.g. `bert`) into its EENet class is intended: silence transformers'
    warning that the checkpoint's model type differs (other mismatches still warn).
    """
    stock_type = next(
        (
            getattr(klass, "model_type", "")
            for klass in config_class.__mro__[1:]
            if getattr(klass, "model_type", "") not in ("", config_class.model_type)
        ),
        None,
    )
    if stock_type is None:
        yield
        return
    logger_ = logging_module.getLogger("transformers.configuration_utils")
    log_filter = _StockCheckpointWarningFilter(stock_type, config_class.model_type)
    logger_.addFilter(log_filter)
    try:
        yield
    finally:
        logger_.removeFilter(log_filter)


def hub_loading_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The `from_pretrained` arguments among `kwargs` that say where a saved config is read from."""
    return {key: kwargs[key] for key in HUB_LOADING_KWARGS if key in kwargs}


def add_early_exit_forward_docstring(inputs: str, *, unit: str, features_receiver: str, extra: str = ""):
    r"""
    Give a backbone's `forward` its docstring: the `Args:` entries of the backbone's own inputs, then those of the
    arguments every early-exit model shares, then `extra` (more backbone-specific ones).

    Args:
        inputs (`str`): `Args:` entries of the backbone's inputs, in any common indentation.
        unit (`str`): what one sample is called in the docs ("sample", "image").
        features_receiver (`str`): the part of an exit that receives the pooled features ("exit head", ...).
        extra (`str`, *optional*): further `Args:` entries, like `inputs`.
    """
    shared = f"""
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class indices. Every exit is computed and the multi-exit loss is returned.
        budget (`float` or [`BudgetTracker`], *optional*):
            Allowed average cost per {unit} relative to the full model. `None` uses `config.default_budget`
            (and the full model when that is `None`), or runs a stored policy that decides its own cost (patience,
            static), which takes no budget; `>= 1.0` runs the plain full model; below 1.0 the fitted exit policy
            decides, using its nearest fitted budget not above `budget`. Budgets below the cheapest
            exit, or on a model without a fitted policy, raise a `ValueError`. A [`BudgetTracker`] keeps the
            average cost per {unit} at its budget over the calls it is passed to.
        exit_policy (`ExitPolicy`, *optional*):
            A policy to use for this call instead of the stored one (e.g. a `ForcedExitPolicy`).
        output_all_exits (`bool`, *optional*):
            Compute every exit for every {unit} and return `all_exit_logits`.
        output_exit_features (`bool`, *optional*):
            Compute every exit for every {unit} (as `output_all_exits`) and also return the pooled features each
            {features_receiver} received.
        return_dict (`bool`, *optional*):
            Return an [`EarlyExitClassifierOutput`] (default) or a tuple.
        output_hidden_states (`bool`, *optional*):
            Not supported: EENet models return each {unit}'s logits, exit and cost, so `True` raises a `ValueError`
            (run the backbone module itself for its hidden states).
    """
    entries = "".join(
        textwrap.indent(textwrap.dedent(part).strip("\n") + "\n", " " * 12) for part in (inputs, shared, extra) if part
    )

    def decorate(forward):
        forward.__doc__ = "\n        Args:\n" + entries + " " * 8
        return forward

    return decorate


class EarlyExitMixin:
    r"""
    Mixed into a `PreTrainedModel` whose config is an [`EENetConfigMixin`]; provides `early_exit_forward`, policy
    storage (`set_exit_policy`) and `calibrate_exit_costs`. The model's `forward` validates its own inputs and calls
    `early_exit_forward`.
    """

    accepts_loss_kwargs = False  # the multi-exit loss is a mean: Trainer must not rescale it
    # Model-card and Hub support (`hf_eenet.model_card`), installed by `import hf_eenet`. The model code alone (e.g. as
    # Hub remote code) runs without it and then saves and uploads like any transformers model.
    hub_integration: ClassVar[Any] = None

    # --- adapter interface (implemented by each backbone) ---------------------------------------------------------
    def embed_inputs(self, **inputs) -> State:
        raise NotImplementedError

    def run_blocks(self, state: State, start: int, end: int) -> State:
        raise NotImplementedError

    def exit_features(self, state: State, exit_index: int) -> torch.Tensor:
        raise NotImplementedError

    def exit_logits(self, exit_index: int, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # The tensors of the state between blocks (what `run_blocks` returns, and what the ONNX segments exchange); other
    # entries a backbone may add (per-batch caches) are dropped by the default `select_samples` (an override may keep
    # them, as BERT keeps its attention mask).
    state_names: ClassVar[tuple[str, ...]] = ("hidden_states",)
    # A right-padding mask among `state_names`: after compaction every state tensor's axis 1 (the sequence) is trimmed
    # to the longest kept sample.
    padding_mask_name: ClassVar[str | None] = None

    def select_samples(self, state: State, index: torch.Tensor, length: int | None = None) -> State:
        """
        Keep the samples at `index` (a `torch.LongTensor`); with `length` (a backbone with a padding mask), also trim
        every state tensor's axis 1 to that many positions (the longest kept sample, computed by the engine).
        """
        kept = {name: _select_rows(state[name], index) for name in self.state_names}
        if length is None:
            return kept
        return {name: value[:, :length] for name, value in kept.items()}

    def exit_head_parameters(self):
        """Parameters of the early-exit heads (`exit_heads`); the last exit is the backbone's own head."""
        return self.exit_heads.parameters()

    # --- exit policy ----------------------------------------------------------------------------------------------
    def _init_early_exit(self) -> None:
        """
        Check that the config describes a single-label classifier (the loss, exits and policies are softmax ones) and
        build the exit policy described by `config.exit_policy` (its tensors are then filled from the weights).
        Called at the end of each backbone's `__init__`, when the config holds any override given at load.
        """
        problem_type = getattr(self.config, "problem_type", None)
        if self.config.num_labels < 2 or problem_type not in (None, "single_label_classification"):
            raise ValueError(
                "EENet models are single-label classifiers (softmax exits, cross-entropy loss, confidence-based exit "
                "decisions), so they need `num_labels` >= 2 and `problem_type` 'single_label_classification' (or "
                f"unset); got num_labels={self.config.num_labels}, problem_type={problem_type!r}. To train a "
                "classifier on the backbone of a regression or multi-label checkpoint, load it with `num_labels=N`, "
                "`problem_type='single_label_classification'` and `ignore_mismatched_sizes=True`."
            )
        self.exit_policy = exit_policy_from_config(self.config.exit_policy) if self.config.exit_policy else None
        if self.exit_policy is not None and self.exit_policy.num_exits != self.config.num_exits:
            raise ValueError(
                f"`config.exit_policy` describes a policy for {self.exit_policy.num_exits} exits but the model has "
                f"{self.config.num_exits} (`exit_layers` {self.config.exit_layers})."
            )

    def sync_exit_policy_config(self) -> None:
        """
        Describe the stored policy in `config.exit_policy` as it is now (a policy refitted after `set_exit_policy`
        has new budgets); `save_pretrained` and the ONNX export call it.
        """
        if self.exit_policy is not None:
            self.config.exit_policy = self.exit_policy.get_config()

    def set_exit_policy(self, policy: ExitPolicy | None) -> None:
        """
        Store a fitted exit policy in the model: its tensors join the weights and its description joins
        `config.exit_policy`, so `save_pretrained` / `from_pretrained` keep it. `None` removes the policy. The model
        card's record of what an earlier fit chose per budget is cleared (`ExitSchedulerTrainer` records the new one).
        """
        if policy is not None:
            if not isinstance(policy, ExitPolicy):
                raise TypeError(f"`policy` must be an ExitPolicy, got {type(policy).__name__}.")
            if not policy.persistable or not policy.is_fitted:
                raise ValueError(f"Only a fitted, persistable policy can be stored in a model; got {policy!r}.")
            if policy.num_exits != self.config.num_exits:
                raise ValueError(f"The policy has {policy.num_exits} exits but the model has {self.config.num_exits}.")
            num_labels = policy.hyperparameters().get("num_labels")
            if num_labels is not None and num_labels != self.config.num_labels:
                raise ValueError(
                    f"The policy was fitted on exits with {num_labels} classes but the model has "
                    f"{self.config.num_labels}."
                )
            policy = policy.to(self.device)
        self.exit_policy = policy
        self.config.exit_policy = policy.get_config() if policy is not None else None
        card = getattr(self, "model_card_data", None)
        if card is not None:
            card.policy_choices = {}

    # --- saving, loading, uploading (with the model card) ----------------------------------------------------------
    def save_pretrained(
        self,
        save_directory,
        *args,
        write_model_card: bool = True,
        overwrite_model_card: bool = False,
        remote_code: bool | None = None,
        **kwargs,
    ):
        """
        `PreTrainedModel.save_pretrained`, plus (with `hf_eenet` installed) the model card (`README.md`, its data and
        plot; an existing README that hf_eenet did not generate is kept unless `overwrite_model_card=True`) and the
        model code with `auto_map` / `custom_pipelines` for `trust_remote_code=True` users: with `remote_code=True`,
        or by default (`None`) when the model was loaded from a save that shipped it, as transformers does for custom
        models; `remote_code=False` saves the config without them. `push_to_hub=True` uploads the files this save
        wrote, card and code included (see `hf_eenet.model_card.save_pretrained` for the arguments).
        """
        self.sync_exit_policy_config()
        if self.hub_integration is None:
            if remote_code is not None:
                raise ValueError("`remote_code` needs the hf_eenet package (it ships or removes its model code).")
            return super().save_pretrained(save_directory, *args, **kwargs)
        return self.hub_integration.save_pretrained(
            self,
            super().save_pretrained,
            save_directory,
            *args,
            model_card=write_model_card,
            overwrite_model_card=overwrite_model_card,
            remote_code=remote_code,
            **kwargs,
        )

    def push_to_hub(self, repo_id: str, *args, **kwargs):
        """
        Upload config, weights (with the exit policy), the generated model card and, if it ships (`remote_code`), the
        model code. An existing README on the Hub is kept unless `overwrite_model_card=True`. See
        `hf_eenet.model_card.push_to_hub` for the arguments.
        """
        if self.hub_integration is None:
            return super().push_to_hub(repo_id, *args, **kwargs)
        return self.hub_integration.push_to_hub(self, repo_id, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """
        `PreTrainedModel.from_pretrained`, plus the model card data saved with the model (if any). A config and
        weights of different saves are an error where the exits would silently change: a fitted exit policy whose
        tensors the weights lack (it would run freshly initialised), or exit tensors the config does not describe
        (they would be dropped); exits changed at load on purpose (`exit_*` overrides, or a `config=` that describes
        other exits than the saved one) are not, and then each early exit gets the trained head of its own layer where
        the saved model had one (the weights would load by position).
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        with _quiet_stock_checkpoint_loading(cls.config_class):
            model, loading_info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
            )
        saved = model._saved_config_dict(pretrained_model_name_or_path, kwargs)
        if saved is not None and model._exits_as_saved(saved):
            model._check_exits_loaded(pretrained_model_name_or_path, loading_info)
        elif saved is not None:
            model._load_exit_heads_by_layer(saved, pretrained_model_name_or_path, kwargs)
        if cls.hub_integration is not None and pretrained_model_name_or_path is not None:
            cls.hub_integration.load_card_data(model, pretrained_model_name_or_path, **kwargs)
        return (model, loading_info) if output_loading_info else model

    def _saved_config_dict(self, source, kwargs: dict) -> dict | None:
        """The config dict saved at `source` (`None` for a model loaded from a state dict alone)."""
        if source is None:
            return None
        return self.config_class.get_config_dict(source, **hub_loading_kwargs(kwargs))[0]

    def _exits_as_saved(self, saved: dict) -> bool:
        """
        Whether the model's exits are those its saved config describes (every exit field the saved config has holds
        the same value), as when loading through the `Auto` classes or `pipeline`; not when exits were changed at load.
        """
        return all(saved[key] == getattr(self.config, key, None) for key in EXIT_DESCRIPTION_KEYS if key in saved)

    def _load_exit_heads_by_layer(self, saved: dict, source, kwargs: dict) -> None:
        """
        Exits changed at load (e.g. `from_pretrained(path, exit_layers=[2, 3])` of a model saved with `[1, 2, 3]`): the
        weights load by position, so an early exit would get the head trained for another layer. Give each early exit
        the saved head of its own layer where the saved model had one (and the same head layout), and a freshly
        initialised head elsewhere.
        """
        saved_layers = saved.get("exit_layers")
        same_unit = saved.get("exit_layer_unit") == getattr(self.config, "exit_layer_unit", None)
        if not saved_layers or not same_unit or len(saved_layers) < 2:
            return  # a stock checkpoint (no trained exit heads), or exits counted in other units
        saved_index = {layer: j for j, layer in enumerate(saved_layers[:-1])}
        layers = self.config.exit_layers[:-1]
        if all(saved_index.get(layer) == i for i, layer in enumerate(layers)):
            return  # every early exit is where it was saved
        trained = self._saved_exit_head_states(source, kwargs)
        for i, layer in enumerate(layers):
            head, state = self.exit_heads[i], None
            if layer in saved_index:
                state = trained.get(saved_index[layer], {})
                if {key: value.shape for key, value in state.items()} != {
                    key: value.shape for key, value in head.state_dict().items()
                }:
                    state = None  # the head is laid out otherwise now (e.g. another pooling)
            if state is not None:
                head.load_state_dict(state)
            else:
                for tensor in head.state_dict(keep_vars=True).values():
                    tensor._is_hf_initialized = False  # loaded tensors are marked as initialised, and kept as they are
                head.apply(self._init_weights)
                logger.info(f"Exit {i} (after {layer} {self.config.exit_layer_units_name}) has a new head.")

    def _saved_exit_head_states(self, source, kwargs: dict) -> dict[int, dict[str, torch.Tensor]]:
        """
        The state of each exit head saved at `source`, by saved exit index: read from its safetensors files alone
        (one file or shards; only the shards that hold exit heads), else (other formats) from the saved model loaded
        again.
        """
        from safetensors import safe_open
        from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file

        variant = kwargs.get("variant")  # `save_pretrained(..., variant="v1")` writes model.v1.safetensors

        def with_variant(name: str) -> str:  # as transformers names a variant's files
            stem, extension = name.rsplit(".", 1)
            return f"{stem}.{variant}.{extension}" if variant else name

        where = {**hub_loading_kwargs(kwargs), "_raise_exceptions_for_missing_entries": False}
        files = [cached_file(source, with_variant(SAFE_WEIGHTS_NAME), **where)]
        if files[0] is None:
            index = cached_file(source, with_variant(SAFE_WEIGHTS_INDEX_NAME), **where)
            if index is None:
                again = {**hub_loading_kwargs(kwargs), **({"variant": variant} if variant else {})}
                heads = type(self).from_pretrained(source, **again).exit_heads
                return {j: head.state_dict() for j, head in enumerate(heads)}
            with open(index) as handle:
                weight_map = json.load(handle)["weight_map"]
            shards = sorted({shard for key, shard in weight_map.items() if key.startswith("exit_heads.")})
            files = [cached_file(source, shard, **where) for shard in shards]
        states: dict[int, dict[str, torch.Tensor]] = {}
        for file in files:
            with safe_open(file, framework="pt") as tensors:
                for key in tensors.keys():
                    if key.startswith("exit_heads."):
                        _, index, name = key.split(".", 2)
                        states.setdefault(int(index), {})[name] = tensors.get_tensor(key)
        return states

    def _check_exits_loaded(self, source, loading_info: dict) -> None:
        """Raise if the weights loaded from `source` hold exit tensors the config lacks, or lack the policy's."""
        unexpected = sorted(
            key for key in loading_info.get("unexpected_keys", ()) if key.startswith(("exit_heads.", "exit_policy."))
        )
        if unexpected:
            raise ValueError(
                f"The weights of {str(source)!r} have exit tensors its config does not describe ({len(unexpected)} "
                f"unexpected, e.g. {unexpected[0]!r}): the config was edited (e.g. an exit option removed) or comes "
                "from another save. Save the model again with `save_pretrained`."
            )
        missing = sorted(key for key in loading_info.get("missing_keys", ()) if key.startswith("exit_policy."))
        if missing:
            raise ValueError(
                f"The config of {str(source)!r} describes a fitted {self.exit_policy.policy_type!r} exit policy, but "
                f"its weights have no tensors for it ({len(missing)} missing, e.g. {missing[0]!r}): the config and the "
                "weights come from different saves. Save the model again with `save_pretrained`, or drop "
                "`exit_policy` from the config to load it without a scheduler."
            )

    # --- forward --------------------------------------------------------------------------------------------------
    def early_exit_forward(
        self,
        inputs: Mapping[str, torch.Tensor | None],
        *,
        labels: torch.Tensor | None = None,
        budget: float | BudgetTracker | None = None,
        exit_policy: ExitPolicy | None = None,
        output_all_exits: bool | None = None,
        output_exit_features: bool | None = None,
        return_dict: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> EarlyExitClassifierOutput | tuple:
        """Run the model in the mode its arguments ask for (see the backbone's `forward`)."""
        for flag, asked in (("output_hidden_states", output_hidden_states), ("output_attentions", output_attentions)):
            if asked or getattr(self.config, flag, False):
                where, fix = (
                    (f"`{flag}=True` was passed", "drop it")
                    if asked
                    else (f"`config.{flag}` is True", "set it to False")
                )
                raise ValueError(
                    f"{where}, but EENet models return each sample's logits, exit and cost, not the backbone's "
                    f"{flag.removeprefix('output_').replace('_', ' ')}: {fix} (run the backbone module itself for them)."
                )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if labels is not None or self.training or output_all_exits or output_exit_features:
            if budget is not None or exit_policy is not None:
                reason = "`labels` are given" if labels is not None else "all exits are computed"
                raise ValueError(
                    f"A budget or exit policy cannot be used when {reason} (training, evaluation with labels, "
                    "`output_all_exits=True` or `output_exit_features=True`): every exit runs on every sample. Call "
                    "the model without labels, after `model.eval()`, to exit early."
                )
            output = self._all_exits_forward(inputs, labels, output_exit_features=bool(output_exit_features))
        else:
            tracker = budget if is_budget_tracker(budget) else None
            if tracker is not None:
                budget = tracker.choose(self._servable_budgets(tracker, exit_policy), self._input_batch_size(inputs))
            try:
                policy, budget_index = self._resolve_policy(budget, exit_policy)
                if policy is None:
                    output = self._full_forward(inputs)
                else:
                    output = self._budgeted_forward(inputs, policy, budget_index)
            except BaseException:
                if tracker is not None:
                    tracker.cancel()  # nothing was served
                raise
            if tracker is not None:
                tracker.record(output.exit_cost)
        return output if return_dict else output.to_tuple()

    def _servable_budgets(self, tracker: BudgetTracker, exit_policy: ExitPolicy | None) -> list[float]:
        """What a `BudgetTracker` can choose from: the policy's fitted budgets this model can meet, and the full model."""
        policy, _ = self._resolve_policy(tracker.budget, exit_policy)  # the target itself must be servable
        if policy is None:
            return [1.0]
        cheapest = self.config.exit_costs[0] - BUDGET_TOLERANCE
        return [budget for budget in policy.budgets if cheapest <= budget < 1.0] + [1.0]

    @staticmethod
    def _input_batch_size(inputs: Mapping[str, Any]) -> int:
        return next((len(value) for value in inputs.values() if value is not None), 0)  # tensors, arrays or lists

    def _resolve_policy(self, budget, exit_policy: ExitPolicy | None) -> tuple[ExitPolicy | None, int | None]:
        """Validate the budget and pick the policy and its fitted budget; `(None, None)` means the full model."""
        explicit = budget is not None
        stored_decides_cost = (
            exit_policy is None and self.exit_policy is not None and not self.exit_policy.requires_budget
        )
        if budget is None and not stored_decides_cost:  # such a policy takes no budget, `default_budget` neither
            budget = self.config.default_budget
        if budget is not None:
            budget = validate_budget(budget)
        num_exits, costs = self.config.num_exits, self.config.exit_costs
        if exit_policy is not None:
            if not isinstance(exit_policy, ExitPolicy):
                raise TypeError(
                    f"`exit_policy` must be an ExitPolicy (e.g. a fitted one from "
                    f"`hf_eenet.evaluation.load_policies(model_dir)`), got {type(exit_policy).__name__}."
                )
            if exit_policy.num_exits > num_exits or (exit_policy.persistable and exit_policy.num_exits != num_exits):
                raise ValueError(f"The exit policy has {exit_policy.num_exits} exits but the model has {num_exits}.")
            if exit_policy.device not in (None, self.device):
                exit_policy.to(self.device)  # as `set_exit_policy` does: the policy decides where the model runs
            if not exit_policy.requires_budget:
                if explicit:
                    raise ValueError(
                        f"The {exit_policy.policy_type} exit policy decides every sample's exit itself and takes no "
                        f"budget, got budget={budget}: pass either `exit_policy` or `budget`."
                    )
                return exit_policy, None
            if budget is None:
                raise ValueError(f"The {exit_policy.policy_type} exit policy needs a `budget`.")
        stored = self.exit_policy if exit_policy is None else None
        if budget is None and stored is not None and not stored.requires_budget:
            return stored, None  # a stored policy that decides its own cost (e.g. patience) runs without a budget
        if budget is None or budget >= 1.0:
            return None, None
        policy = exit_policy if exit_policy is not None else self.exit_policy
        if budget < costs[0] - BUDGET_TOLERANCE:
            smallest = f"{costs[0]:.4f}"
            if policy is not None and policy.requires_budget and policy.is_fitted:
                meetable = [fitted for fitted in policy.budgets if fitted >= costs[0] - BUDGET_TOLERANCE]
                smallest = f"{meetable[0]:g} (the smallest fitted budget at or above it)" if meetable else "none"
            raise ValueError(
                f"budget {budget} is below the cost of the cheapest exit ({costs[0]:.4f} of the full model); the "
                f"smallest budget this model can meet is {smallest}."
            )
        if policy is None:
            raise ValueError(
                f"budget {budget} needs a fitted exit policy, but this model has none. Fit one with "
                "`ExitSchedulerTrainer` (or `model.set_exit_policy(policy.fit(...))`), or use budget=1.0 for the "
                "full model."
            )
        return policy, policy.budget_index(budget)

    def _check_batch(self, state: State) -> int:
        batch_size = next(iter(state.values())).shape[0]
        if batch_size == 0:
            raise ValueError("The batch is empty: pass at least one sample.")
        return batch_size

    def exit_cost_model(self) -> ExitCostModel:
        """
        The [`~hf_eenet.models.exit_cost_model.ExitCostModel`] of `config` (per-sample exit costs and fixed segment
        costs), kept between calls and rebuilt when the config's costs change.
        """
        key = (
            tuple(self.config.exit_costs),
            tuple(self.config.exit_segment_costs or ()),
            self.config.exit_cost_batch_size,
        )
        cached = getattr(self, "_exit_cost_model_cache", None)
        if cached is None or cached[0] != key:
            cached = self._exit_cost_model_cache = (key, ExitCostModel.from_config(self.config))
        return cached[1]

    def _all_exits_forward(self, inputs, labels, *, output_exit_features: bool) -> EarlyExitClassifierOutput:
        state = self.embed_inputs(**inputs)
        batch_size = self._check_batch(state)
        if labels is not None:
            self._check_labels(labels, batch_size)
        all_logits, all_features, start = [], [], 0
        for k, end in enumerate(self.config.exit_layers):
            state = self.run_blocks(state, start, end)
            start = end
            features = self.exit_features(state, k)
            all_logits.append(self.exit_logits(k, features))
            all_features.append(features)
        all_exit_logits = torch.stack(all_logits, dim=1)
        loss = None
        if labels is not None:
            loss = multi_exit_loss(all_exit_logits, labels.to(all_exit_logits.device), self.config.exit_loss_weights)
        exit_index = torch.full(
            (batch_size,), self.config.num_exits - 1, dtype=torch.long, device=all_exit_logits.device
        )
        return EarlyExitClassifierOutput(
            loss=loss,
            logits=all_logits[-1],
            exit_index=exit_index,
            exit_cost=self.exit_cost_model().per_sample_of_batch(exit_index),
            all_exit_logits=all_exit_logits,
            all_exit_features=tuple(all_features) if output_exit_features else None,
        )

    def _check_labels(self, labels: torch.Tensor, batch_size: int) -> None:
        if labels.shape != (batch_size,):
            raise ValueError(
                f"`labels` must have shape ({batch_size},) (one class index per sample), got {tuple(labels.shape)}."
            )
        if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(
                f"`labels` must be integer class indices (single-label classification), got {labels.dtype}."
            )
        num_labels = self.config.num_labels
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_labels):
            raise ValueError(
                f"`labels` must lie in [0, {num_labels - 1}] for a model with {num_labels} labels, got values in "
                f"[{int(labels.min())}, {int(labels.max())}]."
            )

    def _full_forward(self, inputs) -> EarlyExitClassifierOutput:
        """The plain backbone: every block, then the backbone's own head; no exit head runs (cost 1.0)."""
        state = self.embed_inputs(**inputs)
        batch_size = self._check_batch(state)
        last = self.config.num_exits - 1
        state = self.run_blocks(state, 0, self.config.exit_layers[-1])
        logits = self.exit_logits(last, self.exit_features(state, last))
        return EarlyExitClassifierOutput(
            logits=logits,
            exit_index=torch.full((batch_size,), last, dtype=torch.long, device=logits.device),
            exit_cost=torch.ones(batch_size, device=logits.device),
        )

    def _budgeted_forward(self, inputs, policy: ExitPolicy, budget_index: int | None) -> EarlyExitClassifierOutput:
        """Block by block; after each exit the policy picks who leaves and the batch is compacted to the rest."""
        state = self.embed_inputs(**inputs)
        batch_size = self._check_batch(state)
        device = next(iter(state.values())).device
        last = self.config.num_exits - 1
        policy_state = policy.initial_state(batch_size, device)
        active = torch.arange(batch_size, device=device)  # original positions of the samples still running
        exit_index = torch.full((batch_size,), last, dtype=torch.long, device=device)
        logits_out, start = None, 0
        for k, end in enumerate(self.config.exit_layers):
            state = self.run_blocks(state, start, end)
            start = end
            features = self.exit_features(state, k)
            logits = self.exit_logits(k, features)
            if logits_out is None:
                logits_out = logits.new_empty((batch_size, logits.shape[-1]))
            # (`index_copy_`/`index_fill_`: no host scalar is copied to the device, unlike `exit_index[active] = k`)
            logits_out.index_copy_(0, active, logits.to(logits_out.dtype))
            exit_index.index_fill_(0, active, k)
            if k == last:
                break
            with torch.autocast(device.type, enabled=False):  # the policy computes as it was fitted, in float32
                leave, policy_state = policy.decide(k, logits, features, policy_state, budget_index)
            # Every running sample recorded this exit above; those that stay overwrite it at a later exit. Then a
            # single device-to-host copy per exit: how many stay and, with padding, the longest of them.
            stay = ~leave
            counts = [stay.sum()]
            if self.padding_mask_name is not None:
                mask = state[self.padding_mask_name]
                counts.append(torch.where(stay, mask.sum(1, dtype=torch.long), 0).amax())
                if k == 0:  # trimming keeps the first positions: a 1 after a 0 (left padding) would be cut off
                    counts.append((mask[:, 1:] > mask[:, :-1]).any().long())
            num_staying, *padding = torch.stack(counts).tolist()  # [longest survivor, left padding seen at exit 0]
            longest = padding[0] if padding else None
            if any(padding[1:]):
                raise ValueError(
                    f"`{self.padding_mask_name}` has padding on the left in some rows (a 0 before a 1), but the "
                    "early-exit forward trims padding on the right: tokenize with right padding "
                    '(`tokenizer.padding_side = "right"`, the default of BERT tokenizers).'
                )
            if num_staying == 0:
                break
            if num_staying == active.numel():
                continue
            staying = torch.argsort(leave.to(torch.uint8), stable=True)[:num_staying]  # the staying, in order
            active = active[staying]
            # with padding, trim it to the longest survivor
            state = self.select_samples(state, staying, None if longest is None else max(longest, 1))
            policy_state = {name: value.index_select(0, staying) for name, value in policy_state.items()}
        return EarlyExitClassifierOutput(
            logits=logits_out,
            exit_index=exit_index,
            exit_cost=self.exit_cost_model().per_sample_of_batch(exit_index),
        )

    # --- latency calibration --------------------------------------------------------------------------------------
    @torch.no_grad()
    def calibrate_exit_costs(
        self,
        example_inputs: Mapping[str, torch.Tensor],
        num_repeats: int = 20,
        num_warmup: int = 3,
        segment_costs: bool = False,
    ) -> list[float]:
        """
        Measure the exit costs on the current device and store them in the config (`exit_cost_source="latency"`).

        The plain full forward and a pass through every exit are timed alternately on `example_inputs` (a batch
        shaped like deployment traffic); exit `k`'s cost is the median time to reach its logits divided by the median
        time of the full forward.

        With `segment_costs=True`, the pass through every exit is also timed on the batch's first sample alone, and
        each segment's time is split into a fixed part and a part per sample (the line through its times on 1 and on
        `B` samples, `B` the batch size): the fixed parts become `config.exit_segment_costs` (priced for batches of
        `B`, `config.exit_cost_batch_size = B`) and the exit costs keep the per-sample parts only (see
        [`~hf_eenet.models.exit_cost_model.ExitCostModel`]). On a uniform batch of `B` both descriptions cost the
        same; on the early-exit path, where a few survivors run a segment, only this one prices what they cost.

        Args:
            example_inputs (`Mapping[str, torch.Tensor]`): model inputs, e.g. a tokenizer's output.
            num_repeats (`int`, *optional*, defaults to 20): timed repetitions.
            num_warmup (`int`, *optional*, defaults to 3): untimed repetitions first.
            segment_costs (`bool`, *optional*, defaults to `False`): also measure the fixed cost of each segment
                (needs a batch of at least 2 samples); otherwise `config.exit_segment_costs` is cleared.

        Returns:
            `list[float]`: the new `config.exit_costs`.
        """
        if num_repeats < 1 or num_warmup < 0:
            raise ValueError(f"`num_repeats` must be >= 1 and `num_warmup` >= 0, got {num_repeats}, {num_warmup}.")
        was_training = self.training
        self.eval()
        inputs = {
            name: value.to(self.device) if torch.is_tensor(value) else value for name, value in example_inputs.items()
        }
        batch_size = self._input_batch_size(inputs)
        if segment_costs and batch_size < 2:
            raise ValueError(
                f"Measuring segment costs needs a batch of at least 2 samples (it compares one sample with the batch), "
                f"got {batch_size}."
            )
        single = {name: value[:1] if torch.is_tensor(value) else value for name, value in inputs.items()}
        full_times, exit_times, single_times = [], [], []
        try:
            for repeat in range(num_warmup + num_repeats):
                full_time = self._time_full_forward(inputs)
                cumulative = self._time_exits(inputs)
                single_cumulative = self._time_exits(single) if segment_costs else None
                if repeat >= num_warmup:
                    full_times.append(full_time)
                    exit_times.append(cumulative)
                    if segment_costs:
                        single_times.append(single_cumulative)
        finally:
            self.train(was_training)
        full = statistics.median(full_times)
        num_exits = self.config.num_exits
        cumulative = [statistics.median(times[k] for times in exit_times) / full for k in range(num_exits)]
        fixed = None
        if segment_costs:
            segment = _median_segment_times(exit_times, full)
            single_segment = _median_segment_times(single_times, full)
            # the line through (1, single) and (B, batch): fixed = (B * single - batch) / (B - 1), within [0, batch]
            fixed = [
                min(max((batch_size * one - many) / (batch_size - 1), 0.0), many)
                for one, many in zip(single_segment[1:], segment[1:])
            ]
            cumulative = [cost - sum(fixed[:k]) for k, cost in enumerate(cumulative)]
        # medians of cumulative times can tie: keep the costs strictly increasing
        costs = strictly_increasing(cumulative)
        if self.exit_policy is not None:
            logger.warning(
                "Exit costs changed after the exit policy was fitted; refit the policy so its budgets match the new "
                "costs."
            )
        self.config.set_exit_costs(
            costs, source="latency", segment_costs=fixed, batch_size=batch_size if segment_costs else None
        )
        return costs

    def _time_full_forward(self, inputs) -> float:
        device = self.device
        _synchronize(device)
        start = time.perf_counter()
        self._full_forward(inputs)
        _synchronize(device)
        return time.perf_counter() - start

    def _time_exits(self, inputs) -> list[float]:
        device = self.device
        _synchronize(device)
        begin = time.perf_counter()
        state = self.embed_inputs(**inputs)
        times, start = [], 0
        for k, end in enumerate(self.config.exit_layers):
            state = self.run_blocks(state, start, end)
            start = end
            self.exit_logits(k, self.exit_features(state, k))
            _synchronize(device)
            times.append(time.perf_counter() - begin)
        return times
