"""Budget sweeps of exit policies: simulated tables from cached exit outputs, measured tables from real early-exit
forwards, and accuracy-vs-cost plots.

Every row says how its numbers were obtained:

- `"simulated"`: accuracy and cost computed from cached exit logits (what papers report): a sample's cost is
  `config.exit_costs` of the exit its policy picks (plus, with `config.exit_segment_costs`, the expected fixed cost
  of the segments a random batch runs, see [`~hf_eenet.models.exit_cost_model.ExitCostModel`]);
- `"measured"`: the real early-exit forward of a model (`model(**batch, budget=b)` in eval mode), timed on the wall
  clock; cost is the realized average `exit_cost` of the outputs.

Typical use:

```python
>>> from hf_eenet import default_budget_grid
>>> from hf_eenet.evaluation import (
...     cache_exit_outputs, fit_policies, format_budget_table, simulated_budget_table, standard_policies
... )
>>> cached = cache_exit_outputs(model, calibration_batches)
>>> costs = model.exit_cost_model()
>>> policies = fit_policies(standard_policies(model.config.num_exits), **cached, exit_costs=costs,
...                         budgets=default_budget_grid(costs))
>>> test = cache_exit_outputs(model, test_batches)
>>> rows = simulated_budget_table(policies, **test, exit_costs=costs)
>>> print(format_budget_table(rows))
```
"""

from __future__ import annotations

import json
import math
import numbers
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .models.budget_tracking import BudgetTracker
from .models.configuration_eenet import strictly_increasing
from .models.exit_cost_model import ExitCostModel
from .models.exit_policies import (
    ConfidenceThresholdPolicy,
    EENetPaperPolicy,
    EENetPolicy,
    ExitPolicy,
    PatiencePolicy,
    StaticExitPolicy,
    check_class_labels,
    exit_fractions,
    exit_policy_from_config,
)

__all__ = [
    "ORACLE_NAME",
    "cache_exit_outputs",
    "describe_choices",
    "exit_costs_from_measured_rows",
    "fit_policies",
    "format_budget_table",
    "format_choices",
    "check_tracked_policies",
    "load_policies",
    "measured_budget_table",
    "oracle_exits",
    "plot_accuracy_vs_cost",
    "save_policies",
    "simulated_budget_table",
    "standard_policies",
    "synthetic_exit_outputs",
]

ORACLE_NAME = "oracle"
TRACKED_SUFFIX = "(budget tracked)"


# --- data ------------------------------------------------------------------------------------------------------------
def _check_fitted(name: str, policy: ExitPolicy) -> None:
    if not policy.is_fitted:
        raise ValueError(f"Policy {name!r} has not been fitted: fit it first (see `fit_policies`).")


def _move(batch: Mapping, device: torch.device) -> dict:
    return {name: value.to(device) if torch.is_tensor(value) else value for name, value in batch.items()}


@torch.no_grad()
def cache_exit_outputs(
    model, batches: Iterable[Mapping[str, torch.Tensor]], label_key: str = "labels", output_features: bool = True
) -> dict:
    """
    Run `model` over `batches` computing every exit (`output_all_exits=True`) and cache the exit logits, labels and
    (optionally) the pooled features every exit head received, on the CPU.

    Args:
        model: an EENet model (e.g. [`EENetBertForSequenceClassification`]); put in eval mode for the duration.
        batches (`Iterable[Mapping[str, torch.Tensor]]`): model inputs (e.g. tokenizer outputs), each with the labels
            under `label_key` (optional: without labels, `labels` is `None`).
        label_key (`str`, *optional*, defaults to `"labels"`): key of the labels in each batch.
        output_features (`bool`, *optional*, defaults to `True`): also cache the exits' pooled features.

    Returns:
        `dict` with `exit_logits` (`(N, K, C)`), `labels` (`(N,)` or `None`) and `exit_features` (a list of `K`
        tensors `(N, d_k)`, or `None`).
    """
    was_training = model.training
    model.eval()
    logits, labels, features = [], [], []
    try:
        for batch in batches:
            batch = dict(batch)
            batch_labels = batch.pop(label_key, None)
            out = model(
                **_move(batch, model.device), output_all_exits=True, output_exit_features=output_features or None
            )
            logits.append(out.all_exit_logits.float().cpu())
            if batch_labels is not None:
                labels.append(_batch_labels(batch_labels, logits[-1].shape[0], model.config.num_labels, label_key))
            if output_features:
                features.append([f.float().cpu() for f in out.all_exit_features])
    finally:
        model.train(was_training)
    if not logits:
        raise ValueError("`batches` is empty: nothing to cache.")
    if labels and len(labels) != len(logits):
        raise ValueError(f"Only {len(labels)} of {len(logits)} batches carry labels under {label_key!r}.")
    return {
        "exit_logits": torch.cat(logits),
        "labels": torch.cat(labels) if labels else None,
        "exit_features": [torch.cat(per_exit) for per_exit in zip(*features)] if output_features else None,
    }


