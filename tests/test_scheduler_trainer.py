"""`ExitSchedulerTrainer`: fitting through the prediction loop, what it stores and leaves alone, reports, DDP."""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from test_trainer import REPO_ROOT, TWO_PROCESSES, run_launched, tiny_model, token_dataset  # noqa: E402
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification  # noqa: E402
from transformers.testing_utils import CaptureLogger  # noqa: E402
from transformers.utils import logging  # noqa: E402

from hf_eenet import ExitCostModel  # noqa: E402
from hf_eenet.evaluation import exit_costs_from_measured_rows, load_policies, simulated_budget_table  # noqa: E402
from hf_eenet.models.exit_policies import EENetPolicy, default_budget_grid  # noqa: E402
from hf_eenet.trainer import ExitSchedulerArguments, ExitSchedulerTrainer, budget_table_path  # noqa: E402

BUDGETS = [0.5, 0.8]
FAST_EENET = '{"max_epochs": 40, "patience": 5}'


def scheduler_args(tmp_path, **kwargs) -> ExitSchedulerArguments:
    defaults = {
        "output_dir": str(tmp_path / "fitted"),
        "use_cpu": True,
        "per_device_eval_batch_size": 16,
        "report_to": "none",
        "disable_tqdm": True,
        "seed": 0,
        "budgets": BUDGETS,
        "policy_kwargs": FAST_EENET,
    }
    return ExitSchedulerArguments(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny model whose scheduler was fitted on 64 calibration samples, with its trainer and initial weights."""
    tmp_path = tmp_path_factory.mktemp("scheduler")
    model = tiny_model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    trainer = ExitSchedulerTrainer(model=model, args=scheduler_args(tmp_path), eval_dataset=token_dataset(64))
    rows = trainer.fit_scheduler(split="dev")
    return trainer, model, before, rows


def test_fitting_leaves_backbone_and_exits_bit_identical(fitted):
    _, model, before, _ = fitted
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert set(after) - set(before) and all(name.startswith("exit_policy.") for name in set(after) - set(before))


def test_fitting_stores_eenet_and_every_policy_is_in_the_table(fitted):
    trainer, model, _, rows = fitted
    assert isinstance(model.exit_policy, EENetPolicy) and model.exit_policy.budgets == BUDGETS
    assert model.config.exit_policy["policy_type"] == "eenet"
    names = {row["policy"] for row in rows}
    assert {"eenet", "eenet-paper", "max-prob (global)", "entropy (geometric)", "patience (p=1)", "oracle"} <= names
    assert all(row["num_samples"] == 64 and row["mode"] == "simulated" for row in rows)
    eenet_rows = [row for row in rows if row["policy"] == "eenet"]
    assert [row["budget"] for row in eenet_rows] == BUDGETS
    assert all(row["cost"] <= row["budget"] + 1e-6 for row in eenet_rows)  # calibration cost never over budget
    assert trainer.state.log_history[-1]["calibration_accuracy_at_budget_0.5"] == eenet_rows[0]["accuracy"]


def test_fitting_writes_table_and_policies_that_reproduce_the_table(fitted):
    trainer, model, _, rows = fitted
    output = trainer.args.output_dir
    saved = json.loads(open(os.path.join(output, "budget_table_dev.json")).read())
    assert saved["split"] == "dev" and saved["rows"] == rows
    assert "| eenet | simulated | 0.500 |" in open(os.path.join(output, "budget_table_dev.md")).read()
    policies = load_policies(output)
    assert list(policies) == list(trainer.policies)
    assert policies["eenet"].fit_summary_ == trainer.policies["eenet"].fit_summary_  # what it chose per budget
    cached = trainer.cache_exit_outputs()
    again = simulated_budget_table(policies, **cached, exit_costs=model.config.exit_costs)
    assert again == rows


def test_save_load_reproduces_every_decision(fitted, tmp_path):
    trainer, model, _, _ = fitted
    trainer.save_model(str(tmp_path / "saved"))
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved").eval()
    model.eval()
    inputs = {"input_ids": torch.tensor(token_dataset(40, seed=7)["input_ids"])}
    for budget in BUDGETS:
        expected, actual = model(**inputs, budget=budget), loaded(**inputs, budget=budget)
        assert torch.equal(expected.exit_index, actual.exit_index)
        assert torch.equal(expected.logits, actual.logits)
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "Simulated on dev" in card and "| eenet | 0.50 |" in card
    chosen = trainer.policies["eenet"].fit_summary_[0]["scoring"]  # the fit's choice at 0.5, in the card
    assert f"| 0.5 | {chosen}" in card


def test_evaluate_budgets_simulated_and_measured_side_by_side(fitted):
    trainer, model, _, _ = fitted
    rows = trainer.evaluate_budgets(token_dataset(48, seed=3), split="test", measured_budgets=[0.5])
    simulated = [row for row in rows if row["mode"] == "simulated"]
    measured = [row for row in rows if row["mode"] == "measured"]
    assert {row["policy"] for row in simulated} == {*trainer.policies, "oracle"}
    assert [(row["policy"], row["budget"]) for row in measured] == [("full model", 1.0), ("eenet", 0.5)]
    full, eenet = measured
    assert full["speedup"] == 1.0 and eenet["speedup"] > 0 and eenet["num_samples"] == 48
    simulated_eenet = next(r for r in simulated if r["policy"] == "eenet" and r["budget"] == 0.5)
    # the real forward takes the decisions the simulation predicts
    assert eenet["accuracy"] == pytest.approx(simulated_eenet["accuracy"])
    assert eenet["exit_histogram"] == simulated_eenet["exit_histogram"]
    assert os.path.isfile(os.path.join(trainer.args.output_dir, "budget_table_test.json"))
    tables = {(t["kind"], t["split"]) for t in model.model_card_data.budget_tables}
    assert {("simulated", "dev"), ("simulated", "test"), ("measured", "test")} <= tables


def test_evaluate_budgets_refuses_an_unservable_measured_budget_before_running_the_split(fitted, monkeypatch):
    trainer, model, _, _ = fitted

    def must_not_run(*args, **kwargs):
        raise AssertionError("the split was run before the measured budgets were checked")

    monkeypatch.setattr(trainer, "cache_exit_outputs", must_not_run)
    cheapest = model.config.exit_costs[0]
    with pytest.raises(ValueError, match=f"budget {cheapest / 2} is below the cost of the cheapest exit"):
        trainer.evaluate_budgets(token_dataset(16, seed=3), split="test", measured_budgets=[0.5, cheapest / 2])


def test_timing_on_a_cpu_shared_by_several_processes_warns(fitted, monkeypatch):
    trainer, _, _, _ = fitted
    logger = logging.get_logger("hf_eenet.trainer")
    with CaptureLogger(logger) as captured:
        trainer.evaluate_budgets(token_dataset(16, seed=5), split="alone", measured_budgets=[0.5])
    assert "processes share this machine's CPU" not in captured.out
    monkeypatch.setattr(type(trainer.args), "world_size", property(lambda self: 2))
    with CaptureLogger(logger) as captured:
        trainer.evaluate_budgets(token_dataset(16, seed=5), split="shared", measured_budgets=[0.5])
    assert "The measured rows of the shared split are timed in the main process while 2 processes" in captured.out


def test_measuring_a_split_sorted_by_label_warns(fitted):
    trainer, _, _, _ = fitted
    dataset = token_dataset(32, seed=4).sort("label")
    logger = logging.get_logger("hf_eenet.trainer")
    with CaptureLogger(logger) as captured:
        trainer.evaluate_budgets(dataset, split="sorted", measured_budgets=[0.5])
    assert "sorted by label" in captured.out and "--shuffle_seed" in captured.out
    with CaptureLogger(logger) as captured:
        trainer.evaluate_budgets(dataset.shuffle(seed=0), split="shuffled", measured_budgets=[0.5])
    assert "sorted by label" not in captured.out


def test_channels_last_is_refused_for_a_model_without_convolutions(tmp_path):
    with pytest.raises(ValueError, match="`channels_last` is a memory format for convolutions"):
        ExitSchedulerTrainer(
            model=tiny_model(), args=scheduler_args(tmp_path, channels_last=True), eval_dataset=token_dataset(8)
        )


def test_train_is_fit_scheduler(tmp_path):
    trainer = ExitSchedulerTrainer(
        model=tiny_model(), args=scheduler_args(tmp_path, fit_baselines=False), eval_dataset=token_dataset(32)
    )
    result = trainer.train()
    assert list(trainer.policies) == ["eenet"] and trainer.model.exit_policy is not None
    assert result.metrics["budget_table_rows"] == len(trainer.budget_table)


def test_store_a_baseline_instead(tmp_path):
    model = tiny_model()
    args = scheduler_args(tmp_path, exit_policy="max-prob (geometric)", default_budget=0.8, policy_kwargs=None)
    ExitSchedulerTrainer(model=model, args=args, eval_dataset=token_dataset(32)).fit_scheduler()
    assert model.config.exit_policy["policy_type"] == "confidence-threshold"
    assert model.config.exit_policy["allocation"] == "geometric" and model.config.default_budget == 0.8
    model.eval()
    inputs = {"input_ids": torch.tensor(token_dataset(32)["input_ids"])}  # the calibration split
    default = model(**inputs)  # runs at the default budget
    assert torch.equal(default.exit_index, model(**inputs, budget=0.8).exit_index)
    assert default.exit_cost.mean() <= 0.8 + 1e-6 and default.exit_index.min() < 2


@pytest.mark.parametrize(
    ("kwargs", "trainer_kwargs", "match"),
    [
        ({"exit_policy": "oracle"}, {}, "not among the policies"),
        ({"exit_policy": "patience (p=1)"}, {}, "budget-matched"),
        ({}, {"train_dataset": token_dataset(8)}, "calibration split"),
    ],
)
def test_bad_arguments_fail_early(tmp_path, kwargs, trainer_kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExitSchedulerTrainer(
            model=tiny_model(),
            args=scheduler_args(tmp_path, **kwargs),
            eval_dataset=token_dataset(8),
            **trainer_kwargs,
        )


def test_latency_costs_are_measured_before_fitting(tmp_path):
    # blocks big enough that the first exit costs well under the full model even on a busy machine
    model = tiny_model(hidden_size=128, intermediate_size=512, num_hidden_layers=4)
    flops_costs = list(model.config.exit_costs)
    args = scheduler_args(tmp_path, fit_baselines=False, latency_costs_batch_size=32, budgets=None)
    trainer = ExitSchedulerTrainer(model=model, args=args, eval_dataset=token_dataset(64, length=64))
    rows = trainer.fit_scheduler()
    costs = model.config.exit_costs
    assert model.config.exit_cost_source == "latency" and costs != flops_costs
    assert all(a < b for a, b in zip(costs, costs[1:]))
    assert model.exit_policy.budgets[0] >= costs[0] - 1e-9  # the grid starts from the measured cheapest exit
    cached = trainer.cache_exit_outputs()
    assert simulated_budget_table(trainer.policies, **cached, exit_costs=costs) == rows  # fitted for these costs
    trainer.save_model()
    saved = json.loads(open(os.path.join(args.output_dir, "config.json")).read())
    assert saved["exit_costs"] == costs and saved["exit_cost_source"] == "latency"


def test_latency_segment_costs_are_measured_and_fitted_for(tmp_path):
    model = tiny_model(hidden_size=128, intermediate_size=512, num_hidden_layers=4)
    args = scheduler_args(
        tmp_path, fit_baselines=False, latency_costs_batch_size=16, latency_segment_costs=True, budgets=None
    )
    trainer = ExitSchedulerTrainer(model=model, args=args, eval_dataset=token_dataset(64, length=64))
    rows = trainer.fit_scheduler()
    config = model.config
    assert config.exit_cost_batch_size == 16 and len(config.exit_segment_costs) == config.num_exits - 1
    cost_model = model.exit_cost_model()
    assert model.exit_policy.budgets == default_budget_grid(cost_model)
    cached = trainer.cache_exit_outputs()
    assert simulated_budget_table(trainer.policies, **cached, exit_costs=cost_model) == rows  # fitted for them
    trainer.save_model()
    saved = json.loads(open(os.path.join(args.output_dir, "config.json")).read())
    assert saved["exit_segment_costs"] == config.exit_segment_costs and saved["exit_cost_batch_size"] == 16


UNIFORM_COSTS = [0.3, 0.55, 1.02]  # what timing uniform batches "measured" (the tiny model has 3 exits)
EARLY_EXIT_COSTS = [0.38, 0.68, 1.05]  # what its early-exit forward really costs in these tests


def refit_trainer(tmp_path, monkeypatch, **kwargs):
    """
    A trainer whose timings are known: uniform-batch costs `UNIFORM_COSTS`, and early-exit rows (timed on real
    batches by the real `measured_budget_table`, then given the wall-clock fractions `EARLY_EXIT_COSTS` imply).
    """
    import hf_eenet.evaluation as evaluation

    model = tiny_model()
    defaults = {"fit_baselines": False, "latency_costs_batch_size": 8, "latency_costs_early_exit_batches": 2}
    args = scheduler_args(tmp_path, **{"budgets": None, **defaults, **kwargs})
    trainer = ExitSchedulerTrainer(model=model, args=args, eval_dataset=token_dataset(32))

    def measure_exit_costs(dataset=None):
        model.config.set_exit_costs(UNIFORM_COSTS, source="latency")
        return UNIFORM_COSTS

    real_table, timed = evaluation.measured_budget_table, []

    def measured_budget_table(model, batches, policies, **table_kwargs):
        assert table_kwargs["num_warmup_batches"] == len(batches)  # every timed batch is warmed up first
        timed.append([batch["input_ids"].shape[0] for batch in batches])
        rows = real_table(model, batches, policies, **table_kwargs)
        for row in rows:  # the fractions the known costs give these exits (the full model's row: 1.0)
            row["speedup"] = 1.0 / sum(h * c for h, c in zip(row["exit_histogram"], EARLY_EXIT_COSTS + [1.0]))
        rows[0]["speedup"] = 1.0
        return rows

    monkeypatch.setattr(trainer, "measure_exit_costs", measure_exit_costs)
    monkeypatch.setattr(evaluation, "measured_budget_table", measured_budget_table)
    return trainer, model, timed


def test_latency_costs_are_refitted_on_the_early_exit_path(tmp_path, monkeypatch):
    trainer, model, timed = refit_trainer(tmp_path, monkeypatch, latency_costs_early_exit_rounds=2)
    with CaptureLogger(logging.get_logger("hf_eenet.trainer")) as captured:
        rows = trainer.fit_scheduler()
    first, second = trainer.early_exit_cost_timings  # two rounds
    assert timed == [[8, 8], [8, 8]]  # 2 batches of `latency_costs_batch_size` per round
    assert [row["budget"] for row in first["rows"]] == [1.0, *default_budget_grid(UNIFORM_COSTS)]  # every budget
    assert [row["budget"] for row in second["rows"]] == [1.0, *default_budget_grid(first["costs"])]  # refitted grid
    costs = model.config.exit_costs
    assert first["previous_costs"] == UNIFORM_COSTS and second["previous_costs"] == first["costs"]
    # (the same fit recomputed: equal up to the last bit, which vectorised BLAS sums may flip with memory alignment)
    assert first["costs"] == pytest.approx(exit_costs_from_measured_rows(first["rows"], UNIFORM_COSTS), rel=1e-12)
    assert costs == second["costs"]
    assert second["costs"] == pytest.approx(exit_costs_from_measured_rows(second["rows"], first["costs"]), rel=1e-12)
    assert model.config.exit_cost_source == "latency" and costs[0] > UNIFORM_COSTS[0]
    # refitted for the new costs: the grid starts above the new cheapest exit, and the dropped budgets are named
    assert model.exit_policy.budgets == default_budget_grid(costs) != default_budget_grid(UNIFORM_COSTS)
    assert "Budgets [0.3" in captured.out
    cached = trainer.cache_exit_outputs()
    assert simulated_budget_table(trainer.policies, **cached, exit_costs=costs) == rows


def test_refit_keeps_the_measured_segment_costs(tmp_path, monkeypatch):
    trainer, model, _ = refit_trainer(tmp_path, monkeypatch)
    measured = ExitCostModel(UNIFORM_COSTS, [0.02, 0.03], batch_size=8)

    def measure_exit_costs(dataset=None):
        model.config.set_exit_costs(UNIFORM_COSTS, source="latency", segment_costs=[0.02, 0.03], batch_size=8)
        return UNIFORM_COSTS

    monkeypatch.setattr(trainer, "measure_exit_costs", measure_exit_costs)
    rows = trainer.fit_scheduler()
    (timing,) = trainer.early_exit_cost_timings
    assert model.config.exit_segment_costs == [0.02, 0.03] and model.config.exit_cost_batch_size == 8
    refitted = exit_costs_from_measured_rows(timing["rows"], measured)
    assert model.config.exit_costs == pytest.approx(refitted, rel=1e-12)
    cost_model = model.exit_cost_model()
    assert model.exit_policy.budgets == default_budget_grid(cost_model)
    cached = trainer.cache_exit_outputs()
    assert simulated_budget_table(trainer.policies, **cached, exit_costs=cost_model) == rows


def test_refitted_costs_above_the_requested_budgets_fail_clearly(tmp_path, monkeypatch):
    trainer, model, _ = refit_trainer(tmp_path, monkeypatch, budgets=[0.3, 0.6])
    with pytest.raises(ValueError, match=r"Refitted on the early-exit path, the cheapest exit costs .* \[0.3, 0.6\]"):
        trainer.fit_scheduler()
    assert model.config.exit_costs == UNIFORM_COSTS  # nothing half-updated
    trainer, model, _ = refit_trainer(tmp_path, monkeypatch, default_budget=0.3)
    with pytest.raises(ValueError, match="`default_budget` 0.3 is below the smallest fitted budget"):
        trainer.fit_scheduler()


def test_refitting_costs_needs_a_number_of_batches(fitted):
    trainer = fitted[0]
    with pytest.raises(ValueError, match="num_batches"):
        trainer.refit_exit_costs_on_early_exit_path()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"latency_costs_batch_size": 0}, "latency_costs_batch_size"),
        ({"latency_costs_batch_size": 8, "latency_costs_early_exit_batches": 0}, "latency_costs_early_exit_batches"),
        ({"latency_costs_early_exit_batches": 2}, "set `latency_costs_batch_size`"),
        ({"latency_costs_early_exit_rounds": 0}, "latency_costs_early_exit_rounds"),
        ({"timing_batches_per_turn": 0}, "timing_batches_per_turn"),
        ({"latency_segment_costs": True}, "set `latency_costs_batch_size` to the deployment batch size"),
        ({"latency_segment_costs": True, "latency_costs_batch_size": 1}, r"\(>= 2\), got 1"),
        ({"budgets": [0.8, 0.5]}, "strictly increasing"),
        ({"budgets": [1.5]}, r"\(0, 1\)"),
        ({"default_budget": 0.0}, "default_budget"),
        ({"policy_kwargs": "{not json"}, "JSON"),
    ],
)
def test_bad_scheduler_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        scheduler_args(tmp_path, **kwargs)


def test_unlabelled_or_misfit_calibration_data_fails_clearly(tmp_path):
    unlabelled = token_dataset(16).map(lambda row: {"label": -1})
    trainer = ExitSchedulerTrainer(model=tiny_model(), args=scheduler_args(tmp_path), eval_dataset=unlabelled)
    with pytest.raises(ValueError, match="class ids"):
        trainer.fit_scheduler()
    trainer = ExitSchedulerTrainer(
        model=tiny_model(), args=scheduler_args(tmp_path, budgets=[0.1, 0.5]), eval_dataset=token_dataset(16)
    )
    with pytest.raises(ValueError, match="cheapest exit"):
        trainer.fit_scheduler()
    with pytest.raises(ValueError, match="empty"):
        trainer.fit_scheduler(Dataset.from_dict({"input_ids": [], "label": []}))
    sentiment = token_dataset(16).rename_column("label", "sentiment")
    with pytest.raises(ValueError, match=r"a `label` \(or `labels`\) column of class ids"):
        trainer.fit_scheduler(sentiment)


def test_stock_model_is_refused(tmp_path):
    stock = BertForSequenceClassification(
        BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    )
    with pytest.raises(ValueError, match="multi-exit"):
        ExitSchedulerTrainer(model=stock, args=scheduler_args(tmp_path), eval_dataset=token_dataset(8))


def test_two_process_ddp_fit_matches_one_process(tmp_path):
    script = str(REPO_ROOT / "tests" / "ddp_fit_scheduler_script.py")
    for command, output in (
        ([*TWO_PROCESSES, script], tmp_path / "ddp"),
        ([sys.executable, script], tmp_path / "single"),
    ):
        output.mkdir()
        result = run_launched([*command, str(output)])
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in range(2)]
    single = json.loads((tmp_path / "single" / "rank0.json").read_text())
    assert [r["world_size"] for r in reports] == [2, 2] and single["world_size"] == 1
    # every process saw the whole calibration split once (37 samples: the padding duplicates are dropped)
    assert all(r["num_samples"] == 37 for r in (*reports, single))
    assert reports[0]["policy"] == reports[1]["policy"]  # both processes store the same fitted policy
    assert reports[0]["baseline_rows"] == single["baseline_rows"]  # order-free baselines: as with one process
    assert reports[0]["policy_type"] == single["policy_type"] == "eenet"


def test_two_processes_with_single_process_arguments_fail_clearly(tmp_path):
    """Without `use_cpu` on a CPU machine, Trainer would let each process fit on its shard alone: refused."""
    script = str(REPO_ROOT / "tests" / "ddp_fit_scheduler_script.py")
    result = run_launched([*TWO_PROCESSES, script, str(tmp_path), "no-use-cpu"])
    assert result.returncode != 0
    assert "2 processes were launched, but these arguments run a single process" in result.stderr
    assert not list(tmp_path.glob("rank*.json"))


@pytest.mark.parametrize("flag", ["fp16_full_eval", "bf16_full_eval"])
def test_half_precision_full_eval_is_refused(tmp_path, flag):
    """The Trainer would round the model's weights in place before the fit and the save."""
    with pytest.raises(ValueError, match=f"`{flag}=True` makes the Trainer cast the model's weights"):
        ExitSchedulerTrainer(model=tiny_model(), args=scheduler_args(tmp_path, **{flag: True}))


def test_complementary_slices_get_their_own_budget_tables(tmp_path):
    """Fitting on `dev[:50%]` and testing on `dev[50%:]` in one directory keeps both tables."""
    names = {
        split: budget_table_path(tmp_path, split).name
        for split in ("dev", "dev[:50%]", "dev[50%:]", "train[:90%]", "train[90%:]", "train[10:20]")
    }
    assert len(set(names.values())) == len(names), names
    assert names["train[90%:]"] == "budget_table_train_from_90pct_to_end.json"


def test_latency_timing_on_a_split_too_small_warns(tmp_path, monkeypatch):
    """Fewer calibration samples than `latency_costs_batch_size`, or batches than asked: said, not silently shrunk."""
    args = scheduler_args(tmp_path, fit_baselines=False, latency_costs_batch_size=64, budgets=None)
    trainer = ExitSchedulerTrainer(model=tiny_model(), args=args, eval_dataset=token_dataset(24))
    with CaptureLogger(logging.get_logger("hf_eenet.trainer")) as captured:
        trainer.measure_exit_costs()
    assert "has 24 samples, fewer than `latency_costs_batch_size` 64" in captured.out
    trainer, _, timed = refit_trainer(tmp_path, monkeypatch, latency_costs_early_exit_batches=6)
    with CaptureLogger(logging.get_logger("hf_eenet.trainer")) as captured:
        trainer.fit_scheduler()
    assert timed[0] == [8, 8, 8, 8] and "holds 4 batch(es) of 8, fewer than the 6 asked" in captured.out


def test_dropping_the_last_calibration_batch_or_unconcatenated_outputs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="`dataloader_drop_last=True` would leave the last calibration"):
        ExitSchedulerTrainer(model=tiny_model(), args=scheduler_args(tmp_path, dataloader_drop_last=True))
    with pytest.raises(ValueError, match="`eval_do_concat_batches=False` would keep the cached exit outputs"):
        ExitSchedulerTrainer(model=tiny_model(), args=scheduler_args(tmp_path, eval_do_concat_batches=False))


