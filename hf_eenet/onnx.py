"""ONNX export of EENet models and an onnxruntime early-exit runtime with the same decisions.

[`export_onnx`] writes, for any EENet backbone, one ONNX graph per backbone segment (the blocks between two exits; the
first also embeds the inputs), one per exit (pooling and head: `logits` and `features`) and one per early exit for the
fitted policy's decision, all with dynamic batch (and sequence) axes, plus the model's `config.json` and a manifest
(`eenet_onnx.json`: inputs, state tensors, exits and costs, budget grid, thresholds, labels, opset, versions). It uses
`torch.onnx.export` directly (optimum's exporter does not support transformers 5) and what every backbone adapter
already declares (`embed_inputs`, `run_blocks`, `exit_features`, `exit_logits`, `state_names`, `padding_mask_name`),
so no backbone needs export code of its own.

[`EENetONNXModel`] loads such a directory into onnxruntime sessions and is itself an adapter of the one early-exit
engine (`EarlyExitMixin`): the segments, exits and policy run as ONNX graphs while batch compaction, padding trimming,
budget resolution and outputs are the engine's own code, so it takes the same call (`model(**inputs, budget=0.5)`),
returns the same [`EarlyExitClassifierOutput`] and works in the budgeted pipelines.

```python
>>> from hf_eenet.onnx import EENetONNXModel, export_onnx
>>> export_onnx(model, "onnx/")
>>> onnx_model = EENetONNXModel.from_pretrained("onnx/")
>>> onnx_model(**tokenizer(texts, padding=True, return_tensors="pt"), budget=0.5).exit_index
```
"""

from __future__ import annotations

import json
import math
import threading
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig

from .models.budget_tracking import BudgetTracker
from .models.configuration_eenet import EENET_VERSION
from .models.early_exit import EarlyExitMixin
from .models.exit_policies import ExitPolicy
from .models.modeling_outputs import EarlyExitClassifierOutput
from .remote_code import config_without_remote_code

__all__ = ["MANIFEST_FILE", "ONNX_FORMAT_VERSION", "EENetONNXModel", "ONNXExitPolicy", "export_onnx"]

MANIFEST_FILE = "eenet_onnx.json"
ONNX_FORMAT_VERSION = 1
DEFAULT_OPSET = 17

# Model inputs that may be left out of a call, and the value they are then filled with (shaped like the first input).
_OPTIONAL_INPUT_FILL = {"attention_mask": 1, "token_type_ids": 0}


# --- export ----------------------------------------------------------------------------------------------------------
class _SegmentGraph(nn.Module):
    """Segment `k`: the blocks up to exit `k` (the first segment also embeds the inputs)."""

    def __init__(self, model, index: int, input_names: Sequence[str]):
        super().__init__()
        self.model, self.index, self.input_names = model, index, list(input_names)
        bounds = [0, *model.config.exit_layers]
        self.start, self.end = bounds[index], bounds[index + 1]

    def forward(self, *tensors):
        if self.index == 0:
            state = self.model.embed_inputs(**dict(zip(self.input_names, tensors)))
        else:
            state = dict(zip(self.model.state_names, tensors))
        state = self.model.run_blocks(state, self.start, self.end)
        return tuple(state[name] for name in self.model.state_names)


class _ExitGraph(nn.Module):
    """Exit `k`: the pooled features its head receives and its logits."""

    def __init__(self, model, index: int):
        super().__init__()
        self.model, self.index = model, index

    def forward(self, *state_tensors):
        features = self.model.exit_features(dict(zip(self.model.state_names, state_tensors)), self.index)
        return self.model.exit_logits(self.index, features), features


class _PolicyGraph(nn.Module):
    """The policy's decision at early exit `k`: who leaves, and the updated per-sample state."""

    def __init__(self, policy: ExitPolicy, index: int, state_names: Sequence[str]):
        super().__init__()
        self.policy, self.index, self.state_names = policy, index, list(state_names)

    def forward(self, logits, features, budget_index, *state_tensors):
        state = dict(zip(self.state_names, state_tensors))
        budget = budget_index if self.policy.requires_budget else None
        leave, state = self.policy.decide(self.index, logits, features, state, budget)
        return (leave, *(state[name] for name in self.state_names))