def _batch_labels(labels, batch_size: int, num_labels: int, label_key: str) -> torch.Tensor:
    """A batch's labels as a CPU tensor of `batch_size` class ids; a clear error for any other shape or values."""
    labels = torch.as_tensor(labels).cpu()
    check_class_labels(
        labels, batch_size, num_labels, matching=f"a batch of {batch_size} (labels under {label_key!r})"
    )
    return labels


def synthetic_exit_outputs(
    num_samples: int = 10_000,
    num_exits: int = 6,
    num_labels: int = 10,
    feature_size: int = 32,
    seed: int = 0,
) -> dict:
    """
    Realistic synthetic cached exit outputs, for tests and benchmarks: every sample has a latent difficulty; exit `k`
    puts a margin `m_k = a_k - 1.2 * difficulty + noise` on the true class (with `a_k` increasing, so accuracy grows
    from about 47 % to 89 % over 6 exits with 10 classes) over class noise shared across exits (so exits agree and
    confidence is informative but imperfect). Pooled features mix the probabilities, the margin and the difficulty
    with noise (the mixing is fixed, so draws with different `seed`s come from the same "model": use one draw to
    fit and another to test). Costs are cumulative, the last slightly above 1.0 (exit heads).

    Returns:
        `dict` with `exit_logits` `(N, K, C)`, `labels` `(N,)`, `exit_costs` (`list[float]`) and `exit_features`
        (`K` tensors `(N, feature_size)`).
    """
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_labels, (num_samples,), generator=generator)
    difficulty = torch.randn(num_samples, generator=generator)
    strength = torch.linspace(1.3, 3.6, num_exits)
    shared = torch.randn(num_samples, num_labels, generator=generator)
    # the "model" (how features mix probabilities, margin and difficulty) is the same for every draw
    mix = torch.randn(num_labels + 2, feature_size, generator=torch.Generator().manual_seed(1234))
    one_hot = torch.nn.functional.one_hot(labels, num_labels).float()
    logits, features = [], []
    for k in range(num_exits):
        noise = 0.6 * shared + 0.8 * torch.randn(num_samples, num_labels, generator=generator)
        margin = strength[k] - 1.2 * difficulty + 0.5 * torch.randn(num_samples, generator=generator)
        exit_logits = 1.5 * noise + 1.5 * margin[:, None] * one_hot
        logits.append(exit_logits)
        inputs = torch.cat([exit_logits.softmax(-1), margin[:, None], difficulty[:, None]], dim=-1)
        features.append(inputs @ mix + 0.5 * torch.randn(num_samples, feature_size, generator=generator))
    costs = [(k + 1) / num_exits + 0.01 * (k + 1) for k in range(num_exits)]
    return {"exit_logits": torch.stack(logits, 1), "labels": labels, "exit_costs": costs, "exit_features": features}


# --- policies --------------------------------------------------------------------------------------------------------
def standard_policies(
    num_exits: int,
    eenet: bool = True,
    eenet_kwargs: Mapping | None = None,
    eenet_paper_kwargs: Mapping | None = None,
) -> dict[str, ExitPolicy]:
    """
    The policies of every budget table, unfitted, by display name: max-prob and entropy with global and geometric
    allocation, EENet (`"eenet"`, ours) and `"eenet-paper"` (unless `eenet=False`), patience `p = 1 .. K-1` and
    static exit `k = 0 .. K-1`.
    """
    policies: dict[str, ExitPolicy] = {}
    for score, name in (("max_prob", "max-prob"), ("entropy", "entropy")):
        for allocation in ("global", "geometric"):
            policies[f"{name} ({allocation})"] = ConfidenceThresholdPolicy(
                num_exits, score=score, allocation=allocation
            )
    if eenet:
        policies["eenet"] = EENetPolicy(num_exits, **dict(eenet_kwargs or {}))
        policies["eenet-paper"] = EENetPaperPolicy(num_exits, **dict(eenet_paper_kwargs or {}))
    for patience in range(1, num_exits):
        policies[f"patience (p={patience})"] = PatiencePolicy(num_exits, patience=patience)
    for exit_index in range(num_exits):
        policies[f"static (exit {exit_index})"] = StaticExitPolicy(num_exits, exit=exit_index)
    return policies