def test_a_dict_of_evaluation_sets_names_one_calibration_split(tmp_path):
    """`Trainer` takes named evaluation sets; the scheduler is fitted on exactly one."""
    dev, other = token_dataset(64), token_dataset(48, seed=3)
    with pytest.raises(ValueError, match=r"one calibration split, but `eval_dataset` names 2: \['a', 'b'\]"):
        ExitSchedulerTrainer(model=tiny_model(), args=scheduler_args(tmp_path), eval_dataset={"a": dev, "b": other})
    named = ExitSchedulerTrainer(model=tiny_model(), args=scheduler_args(tmp_path), eval_dataset={"dev": dev})
    plain = ExitSchedulerTrainer(model=tiny_model(), args=scheduler_args(tmp_path), eval_dataset=dev)
    assert named.eval_dataset is dev
    torch.testing.assert_close(named.cache_exit_outputs()["exit_logits"], plain.cache_exit_outputs()["exit_logits"])


def test_a_new_fit_or_training_forgets_the_earlier_policys_card_tables(tmp_path):
    from hf_eenet.trainer import EarlyExitTrainer, EarlyExitTrainingArguments

    model = tiny_model()
    trainer = ExitSchedulerTrainer(model=model, args=scheduler_args(tmp_path), eval_dataset=token_dataset(64))
    trainer.fit_scheduler(split="dev")
    trainer.evaluate_budgets(token_dataset(48, seed=3), split="test", measured=False)
    assert {t["split"] for t in model.model_card_data.budget_tables} == {"dev", "test"}
    trainer.fit_scheduler(split="dev")  # a new policy: the test table described the old one
    assert {t["split"] for t in model.model_card_data.budget_tables} == {"dev"}
    args = EarlyExitTrainingArguments(str(tmp_path / "exits"), max_steps=1, use_cpu=True, report_to="none")
    EarlyExitTrainer(model=model, args=args, train_dataset=token_dataset(16)).train()
    card = model.model_card_data
    assert card.budget_tables == [] and card.calibration_split is None and card.policy_choices == {}