def _export(module: nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_axes, opset: int) -> None:
    with warnings.catch_warnings():
        # shape checks and mask-building branches read traced sizes as constants; they are the same for every input
        # (the example is right-padded so the masking path is the one traced)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # the text backbones' attention masks index with position ranges (`arange`), never negative indices, which is
        # all this warning is about (the export tests check the graphs' outputs against torch)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator of advanced indexing")
        _export_graph(module, args, path, input_names, output_names, dynamic_axes, opset)


def _export_graph(module, args, path, input_names, output_names, dynamic_axes, opset) -> None:
    torch.onnx.export(
        module,
        args,
        str(path),
        input_names=list(input_names),
        output_names=list(output_names),
        dynamic_axes=dynamic_axes,
        opset_version=opset,
        dynamo=False,
        do_constant_folding=True,
    )


def _batch_axes(names: Sequence[str], tensors: Sequence[torch.Tensor], sequence: set[str]) -> dict:
    axes = {}
    for name, tensor in zip(names, tensors):
        axes[name] = {0: "batch"}
        if name in sequence and tensor.ndim > 1:
            axes[name][1] = "sequence"
    return axes


def _example_inputs(model) -> dict[str, torch.Tensor]:
    """Two samples, the second right-padded (so masking paths are traced), in the model's input format."""
    config = model.config
    if model.main_input_name == "input_ids":
        length = 8
        input_ids = torch.randint(1, config.vocab_size, (2, length))
        attention_mask = torch.ones(2, length, dtype=torch.long)
        attention_mask[1, length // 2 :] = 0
        return {
            "input_ids": input_ids * attention_mask,
            "attention_mask": attention_mask,
            "token_type_ids": torch.zeros(2, length, dtype=torch.long),
        }
    size = getattr(config, "image_size", None) or getattr(config, "exit_cost_reference_size", 32)
    return {"pixel_values": torch.randn(2, config.num_channels, size, size)}


@torch.no_grad()
def export_onnx(
    model,
    directory: str | Path,
    example_inputs: Mapping[str, torch.Tensor] | None = None,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """
    Export an EENet model (any backbone) as ONNX segments, exits and policy decisions for [`EENetONNXModel`].

    Args:
        model: an EENet model (e.g. [`EENetBertForSequenceClassification`]); exported in eval mode, on the CPU, in
            float32.
        directory (`str` or `Path`): where the graphs, `config.json` and the manifest are written (created).
        example_inputs (`Mapping[str, torch.Tensor]`, *optional*): inputs to trace with (e.g. tokenizer output with
            padding). They name the graphs' inputs. Defaults to two random samples, one of them right-padded.
        opset (`int`, *optional*, defaults to 17): ONNX opset.

    Returns:
        `Path`: the directory.

    The manifest is written last and an earlier export's manifest is removed first, so an export that fails leaves
    no directory [`EENetONNXModel`] would load (not a mix of two exports' graphs).
    """
    if not isinstance(model, EarlyExitMixin) or not hasattr(model, "config"):
        raise TypeError(f"export_onnx needs an EENet model, got {type(model).__name__}.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST_FILE).unlink(missing_ok=True)
    model.sync_exit_policy_config()
    was_training, device, dtype = model.training, model.device, model.dtype
    model.eval().to("cpu", torch.float32)
    try:
        inputs = dict(example_inputs) if example_inputs is not None else _example_inputs(model)
        inputs = {name: torch.as_tensor(value).cpu() for name, value in inputs.items() if value is not None}
        if not inputs:
            raise ValueError("`example_inputs` holds no tensors.")
        with torch.no_grad():
            manifest = _export_graphs(model, directory, inputs, opset)
    finally:
        model.to(device, dtype).train(was_training)
    config_without_remote_code(model.config).save_pretrained(directory)  # the export ships no model code
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return directory


def _export_graphs(model, directory: Path, inputs: dict[str, torch.Tensor], opset: int) -> dict:
    config = model.config
    state_names = list(model.state_names)
    sequence_names = set(state_names) if model.padding_mask_name is not None else set()
    input_names = list(inputs)
    text_inputs = set(input_names) if model.main_input_name == "input_ids" else set()
    segments, exits, policy_graphs = [], [], []
    state = tuple(inputs.values())
    for k in range(config.num_exits):
        names_in = input_names if k == 0 else state_names
        file = f"segment_{k}.onnx"
        segment = _SegmentGraph(model, k, input_names).eval()  # a new module trains: export restores its mode
        outputs = segment(*state)
        axes = _batch_axes(names_in, state, text_inputs if k == 0 else sequence_names)
        out_names = [f"{name}_out" for name in state_names]  # apart from the inputs (a mask may pass through)
        axes.update(_batch_axes(out_names, outputs, {f"{name}_out" for name in sequence_names}))
        _export(segment, state, directory / file, names_in, out_names, axes, opset)
        segments.append({"file": file, "inputs": list(names_in), "outputs": out_names})
        state = outputs
        file = f"exit_{k}.onnx"
        exit_graph = _ExitGraph(model, k).eval()
        logits, features = exit_graph(*state)
        axes = _batch_axes(state_names, state, sequence_names)
        axes.update({"logits": {0: "batch"}, "features": {0: "batch"}})
        _export(exit_graph, state, directory / file, state_names, ["logits", "features"], axes, opset)
        exits.append({"file": file, "inputs": state_names, "outputs": ["logits", "features"]})
        if k < config.num_exits - 1 and model.exit_policy is not None:
            policy_graphs.append(_export_policy(model.exit_policy, k, logits, features, directory, opset))
    policy = model.exit_policy
    policy_manifest = None
    if policy is not None:
        initial = policy.initial_state(1, torch.device("cpu"))
        policy_manifest = {
            "config": dict(config.exit_policy),
            "requires_budget": policy.requires_budget,
            "budgets": list(policy.budgets),
            "thresholds": policy.thresholds.tolist() if hasattr(policy, "thresholds") else None,
            "state": {
                name: {"dtype": str(value.dtype).removeprefix("torch."), "row": value[0].tolist()}
                for name, value in initial.items()
            },
            "graphs": policy_graphs,
        }
    return {
        "format_version": ONNX_FORMAT_VERSION,
        "hf_eenet_version": EENET_VERSION,
        "torch_version": torch.__version__.split("+")[0],
        "opset": opset,
        "model_type": config.model_type,
        "inputs": input_names,
        "optional_inputs": {name: fill for name, fill in _OPTIONAL_INPUT_FILL.items() if name in input_names},
        "input_dtypes": {name: str(value.dtype).removeprefix("torch.") for name, value in inputs.items()},
        "state_names": state_names,
        "padding_mask_name": model.padding_mask_name,
        "exit_layers": list(config.exit_layers),
        "exit_costs": list(config.exit_costs),
        "exit_segment_costs": config.exit_segment_costs,
        "exit_cost_batch_size": config.exit_cost_batch_size,
        "label_names": [config.id2label[i] for i in range(config.num_labels)],
        "segments": segments,
        "exits": exits,
        "policy": policy_manifest,
    }


def _export_policy(policy: ExitPolicy, k: int, logits, features, directory: Path, opset: int) -> dict:
    state = policy.initial_state(logits.shape[0], torch.device("cpu"))
    state_names = list(state)
    graph = _PolicyGraph(policy, k, state_names).eval()
    budget_index = torch.tensor(0, dtype=torch.long)
    args = (logits, features, budget_index, *state.values())
    names_in = ["logits", "features", "budget_index", *state_names]
    names_out = ["leave", *(f"{name}_out" for name in state_names)]
    axes = {name: {0: "batch"} for name in names_in if name != "budget_index"}
    axes.update({name: {0: "batch"} for name in names_out})
    file = f"policy_{k}.onnx"
    _export(graph, args, directory / file, names_in, names_out, axes, opset)
    return {"file": file, "inputs": names_in, "outputs": names_out}


# --- runtime ---------------------------------------------------------------------------------------------------------
class _Sessions:
    """onnxruntime sessions of an exported directory, run on torch CPU tensors (shared memory with numpy)."""

    def __init__(self, directory: Path, providers: Sequence[str] | None, session_options):
        import onnxruntime

        self.onnxruntime = onnxruntime
        self.directory = directory
        self.providers = list(providers) if providers is not None else ["CPUExecutionProvider"]
        self.session_options = session_options

    def _options(self, heavy: bool):
        """
        Every session has its own thread pool; a dozen pools spinning for work would fight each other (and torch)
        for the cores. By default the backbone segments get the torch thread count and the small exit and policy
        graphs one thread, none of them spinning. Given `session_options` are used as they are.
        """
        if self.session_options is not None:
            return self.session_options
        options = self.onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads() if heavy else 1
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return options

    def load(self, entry: Mapping, heavy: bool = False) -> tuple:
        path = self.directory / entry["file"]
        if not path.is_file():
            raise FileNotFoundError(f"The ONNX graph {str(path)!r} named in the manifest is missing.")
        session = self.onnxruntime.InferenceSession(
            str(path), sess_options=self._options(heavy), providers=self.providers
        )
        declared = {i.name for i in session.get_inputs()}  # the exporter drops inputs a graph does not use
        return session, [name for name in entry["inputs"] if name in declared], list(entry["outputs"])

    @staticmethod
    def run(graph: tuple, values: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        session, input_names, output_names = graph
        feed = {name: values[name].detach().cpu().contiguous().numpy() for name in input_names}
        return [torch.from_numpy(array) for array in session.run(output_names, feed)]


class ONNXExitPolicy(ExitPolicy):
    r"""
    The exported decision graphs of a fitted exit policy, behind the [`ExitPolicy`] interface so the early-exit engine
    runs it like the torch policy (budget grid, `budget_index`, per-sample state compacted with the batch).
    """

    policy_type = "onnx"
    persistable = True

    def __init__(self, num_exits: int, manifest: Mapping, sessions: _Sessions):
        super().__init__(num_exits, manifest["budgets"] or None)
        self.requires_budget = bool(manifest["requires_budget"])
        self.source_policy_type = manifest["config"]["policy_type"]
        self.state_spec = manifest["state"]
        graphs = manifest["graphs"]
        if len(graphs) != num_exits - 1:
            raise ValueError(f"The manifest lists {len(graphs)} policy graphs for {num_exits - 1} early exits.")
        self.graphs = [sessions.load(entry) for entry in graphs]

    @property
    def is_fitted(self) -> bool:
        return not self.requires_budget or len(self.budgets) > 0

    def initial_state(self, batch_size, device):
        return {
            name: torch.tensor(spec["row"], dtype=getattr(torch, spec["dtype"])).expand(
                batch_size, *np.shape(spec["row"])
            )
            for name, spec in self.state_spec.items()
        }

    def decide(self, exit_index, logits, features, state, budget_index):
        values = {"logits": logits, "features": features, **state}
        values["budget_index"] = torch.tensor(0 if budget_index is None else budget_index, dtype=torch.long)
        leave, *updated = _Sessions.run(self.graphs[exit_index], values)
        return leave, dict(zip(self.state_spec, updated))


class EENetONNXModel(EarlyExitMixin):
    r"""
    An exported EENet model on onnxruntime, with the torch model's call: `model(**inputs, budget=0.5)` returns an
    [`EarlyExitClassifierOutput`] (logits of the exit each sample took, `exit_index`, `exit_cost`; all exits with
    `output_all_exits=True`). The segments, exits and policy decisions are ONNX graphs; batch compaction, padding
    trimming and budget handling are the shared early-exit engine's. Usable in the budgeted pipelines
    (`pipeline("text-classification", model=onnx_model, tokenizer=tokenizer, budget=0.5)`).

    Args:
        directory (`str` or `Path`): a directory written by [`export_onnx`].
        providers (`Sequence[str]`, *optional*): onnxruntime execution providers (default: CPU).
        session_options (`onnxruntime.SessionOptions`, *optional*): options of every session. By default the
            segments use `torch.get_num_threads()` intra-op threads and the exit and policy graphs one, without
            spinning (a pool per session: spinning pools would compete for the cores).
    """

    def __init__(self, directory: str | Path, providers: Sequence[str] | None = None, session_options=None):
        directory = Path(directory)
        manifest = read_manifest(directory)
        self.manifest = manifest
        self.config = AutoConfig.from_pretrained(directory)
        self.name_or_path = str(directory)
        self.training = False
        self.state_names = tuple(manifest["state_names"])
        self.padding_mask_name = manifest["padding_mask_name"]
        self.main_input_name = manifest["inputs"][0]
        config_costs = [self.config.exit_costs, self.config.exit_segment_costs, self.config.exit_cost_batch_size]
        manifest_costs = [
            manifest["exit_costs"],
            manifest.get("exit_segment_costs"),
            manifest.get("exit_cost_batch_size"),
        ]
        if config_costs != manifest_costs:
            raise ValueError(
                f"config.json and {MANIFEST_FILE} in {str(directory)!r} disagree on the exit costs "
                f"({config_costs} vs {manifest_costs}): export the model again."
            )
        sessions = _Sessions(directory, providers, session_options)
        self.segments = [sessions.load(entry, heavy=True) for entry in manifest["segments"]]
        self.exits = [sessions.load(entry) for entry in manifest["exits"]]
        num_exits = self.config.num_exits
        if len(self.segments) != num_exits or len(self.exits) != num_exits:
            raise ValueError(
                f"The manifest lists {len(self.segments)} segments and {len(self.exits)} exits for a model with "
                f"{num_exits} exits."
            )
        policy = manifest["policy"]
        self.exit_policy = ONNXExitPolicy(num_exits, policy, sessions) if policy is not None else None
        self._segment_bounds = [0, *self.config.exit_layers]
        self._pending = threading.local()  # per thread: (exit, logits) from `exit_features` for `exit_logits`

    @classmethod
    def from_pretrained(cls, directory: str | Path, **kwargs) -> EENetONNXModel:
        """Load a directory written by [`export_onnx`] (the arguments of the constructor)."""
        return cls(directory, **kwargs)

    # --- what pipelines and users expect of a model ------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # inputs and outputs live on the host; the providers place the work

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def to(self, *args, **kwargs) -> EENetONNXModel:
        return self

    def eval(self) -> EENetONNXModel:
        return self

    def train(self, mode: bool = True) -> EENetONNXModel:
        """Inference only: `train(False)` (as `calibrate_exit_costs` and `cache_exit_outputs` call it) does nothing."""
        if mode:
            raise ValueError("An EENetONNXModel runs inference only; it cannot be put in training mode.")
        return self

    def can_generate(self) -> bool:
        return False

    def save_pretrained(self, *args, **kwargs):
        raise NotImplementedError("An EENetONNXModel is saved by `export_onnx`; copy its directory to move it.")

    def push_to_hub(self, *args, **kwargs):
        raise NotImplementedError(
            "Upload the directory written by `export_onnx` with `huggingface_hub.upload_folder`."
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name_or_path!r}, exits={self.config.num_exits})"

    def __call__(self, **inputs) -> EarlyExitClassifierOutput | tuple:
        return self.forward(**inputs)

    def forward(
        self,
        budget: float | BudgetTracker | None = None,
        exit_policy: ExitPolicy | None = None,
        output_all_exits: bool | None = None,
        output_exit_features: bool | None = None,
        return_dict: bool | None = None,
        labels: torch.Tensor | None = None,
        **inputs,
    ) -> EarlyExitClassifierOutput | tuple:
        """
        The torch model's call: model inputs by name (torch tensors on any device, numpy arrays or lists; the outputs
        are on the CPU), `budget` (a float or a
        [`BudgetTracker`]), `exit_policy` (a torch policy of the same model, e.g. a baseline), `output_all_exits`,
        `output_exit_features` (the exit graphs' pooled features), `return_dict` and `labels` (then every exit runs
        and the multi-exit loss is returned).
        """
        if isinstance(exit_policy, ExitPolicy) and not isinstance(exit_policy, ONNXExitPolicy):
            exit_policy = exit_policy.to("cpu")
        if labels is not None:
            labels = torch.as_tensor(labels, device="cpu")
        return self.early_exit_forward(
            inputs,
            labels=labels,
            budget=budget,
            exit_policy=exit_policy,
            output_all_exits=output_all_exits,
            output_exit_features=output_exit_features,
            return_dict=return_dict,
        )

    # --- adapter ----------------------------------------------------------------------------------------------------
    def embed_inputs(self, **inputs):
        expected, optional = self.manifest["inputs"], self.manifest["optional_inputs"]
        given = {name: value for name, value in inputs.items() if value is not None}
        unknown = sorted(set(given) - set(expected))
        if unknown:
            raise ValueError(f"Unknown inputs {unknown}; the exported model takes {expected}.")
        missing = [name for name in expected if name not in given and name not in optional]
        if missing:
            raise ValueError(f"Missing inputs {missing}; the exported model takes {expected}.")
        dtypes = self.manifest["input_dtypes"]
        # on the host, wherever the caller's tensors are (a pipeline on a GPU machine moves them to the GPU)
        state = {
            name: torch.as_tensor(value, dtype=getattr(torch, dtypes[name]), device="cpu")
            for name, value in given.items()
        }
        reference = state[next(name for name in expected if name in state)]
        for name in expected:
            if name not in state:
                state[name] = torch.full(reference.shape[:2], optional[name], dtype=getattr(torch, dtypes[name]))
        return state

    def run_blocks(self, state, start, end):
        for k, graph in enumerate(self.segments):
            if start <= self._segment_bounds[k] and self._segment_bounds[k + 1] <= end:
                state = dict(zip(self.state_names, _Sessions.run(graph, state)))
        return state

    def exit_features(self, state, exit_index):
        logits, features = _Sessions.run(self.exits[exit_index], state)
        self._pending.logits = (exit_index, logits)
        return features

    def exit_logits(self, exit_index, features):
        pending, self._pending.logits = getattr(self._pending, "logits", None), None
        if pending is None or pending[0] != exit_index:
            raise RuntimeError("`exit_logits` must follow `exit_features` of the same exit.")
        return pending[1]

    def exit_head_parameters(self):
        return iter(())


def read_manifest(directory: str | Path) -> dict:
    """Read and check the manifest of an exported directory; clear errors for missing files and bad manifests."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise FileNotFoundError(f"No exported EENet model at {str(directory)!r} (not a directory).")
    if not path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} holds no {MANIFEST_FILE}; write it with `export_onnx`.")
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{str(directory)!r} holds no config.json; write the directory with `export_onnx`.")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{str(path)!r} is not valid JSON: {error}") from error
    required = {
        "format_version", "inputs", "optional_inputs", "input_dtypes", "state_names", "padding_mask_name",
        "exit_costs", "segments", "exits", "policy",
    }  # fmt: skip
    if not isinstance(manifest, dict) or required - set(manifest):
        missing = sorted(required - set(manifest)) if isinstance(manifest, dict) else sorted(required)
        raise ValueError(f"{str(path)!r} is not an hf_eenet ONNX manifest: it lacks {missing}.")
    version = manifest["format_version"]
    if not isinstance(version, int) or version > ONNX_FORMAT_VERSION or version < 1:
        raise ValueError(
            f"{str(path)!r} has ONNX format version {version!r}; this hf_eenet ({EENET_VERSION}) reads versions "
            f"1..{ONNX_FORMAT_VERSION}. Upgrade hf_eenet or export the model again."
        )
    costs = manifest["exit_costs"]
    if not costs or any(not (isinstance(c, (int, float)) and math.isfinite(c) and c > 0) for c in costs):
        raise ValueError(f"{str(path)!r} has invalid exit costs {costs!r}.")
    return manifest