def fit_policies(
    policies: Mapping[str, ExitPolicy],
    exit_logits: torch.Tensor,
    labels: torch.Tensor,
    exit_costs: ExitCostModel | Sequence[float],
    budgets: Sequence[float],
    exit_features: Sequence[torch.Tensor] | None = None,
    progress: bool = False,
) -> dict[str, ExitPolicy]:
    """
    Fit every policy on the calibration split (budget-matched ones for `budgets`, in the cost model `exit_costs`:
    `model.exit_cost_model()`, or per-sample exit costs); returns the same mapping. With `progress`, a progress bar
    counts the policies (EENet's fit takes most of the time: tens of seconds for 5,000 samples on 2 CPU cores).
    """
    if labels is None:
        raise ValueError("Fitting exit policies needs calibration `labels`.")
    bar = tqdm(
        policies.items(), total=len(policies), desc="Fitting exit policies", unit="policy", disable=not progress
    )
    for name, policy in bar:
        bar.set_postfix_str(name)
        policy.fit(exit_logits, labels, exit_costs, budgets, exit_features=exit_features)
    return dict(policies)


POLICIES_CONFIG_FILE = "exit_policies.json"
POLICIES_WEIGHTS_FILE = "exit_policies.safetensors"


def save_policies(policies: Mapping[str, ExitPolicy], directory: str | Path) -> Path:
    """
    Save fitted policies by display name (every policy of a budget table, not only the one stored in the model) as
    `exit_policies.json` (their configs, in order, with each fit's per-budget `fit_summary_` where the policy keeps
    one: which candidate EENet chose, its calibration accuracy and cost, ...) and `exit_policies.safetensors` (their
    tensors), so the same policies can be evaluated later on another split. Returns the directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    configs, tensors = [], {}
    for index, (name, policy) in enumerate(policies.items()):
        entry = {"name": name, "config": policy.get_config()}
        if getattr(policy, "fit_summary_", None):
            entry["fit_summary"] = policy.fit_summary_
        configs.append(entry)
        for key, value in policy.state_dict().items():
            tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
    (directory / POLICIES_CONFIG_FILE).write_text(json.dumps(configs, indent=2) + "\n")
    save_file(tensors, str(directory / POLICIES_WEIGHTS_FILE))
    return directory


def load_policies(directory: str | Path) -> dict[str, ExitPolicy]:
    """
    Load the policies written by [`save_policies`], by display name, in their saved order (with their
    `fit_summary_` where one was saved).
    """
    directory = Path(directory)
    config_file, weights_file = directory / POLICIES_CONFIG_FILE, directory / POLICIES_WEIGHTS_FILE
    missing = [str(f) for f in (config_file, weights_file) if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"No saved exit policies in {str(directory)!r} (missing {missing}); `ExitSchedulerTrainer` writes them "
            "with `save_policies` when it fits the scheduler."
        )
    tensors = load_file(str(weights_file))
    try:
        entries = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{str(config_file)!r} is not valid JSON ({error}); save the policies again.") from error
    policies = {}
    for index, entry in enumerate(entries):
        policy = exit_policy_from_config(entry["config"])
        prefix = f"{index}."
        policy.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        if "fit_summary" in entry:
            policy.fit_summary_ = entry["fit_summary"]
        policies[entry["name"]] = policy
    return policies


def describe_choices(policy: ExitPolicy) -> dict[float, str]:
    """
    What an [`EENetPolicy`] fit chose per budget, from its `fit_summary_` (after `fit`, or as saved by
    [`save_policies`]): `{budget: "candidate"}`, the candidate named as in `fit_summary_` ("max-prob (global)" or
    another confidence rule, "basic (restart 0)" / "rich (restart 0)" for its trained scoring functions on the paper's
    or the richer features, "regret (global)", "gain (global)"), followed by ", searched allocation" when the
    allocation search replaced the candidate's own exit fractions and by ", kept from budget b" when a smaller budget's
    solution was kept. Empty for a policy without such a summary (a baseline, a policy loaded with the model).
    """
    choices = {}
    for row in getattr(policy, "fit_summary_", None) or []:
        if "scoring" not in row:
            return {}
        text = row["scoring"] + (", searched allocation" if row.get("allocation") == "searched" else "")
        if row.get("solution_of_budget", row["budget"]) != row["budget"]:
            text += f", kept from budget {row['solution_of_budget']:g}"
        choices[row["budget"]] = text
    return choices


def format_choices(choices: Mapping[str, str]) -> str:
    """The model card's `policy_choices` (from [`describe_choices`]) on one line: `"0.3: ...; 0.4: ..."`."""
    return "; ".join(f"{budget}: {text}" for budget, text in choices.items())


def oracle_exits(exit_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """
    The oracle's exits (evaluation only, it reads the labels): the first exit whose prediction is correct, else the
    last exit. Returns a `torch.LongTensor` of shape `(num_samples,)`.
    """
    _check_cached(exit_logits, labels)
    correct = exit_logits.argmax(-1) == labels[:, None]
    correct[:, -1] = True
    return correct.to(torch.int8).argmax(-1)


def _check_cached(exit_logits: torch.Tensor, labels: torch.Tensor | None) -> None:
    if not torch.is_tensor(exit_logits) or exit_logits.ndim != 3:
        shape = tuple(exit_logits.shape) if torch.is_tensor(exit_logits) else type(exit_logits).__name__
        raise ValueError(f"`exit_logits` must have shape (num_samples, num_exits, num_labels), got {shape}.")
    if exit_logits.shape[0] == 0:
        raise ValueError("`exit_logits` holds zero samples.")
    if not torch.isfinite(exit_logits).all():
        raise ValueError("`exit_logits` contains NaN or infinite values.")
    if labels is None:
        raise ValueError("Accuracy needs `labels`.")
    check_class_labels(labels, exit_logits.shape[0], exit_logits.shape[-1])


def _row(name, mode, budget, exits, exit_logits, labels, costs, **extra) -> dict:
    num_exits = exit_logits.shape[1]
    predictions = exit_logits[torch.arange(exits.numel()), exits].argmax(-1)
    histogram = exit_fractions(exits, num_exits)
    return {
        "policy": name,
        "mode": mode,
        "budget": budget,
        "accuracy": float((predictions == labels).float().mean()),
        "cost": float(costs.of_exits(exits)),
        "exit_histogram": [round(float(h), 6) for h in histogram],
        "num_samples": int(exits.numel()),
        **extra,
    }


@torch.no_grad()
def simulated_budget_table(
    policies: Mapping[str, ExitPolicy],
    exit_logits: torch.Tensor,
    labels: torch.Tensor,
    exit_costs: ExitCostModel | Sequence[float],
    exit_features: Sequence[torch.Tensor] | None = None,
    include_oracle: bool = True,
) -> list[dict]:
    """
    Simulated budget table from cached exit outputs: one row per (policy, fitted budget) for budget-matched policies,
    one row per unbudgeted policy (patience, static; `budget` is `None`, their cost is whatever they give), and one
    oracle row (first correct exit, else the last; an upper bound that reads the labels).

    Each row: `policy`, `mode` (`"simulated"`), `budget`, `accuracy`, `cost` (realized average relative cost; with
    segment costs in `exit_costs` (an [`~hf_eenet.models.exit_cost_model.ExitCostModel`]), the expected cost of these
    exits served in random batches of its batch size), `exit_histogram` (fraction of samples per exit),
    `num_samples`.
    """
    _check_cached(exit_logits, labels)
    exit_logits, labels = exit_logits.float(), labels.to(exit_logits.device)
    costs = ExitCostModel.of(exit_costs)
    if len(costs) != exit_logits.shape[1]:
        raise ValueError(f"`exit_costs` must hold {exit_logits.shape[1]} costs, got {costs.exit_costs}.")
    rows = []
    for name, policy in policies.items():
        if policy.num_exits != exit_logits.shape[1]:
            raise ValueError(
                f"Policy {name!r} has {policy.num_exits} exits but the cached outputs have {exit_logits.shape[1]}."
            )
        if policy.requires_budget:
            _check_fitted(name, policy)
            for index, budget in enumerate(policy.budgets):
                exits = policy.simulate(exit_logits, index, exit_features)
                rows.append(_row(name, "simulated", budget, exits, exit_logits, labels, costs))
        else:
            exits = policy.simulate(exit_logits, None, exit_features)
            rows.append(_row(name, "simulated", None, exits, exit_logits, labels, costs))
    if include_oracle:
        rows.append(
            _row(ORACLE_NAME, "simulated", None, oracle_exits(exit_logits, labels), exit_logits, labels, costs)
        )
    return rows


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_tracked_policies(tracked_policies: Sequence[str] | None, measured: Sequence[str]) -> list[str]:
    """`tracked_policies` as a list, each one of the `measured` policy names; a clear error otherwise."""
    if isinstance(tracked_policies, str):
        raise TypeError(
            f"`tracked_policies` must be a sequence of policy names, got the string {tracked_policies!r} "
            f"(pass [{tracked_policies!r}])."
        )
    tracked = list(tracked_policies or ())
    unknown = [name for name in tracked if name not in measured]
    if unknown:
        raise ValueError(
            f"`tracked_policies` {unknown} are not among the measured policies {list(measured)}"
            + ("." if measured else " (nothing is measured: tracked rows need measured rows).")
        )
    return tracked


def check_measured_budgets(model, policies: Mapping[str, ExitPolicy], budgets: Sequence[float] | None = None) -> None:
    """
    Check before any timing that `model` can serve every budget-matched policy of `policies` at `budgets` (default:
    each policy's fitted grid): a clear error for an unfitted policy, a budget below the cheapest exit's cost or
    below the smallest fitted budget, as the model itself would raise mid-run. Like a forward with the policy, it
    moves each checked policy to the model's device.
    """
    for name, policy in policies.items():
        if not policy.requires_budget:
            continue
        _check_fitted(name, policy)
        for budget in budgets if budgets is not None else policy.budgets:
            model._resolve_policy(float(budget), policy)


@torch.no_grad()
def measured_budget_table(
    model,
    batches: Sequence[Mapping[str, torch.Tensor]],
    policies: Mapping[str, ExitPolicy] | None = None,
    budgets: Sequence[float] | None = None,
    label_key: str = "labels",
    num_warmup_batches: int = 1,
    include_full_model: bool = True,
    tracked_policies: Sequence[str] = (),
    batches_per_turn: int = 1,
    progress: bool = False,
) -> list[dict]:
    """
    Measured budget table: run the real early-exit forward (`model(**batch, budget=b, exit_policy=policy)`, eval
    mode, `torch.no_grad`) over `batches` and time it on the wall clock. Configurations take turns: each runs
    `batches_per_turn` consecutive batches, then the next one does, until every configuration has run every batch, so
    a drift in the machine's speed affects every row alike; each turn starts one configuration later than the one
    before, so no configuration always runs first or always follows the same one. With one batch per turn (the
    default) each call follows another configuration's call; with a few batches per turn each configuration mostly
    follows itself, as a server running one model at one budget does (the caches and the allocator hold what its own
    previous call left).

    Args:
        model: an EENet model.
        batches (`Sequence[Mapping[str, torch.Tensor]]`): tokenized / processed batches with labels under
            `label_key` (rows without labels report `accuracy=None`). Iterated once per (policy, budget) row.
        policies (`Mapping[str, ExitPolicy]`, *optional*): policies by display name; defaults to the model's
            stored policy (`{"stored": model.exit_policy}`).
        budgets (`Sequence[float]`, *optional*): budgets of the budget-matched policies; defaults to each policy's
            fitted grid. Unbudgeted policies (patience, static) run once, without a budget.
        label_key (`str`, *optional*, defaults to `"labels"`)
        num_warmup_batches (`int`, *optional*, defaults to 1): leading batches run through every configuration,
            untimed, before the timed pass over all batches.
        include_full_model (`bool`, *optional*, defaults to `True`): add the plain full model (`budget=1.0`).
        tracked_policies (`Sequence[str]`, *optional*): names of budget-matched `policies` whose budgets are also
            served with a [`BudgetTracker`] over the batches in order (`budget=BudgetTracker(b)`), as rows named
            `"<name> (budget tracked)"`.
        batches_per_turn (`int`, *optional*, defaults to 1): consecutive batches each configuration runs per turn.
        progress (`bool`, *optional*, defaults to `False`): show progress bars over the warm-up and the timed turns
            (updated between turns, outside the timed calls).

    Each row: `policy`, `mode` (`"measured"`), `budget`, `accuracy`, `cost` (realized average `exit_cost`),
    `exit_histogram`, `num_samples`, `seconds_per_sample`, `samples_per_second`, `device`, and with the full model
    `speedup` (the full model's time per sample over the row's, measured in the same run).
    """
    batches = list(batches)
    if not batches:
        raise ValueError("`batches` is empty: nothing to measure.")
    if (
        isinstance(num_warmup_batches, bool)
        or not isinstance(num_warmup_batches, numbers.Integral)
        or num_warmup_batches < 0
    ):
        raise ValueError(f"`num_warmup_batches` must be a whole number >= 0, got {num_warmup_batches!r}.")
    if isinstance(batches_per_turn, bool) or not isinstance(batches_per_turn, int) or batches_per_turn < 1:
        raise ValueError(f"`batches_per_turn` must be a positive integer, got {batches_per_turn!r}.")
    if policies is None:
        if getattr(model, "exit_policy", None) is None:
            raise ValueError("The model has no stored exit policy; pass `policies`.")
        policies = {"stored": model.exit_policy}
    tracked_policies = check_tracked_policies(tracked_policies, list(policies))
    check_measured_budgets(model, policies, budgets)
    runs: list[tuple[str, ExitPolicy | None, float | None, BudgetTracker | None]] = []
    if include_full_model:
        runs.append(("full model", None, 1.0, None))
    for name, policy in policies.items():
        if policy.requires_budget:
            grid = [float(budget) for budget in (budgets if budgets is not None else policy.budgets)]
            runs += [(name, policy, budget, None) for budget in grid]
            if name in tracked_policies:
                runs += [(f"{name} {TRACKED_SUFFIX}", policy, budget, BudgetTracker(budget)) for budget in grid]
        elif name in tracked_policies:
            raise ValueError(f"`tracked_policies`: the {name!r} policy is not budget-matched, so no budget to track.")
        else:
            runs.append((name, policy, None, None))
    was_training = model.training
    model.eval()
    device = model.device
    prepared = []
    for batch in batches:
        batch = dict(batch)
        labels = batch.pop(label_key, None)
        if labels is not None:
            labels = _batch_labels(labels, model._input_batch_size(batch), model.config.num_labels, label_key)
        prepared.append((_move(batch, device), labels))
    labelled = sum(labels is not None for _, labels in prepared)
    if labelled not in (0, len(prepared)):
        raise ValueError(f"Only {labelled} of {len(prepared)} batches carry labels under {label_key!r}.")
    num_exits = model.config.num_exits
    results = [{"exits": [], "costs": [], "hits": 0, "labelled": 0, "elapsed": 0.0} for _ in runs]
    try:
        # every configuration in turn, `batches_per_turn` batches at a time, starting one configuration later each
        # turn: drift of the machine's speed, and any cost of following a given configuration, hit every row alike
        warmup = prepared[:num_warmup_batches]
        for inputs, _ in tqdm(warmup, desc=f"Warm-up ({len(runs)} configurations)", disable=not progress):
            for _, policy, budget, tracker in runs:
                model(**inputs, budget=budget if tracker is None else tracker, exit_policy=policy)
        for *_, tracker in runs:
            if tracker is not None:
                tracker.reset()  # the timed pass is the stream
        turns = [prepared[start : start + batches_per_turn] for start in range(0, len(prepared), batches_per_turn)]
        timing = tqdm(turns, desc=f"Timing {len(runs)} configurations", unit="turn", disable=not progress)
        for number, turn in enumerate(timing):
            first = number % len(runs)
            for (_, policy, budget, tracker), result in zip(
                runs[first:] + runs[:first], results[first:] + results[:first]
            ):
                for inputs, labels in turn:
                    _synchronize(device)
                    start = time.perf_counter()
                    out = model(**inputs, budget=budget if tracker is None else tracker, exit_policy=policy)
                    _synchronize(device)
                    result["elapsed"] += time.perf_counter() - start
                    result["exits"].append(out.exit_index.cpu())
                    result["costs"].append(out.exit_cost.float().cpu())
                    if labels is not None:
                        result["hits"] += int((out.logits.argmax(-1).cpu() == labels).sum())
                        result["labelled"] += labels.numel()
        rows = []
        for (name, _, budget, tracker), result in zip(runs, results):
            exits, costs, elapsed = torch.cat(result["exits"]), torch.cat(result["costs"]), result["elapsed"]
            num_samples = exits.numel()
            served = {}
            if tracker is not None:  # which fitted budgets the tracker served, as shares of the samples
                served["served_budgets"] = [
                    [fitted, round(count / num_samples, 6)]
                    for fitted, count in sorted(tracker.samples_per_budget.items())
                ]
            rows.append(
                {
                    "policy": name,
                    "mode": "measured",
                    "budget": budget,
                    "accuracy": result["hits"] / result["labelled"] if result["labelled"] else None,
                    "cost": float(costs.mean()),
                    "exit_histogram": [round(float(h), 6) for h in exit_fractions(exits, num_exits)],
                    "num_samples": num_samples,
                    "seconds_per_sample": elapsed / num_samples,
                    "samples_per_second": num_samples / elapsed if elapsed > 0 else math.inf,
                    "device": str(device),
                    **served,
                }
            )
    finally:
        model.train(was_training)
    full = next((row for row in rows if row["policy"] == "full model"), None)
    if full is not None:
        for row in rows:
            row["speedup"] = (
                full["seconds_per_sample"] / row["seconds_per_sample"] if row["seconds_per_sample"] else None
            )
    return rows


def _nonnegative_least_squares(matrix: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`argmin_x ||matrix @ x - target||` subject to `x >= 0` (the Lawson-Hanson active-set method)."""
    num_variables = matrix.shape[1]
    solution = matrix.new_zeros(num_variables)
    free = torch.zeros(num_variables, dtype=torch.bool)
    tolerance = 1e-12 * max(1.0, float(matrix.abs().max()) ** 2)
    for _ in range(3 * num_variables + 1):
        gradient = matrix.T @ (target - matrix @ solution)
        blocked = (~free) & (gradient > tolerance)
        if not bool(blocked.any()):
            break
        free[int(torch.where(blocked, gradient, -math.inf).argmax())] = True
        while True:
            candidate = matrix.new_zeros(num_variables)
            columns = free.nonzero().flatten()
            candidate[columns] = torch.linalg.lstsq(matrix[:, columns], target[:, None]).solution[:, 0]
            if bool((candidate[columns] > 0).all()):
                solution = candidate
                break
            crossing = free & (candidate <= 0)  # step toward the candidate until a variable reaches zero
            step = (solution[crossing] / (solution[crossing] - candidate[crossing])).min()
            solution = solution + step * (candidate - solution)
            free &= solution > tolerance
            solution = torch.where(free, solution, 0.0)
    return solution


def exit_costs_from_measured_rows(
    rows: Sequence[Mapping], prior_costs: ExitCostModel | Sequence[float], prior_weight: float = 0.05
) -> list[float]:
    """
    Exit costs that explain measured wall-clock times (e.g. the rows of `measured_budget_table` for one policy at
    every budget of its grid). Each row's wall-clock fraction (its time per sample over the full model's, measured in
    the same run: `1 / speedup`) is modelled as `sum_k h_k c_k`, with `h` its exit histogram and `c_k` the cost of
    leaving at exit `k`. The costs are the least-squares solution under the constraint that they never decrease with
    depth (exit `k` runs every block before it), with a ridge term of weight `prior_weight` per exit pulling them
    toward `prior_costs` (it decides the costs of exits that few samples took); ties are then split by a relative
    `1e-6` so the costs increase strictly. When `prior_costs` is an
    [`~hf_eenet.models.exit_cost_model.ExitCostModel`] with fixed segment costs, those are kept: each row's fixed part
    is taken off its fraction first, and the per-sample costs explain the rest. The fixed part is what the row's
    batches ran: its `cost` (the realized average `exit_cost`, which counts each sample's share of the segments its
    batch ran, priced with `prior_costs`) less the per-sample part; for a row without `cost`, the part expected of
    random batches of the model's batch size.

    Unlike costs timed on uniform batches (every sample through every exit, as
    [`~EarlyExitMixin.calibrate_exit_costs`] does), these price what the early-exit forward adds on mixed batches:
    the policy's decisions, the compaction, and blocks running on fewer samples.

    Args:
        rows (`Sequence[Mapping]`): measured rows with `exit_histogram` and `speedup` (the full model's row, and rows
            without a speed-up, are skipped).
        prior_costs (`ExitCostModel` or `Sequence[float]`): the current cost model, or the current exit costs.
        prior_weight (`float`, *optional*, defaults to 0.05): weight of the pull toward `prior_costs`, relative to one
            row.

    Returns:
        `list[float]`: the new (per-sample) exit costs.
    """
    cost_model = prior_costs if isinstance(prior_costs, ExitCostModel) else None
    if cost_model is not None:
        prior_costs = cost_model.exit_costs
        cost_model = cost_model if cost_model.segment_costs is not None else None  # per-sample costs only
    prior = torch.tensor([float(c) for c in prior_costs], dtype=torch.float64)
    if prior.numel() < 1 or not bool((torch.isfinite(prior) & (prior > 0)).all()):
        raise ValueError(f"`prior_costs` must be finite positive costs, one per exit, got {list(prior_costs)}.")
    if not (math.isfinite(prior_weight) and prior_weight > 0):
        raise ValueError(f"`prior_weight` must be a positive number, got {prior_weight}.")
    used = [row for row in rows if row.get("policy") != "full model" and row.get("speedup")]
    if not used:
        raise ValueError("No measured row with a speed-up against the full model: nothing to fit the costs to.")
    for row in used:
        if "exit_histogram" not in row:
            raise ValueError(f"A measured row has no `exit_histogram`: {dict(row)}.")
        if len(row["exit_histogram"]) != prior.numel():
            raise ValueError(
                f"A row's exit histogram has {len(row['exit_histogram'])} exits but there are {prior.numel()} costs."
            )
        if not (math.isfinite(row["speedup"]) and row["speedup"] > 0):
            raise ValueError(f"A measured row's `speedup` must be a finite positive number, got {row['speedup']}.")
    histograms = torch.tensor([row["exit_histogram"] for row in used], dtype=torch.float64)
    fractions = torch.tensor([1.0 / row["speedup"] for row in used], dtype=torch.float64)
    if cost_model is not None:  # the fixed segment costs stay: the per-sample costs explain the rest
        per_sample = histograms @ prior
        expected = cost_model.of_fractions(histograms) - per_sample
        realized = torch.tensor([row.get("cost", math.nan) for row in used], dtype=torch.float64) - per_sample
        fractions = fractions - torch.where(realized.isnan(), expected, realized.clamp_min(0.0))
    ridge = math.sqrt(prior_weight) * torch.eye(prior.numel(), dtype=torch.float64)
    design = torch.cat([histograms, ridge])
    target = torch.cat([fractions, math.sqrt(prior_weight) * prior])
    # costs = cumulative sums of non-negative increments: a non-negative least-squares problem in the increments
    cumulative = torch.ones(prior.numel(), prior.numel(), dtype=torch.float64).tril()
    increments = _nonnegative_least_squares(design @ cumulative, target)
    return strictly_increasing(increments.cumsum(0).clamp_min(1e-6).tolist())


# --- rendering -------------------------------------------------------------------------------------------------------
def _format_value(key: str, value) -> str:
    if value is None:
        return "—"
    if key == "accuracy":
        return f"{100 * value:.2f}"
    if key in ("budget", "cost"):
        return f"{value:.3f}"
    if key == "exit_histogram":
        return " ".join(f"{100 * h:.0f}" for h in value)
    if key == "seconds_per_sample":
        return f"{1000 * value:.3f}"
    if key == "samples_per_second":
        return f"{value:.1f}"
    if key == "speedup":
        return f"{value:.2f}x"
    if key == "served_budgets":
        return " ".join(f"{budget:g}:{100 * share:.0f}" for budget, share in value)
    return str(value)


_HEADERS = {
    "policy": "policy",
    "mode": "mode",
    "budget": "budget",
    "accuracy": "accuracy (%)",
    "cost": "cost",
    "exit_histogram": "exit histogram (%)",
    "num_samples": "samples",
    "seconds_per_sample": "ms / sample",
    "samples_per_second": "samples / s",
    "speedup": "speed-up vs full",
    "served_budgets": "budgets served (budget:% of samples)",
}


def format_budget_table(rows: Sequence[Mapping], format: str = "markdown") -> str:
    """
    Render budget-table rows as a markdown table (`format="markdown"`) or aligned plain text (`"text"`). Columns:
    policy, mode (simulated / measured), budget, accuracy, realized cost, exit histogram, and for measured rows the
    time per sample and throughput.
    """
    if format not in ("markdown", "text"):
        raise ValueError(f"`format` must be 'markdown' or 'text', got {format!r}.")
    if not rows:
        raise ValueError("No rows to format.")
    keys = [k for k in _HEADERS if any(k in row for row in rows)]
    table = [[_format_value(k, row.get(k)) for k in keys] for row in rows]
    headers = [_HEADERS[k] for k in keys]
    if format == "markdown":
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in table]
        return "\n".join(lines)
    widths = [max(len(h), *(len(cells[i]) for cells in table)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)) for cells in table]
    return "\n".join(lines)


# Unbudgeted policies drawn as one series per family (their hyperparameter sweeps cost).
_FAMILIES = ("patience", "static")


def _series(policy: str) -> str:
    family = policy.split(" (")[0]
    return family if family in _FAMILIES else policy


def plot_accuracy_vs_cost(rows: Sequence[Mapping], path: str | Path, title: str | None = None) -> Path:
    """
    Plot accuracy against realized cost for every policy of `rows` (a line per budget-matched policy, simulated solid
    and measured dashed; a dotted line per unbudgeted family, patience over `p` and static over the exit; a star for
    the oracle) and save it as a PNG (Agg backend), the legend beside the axes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in rows if row.get("accuracy") is not None]
    if not rows:
        raise ValueError("No rows with an accuracy to plot.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(figsize=(9, 5))
    groups: dict[tuple[str, str], list[Mapping]] = {}
    for row in rows:
        groups.setdefault((_series(row["policy"]), row["mode"]), []).append(row)
    modes = {row["mode"] for row in rows}
    for (name, mode), group in groups.items():
        if name in _FAMILIES and mode == "measured" and (name, "simulated") in groups:
            continue  # a family's measured points repeat its simulated ones (same decisions)
        label = f"{name} ({mode})" if len(modes) > 1 and name not in _FAMILIES else name
        group = sorted(group, key=lambda r: r["cost"])
        costs = [r["cost"] for r in group]
        accuracies = [100 * r["accuracy"] for r in group]
        if name == ORACLE_NAME:
            axes.scatter(costs, accuracies, marker="*", s=120, color="black", label=label, zorder=3)
        elif name in _FAMILIES:
            axes.plot(costs, accuracies, marker="x", linestyle=":", label=label)
        elif len(group) == 1:
            axes.scatter(costs, accuracies, marker="s" if mode == "measured" else "x", label=label)
        else:
            linestyle = "-" if mode == "simulated" else "--"
            axes.plot(costs, accuracies, marker="o", markersize=3, linestyle=linestyle, label=label)
    axes.set_xlabel("average cost (relative to the full model)")
    axes.set_ylabel("accuracy (%)")
    axes.set_title(title or "Accuracy vs cost")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
