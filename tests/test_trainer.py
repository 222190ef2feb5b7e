import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import HfArgumentParser, TrainingArguments  # noqa: E402

from hf_eenet import EENetBertConfig, EENetBertForSequenceClassification  # noqa: E402
from hf_eenet.trainer import (  # noqa: E402
    EarlyExitTrainer,
    EarlyExitTrainingArguments,
    compute_exit_accuracies,
    end_distributed_run,
    exit_head_parameters,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def tiny_config(**kwargs) -> EENetBertConfig:
    defaults = {
        "vocab_size": 99,
        "hidden_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "intermediate_size": 37,
        "num_labels": 2,
    }
    return EENetBertConfig(**{**defaults, **kwargs})


def tiny_model(seed: int = 0, **kwargs) -> EENetBertForSequenceClassification:
    torch.manual_seed(seed)
    return EENetBertForSequenceClassification(tiny_config(**kwargs))


def token_dataset(num_samples: int = 64, length: int = 8, seed: int = 1) -> Dataset:
    """Random tokens from the lower (label 0) or upper (label 1) half of the vocabulary: learnable by every exit."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (num_samples,), generator=generator)
    input_ids = torch.randint(1, 50, (num_samples, length), generator=generator) + 49 * labels[:, None]
    return Dataset.from_dict({"input_ids": input_ids.tolist(), "label": labels.tolist()})


def make_args(tmp_path, **kwargs) -> EarlyExitTrainingArguments:
    defaults = {
        "output_dir": str(tmp_path / "out"),
        "use_cpu": True,
        "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 32,
        "learning_rate": 1e-3,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "seed": 0,
    }
    return EarlyExitTrainingArguments(**{**defaults, **kwargs})


def batch_of(dataset: Dataset, size: int = 8) -> dict[str, torch.Tensor]:
    rows = dataset[:size]
    return {"input_ids": torch.tensor(rows["input_ids"]), "labels": torch.tensor(rows["label"])}


# --- arguments ------------------------------------------------------------------------------------------------------
def test_arguments_defaults_validation_and_parser(tmp_path):
    args = make_args(tmp_path)
    assert args.ddp_find_unused_parameters is False
    assert args.exit_head_learning_rate == 1e-3 and args.distillation_weight == 0.0 and not args.retrofit
    (parsed,) = HfArgumentParser(EarlyExitTrainingArguments).parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--exit_loss_weights",
            "1",
            "2",
            "3",
            "--retrofit",
            "--distillation_weight",
            "0.5",
        ]
    )
    assert parsed.exit_loss_weights == [1.0, 2.0, 3.0] and parsed.retrofit and parsed.distillation_weight == 0.5
    for bad in (
        {"distillation_start": 1.5},
        {"distillation_start": 1.0},  # would never switch distillation on
        {"distillation_temperature": 0.0},
        {"distillation_weight": -1.0},
        {"exit_head_learning_rate": 0.0},
        {"exit_loss_weights": [0.0, 0.0, 0.0]},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            make_args(tmp_path, **bad)


def test_exit_weights_must_match_exits(tmp_path):
    with pytest.raises(ValueError, match="must hold 3 finite"):
        EarlyExitTrainer(model=tiny_model(), args=make_args(tmp_path, exit_loss_weights=[1.0, 1.0]))


def test_rejects_models_without_exits(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    stock = BertForSequenceClassification(
        BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37)
    )
    with pytest.raises(ValueError, match="multi-exit"):
        EarlyExitTrainer(model=stock, args=make_args(tmp_path))


# --- loss -----------------------------------------------------------------------------------------------------------
def test_loss_is_the_models_multi_exit_loss_and_weights_override_it(tmp_path):
    model = tiny_model()
    dataset = token_dataset()
    batch = batch_of(dataset)
    trainer = EarlyExitTrainer(model=model, args=make_args(tmp_path))
    model.eval()
    with torch.no_grad():
        loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
        expected = model(**batch).loss  # config weights 1, 2, 3
        torch.testing.assert_close(loss, expected)
        assert outputs.all_exit_logits.shape == (8, 3, 2)

        trainer = EarlyExitTrainer(model=model, args=make_args(tmp_path, exit_loss_weights=[1.0, 0.0, 0.0]))
        loss = trainer.compute_loss(model, dict(batch))
        exit0 = F.cross_entropy(model(**batch).all_exit_logits[:, 0], batch["labels"])
        torch.testing.assert_close(loss, exit0)
    with pytest.raises(ValueError, match="labels"):
        trainer.compute_loss(model, {"input_ids": batch["input_ids"]})


def test_training_reduces_the_loss_and_logs_every_exit(tmp_path):
    model = tiny_model()
    train, evaluation = token_dataset(128, seed=1), token_dataset(64, seed=2)
    args = make_args(tmp_path, max_steps=20, logging_steps=5, learning_rate=3e-3, lr_scheduler_type="constant")
    trainer = EarlyExitTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=evaluation, compute_metrics=compute_exit_accuracies
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    metrics = trainer.evaluate()
    after = metrics["eval_loss"]
    assert after < 0.5 * before, (before, after)
    assert metrics["eval_accuracy"] == metrics["eval_exit_2_accuracy"] >= 0.9
    assert all(metrics[f"eval_exit_{k}_accuracy"] >= 0.75 for k in range(3)), metrics
    train_logs = [log for log in trainer.state.log_history if "loss" in log]
    assert train_logs and all(f"exit_{k}_loss" in log for log in train_logs for k in range(3))
    assert all("distillation_loss" not in log for log in train_logs)  # off by default
    assert train_logs[-1]["exit_2_loss"] < train_logs[0]["exit_2_loss"]


def test_training_drops_a_stored_exit_policy(tmp_path, caplog):
    """A policy fitted on the exits before training no longer matches them: `train` drops it with a warning."""
    from hf_eenet import ConfidenceThresholdPolicy

    model = tiny_model()
    data = token_dataset(32)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(data["input_ids"]), output_all_exits=True).all_exit_logits
    policy = ConfidenceThresholdPolicy(3).fit(logits, torch.tensor(data["label"]), model.config.exit_costs, [0.7])
    model.set_exit_policy(policy)
    model.config.default_budget = 0.7
    trainer = EarlyExitTrainer(model=model, args=make_args(tmp_path, max_steps=1), train_dataset=data)
    with caplog.at_level("WARNING", logger="hf_eenet.trainer"):
        trainer.train()
    assert model.exit_policy is None and model.config.exit_policy is None and model.config.default_budget is None
    assert "exit policy was fitted on its exits before this training" in caplog.text


def test_per_exit_losses_of_one_train_call_do_not_leak_into_the_next(tmp_path):
    data = token_dataset(64)
    args = make_args(tmp_path, max_steps=3, logging_steps=2, lr_scheduler_type="constant")
    trainer = EarlyExitTrainer(model=tiny_model(), args=args, train_dataset=data)
    trainer.train()  # step 3's losses are buffered, never logged (as stock logs no partial interval)
    trainer.train()
    first = next(log for log in trainer.state.log_history if "loss" in log)
    weights = trainer.exit_loss_weights
    weighted = sum(w * first[f"exit_{k}_loss"] for k, w in enumerate(weights)) / sum(weights)
    assert weighted == pytest.approx(first["loss"], abs=2e-4)


# --- optimizer ------------------------------------------------------------------------------------------------------
def test_exit_heads_get_their_own_learning_rate(tmp_path):
    model = tiny_model()
    args = make_args(tmp_path, learning_rate=5e-5, exit_head_learning_rate=1e-3, weight_decay=0.01)
    trainer = EarlyExitTrainer(model=model, args=args)
    optimizer = trainer.create_optimizer()
    heads = {id(p) for p in model.exit_heads.parameters()}
    assert heads and heads == {id(p) for p in exit_head_parameters(model)}
    seen = []
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        seen.extend(ids)
        if group["name"].startswith("exit_heads"):
            assert ids <= heads and group["lr"] == 1e-3
        else:
            assert not ids & heads and group["lr"] == 5e-5
        assert group["weight_decay"] == (0.0 if group["name"].endswith("no_decay") else 0.01)
    assert sorted(g["name"] for g in optimizer.param_groups) == [
        "backbone",
        "backbone_no_decay",
        "exit_heads",
        "exit_heads_no_decay",
    ]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # every parameter exactly once
    assert id(model.classifier.weight) not in heads and id(model.bert.pooler.dense.weight) not in heads
    assert id(model.exit_heads[0].classifier.bias) in {
        id(p) for g in optimizer.param_groups for p in g["params"] if g["name"] == "exit_heads_no_decay"
    }


def test_one_learning_rate_when_exit_head_rate_is_none_or_plain_arguments(tmp_path):
    trainer = EarlyExitTrainer(model=tiny_model(), args=make_args(tmp_path, exit_head_learning_rate=None))
    assert {g["lr"] for g in trainer.create_optimizer().param_groups} == {1e-3}
    plain = TrainingArguments(output_dir=str(tmp_path / "plain"), use_cpu=True, learning_rate=3e-5, report_to="none")
    trainer = EarlyExitTrainer(model=tiny_model(), args=plain)
    lrs = {g["name"]: g["lr"] for g in trainer.create_optimizer().param_groups}
    assert lrs["backbone"] == 3e-5 and lrs["exit_heads"] == 1e-3  # the early-exit defaults apply
    assert trainer.args.ddp_find_unused_parameters is False


def test_scheduler_scales_both_learning_rates(tmp_path):
    model = tiny_model()
    args = make_args(
        tmp_path, max_steps=4, learning_rate=1e-4, exit_head_learning_rate=1e-2, lr_scheduler_type="linear"
    )
    trainer = EarlyExitTrainer(model=model, args=args, train_dataset=token_dataset(64))
    trainer.train()
    lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs["backbone"] == pytest.approx(0.0) and lrs["exit_heads"] == pytest.approx(0.0)  # linear decay to 0
    initial = {g["name"]: g["initial_lr"] for g in trainer.optimizer.param_groups}
    assert initial["backbone"] == 1e-4 and initial["exit_heads"] == 1e-2


# --- retrofit -------------------------------------------------------------------------------------------------------
def test_retrofit_trains_only_the_exit_heads(tmp_path):
    model = tiny_model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    modes = {}

    def record_mode(name):
        def hook(module, inputs, output):
            modes.setdefault(name, module.training)

        return hook

    model.bert.encoder.layer[0].register_forward_hook(record_mode("encoder"))
    model.exit_heads[0].dropout.register_forward_hook(record_mode("head_dropout"))
    model.dropout.register_forward_hook(record_mode("classifier_dropout"))
    args = make_args(tmp_path, retrofit=True, max_steps=5, weight_decay=0.1, learning_rate=1e-2)
    trainer = EarlyExitTrainer(model=model, args=args, train_dataset=token_dataset(64))
    trainer.train()
    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed, "the exit heads did not train"
    assert all(name.startswith("exit_heads.") for name in changed), changed
    heads = {name for name in before if name.startswith("exit_heads.") and name.endswith("weight")}
    assert heads <= changed
    assert all(p.requires_grad == name.startswith("exit_heads.") for name, p in model.named_parameters())
    # frozen modules ran in eval mode (no dropout), the exit heads in train mode
    assert modes == {"encoder": False, "head_dropout": True, "classifier_dropout": False}
    group_names = {g["name"] for g in trainer.optimizer.param_groups}
    assert group_names == {"exit_heads", "exit_heads_no_decay"}


def test_retrofit_needs_exit_heads(tmp_path):
    model = tiny_model(exit_layers=[3])
    with pytest.raises(ValueError, match="has none"):
        EarlyExitTrainer(model=model, args=make_args(tmp_path, retrofit=True))


# --- self-distillation ----------------------------------------------------------------------------------------------
def test_distillation_switches_on_after_its_fraction_of_training(tmp_path):
    model = tiny_model()
    args = make_args(tmp_path, max_steps=6, distillation_weight=0.5, distillation_start=0.5, logging_steps=1)
    trainer = EarlyExitTrainer(model=model, args=args, train_dataset=token_dataset(96))
    steps = []
    original = trainer.distillation_loss

    def recording(all_exit_logits):
        steps.append(trainer.state.global_step)
        return original(all_exit_logits)

    trainer.distillation_loss = recording
    trainer.train()
    assert steps == [3, 4, 5]  # steps 0-2 (first half) without, 3-5 with
    logged = [log["step"] for log in trainer.state.log_history if "distillation_loss" in log]
    assert logged == [4, 5, 6]


def test_distillation_term_value(tmp_path):
    model = tiny_model(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    args = make_args(tmp_path, distillation_weight=0.5, distillation_temperature=2.0, distillation_start=0.5)
    trainer = EarlyExitTrainer(model=model, args=args)
    batch = batch_of(token_dataset())
    model.train()
    trainer.state.max_steps, trainer.state.global_step = 10, 4
    assert not trainer.distillation_active
    with torch.no_grad():
        plain = trainer.compute_loss(model, dict(batch))
        trainer.state.global_step = 5
        assert trainer.distillation_active
        with_distillation = trainer.compute_loss(model, dict(batch))
        logits = model(input_ids=batch["input_ids"]).all_exit_logits / 2.0
    teacher = F.log_softmax(logits[:, 2], -1)
    kl = [F.kl_div(F.log_softmax(logits[:, k], -1), teacher, log_target=True, reduction="batchmean") for k in (0, 1)]
    expected = 4.0 * (1.0 * kl[0] + 2.0 * kl[1]) / 3.0  # T^2, weighted by the exit weights 1, 2
    torch.testing.assert_close(with_distillation - plain, 0.5 * expected)
    assert expected > 0
    model.eval()  # evaluation: the multi-exit loss alone
    with torch.no_grad():
        torch.testing.assert_close(trainer.compute_loss(model, dict(batch)), plain)


def test_distillation_gradient_does_not_reach_the_last_exit(tmp_path):
    model = tiny_model(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    args = make_args(tmp_path, distillation_weight=1.0, distillation_start=0.0, exit_loss_weights=[1.0, 1.0, 1.0])
    trainer = EarlyExitTrainer(model=model, args=args)
    model.train()
    logits = model(input_ids=batch_of(token_dataset())["input_ids"]).all_exit_logits.detach().requires_grad_()
    trainer.distillation_loss(logits).backward()
    assert logits.grad[:, 2].abs().max() == 0 and logits.grad[:, :2].abs().max() > 0


# --- distributed ----------------------------------------------------------------------------------------------------
DDP_TRAIN_SCRIPT = str(REPO_ROOT / "tests" / "ddp_train_script.py")
TWO_PROCESSES = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def run_launched(command: list[str]) -> subprocess.CompletedProcess:
    """Run a (launcher) command from the repository root, offline, one thread per process; output captured."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("mode", ["full", "retrofit"])
def test_two_process_ddp_run_makes_the_same_kind_of_model_as_one_process(tmp_path, mode):
    flags = ["retrofit"] if mode == "retrofit" else []
    result = run_launched([*TWO_PROCESSES, DDP_TRAIN_SCRIPT, str(tmp_path / "ddp"), *flags])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "find_unused_parameters=True" not in result.stderr  # DDP's warning when it found no unused parameters
    reports = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        assert report["world_size"] == 2 and report["ddp"] and report["find_unused_parameters"] is False
        assert report["global_step"] == 4
        assert report["final_checksum"] != report["initial_checksum"]
        if mode == "retrofit":  # only the exit heads train, under DDP too
            assert report["final_backbone_checksum"] == report["initial_backbone_checksum"]
    assert reports[0]["initial_checksum"] == reports[1]["initial_checksum"]
    assert reports[0]["final_checksum"] == pytest.approx(reports[1]["final_checksum"], rel=1e-12)  # synchronised
    single = run_launched([sys.executable, DDP_TRAIN_SCRIPT, str(tmp_path / "single"), *flags])
    assert single.returncode == 0, single.stderr[-3000:]
    assert json.loads((tmp_path / "single" / "rank0.json").read_text())["world_size"] == 1
    ddp_model = EENetBertForSequenceClassification.from_pretrained(tmp_path / "ddp" / "model")
    single_model = EENetBertForSequenceClassification.from_pretrained(tmp_path / "single" / "model")
    assert ddp_model.config.to_diff_dict() == single_model.config.to_diff_dict()
    ddp_state, single_state = ddp_model.state_dict(), single_model.state_dict()
    assert {k: v.shape for k, v in ddp_state.items()} == {k: v.shape for k, v in single_state.items()}
    saved = sum(p.double().abs().sum() for p in ddp_model.parameters())
    assert float(saved) == pytest.approx(reports[0]["final_checksum"], rel=1e-6)  # what the ranks trained


def test_accelerate_launch_runs_the_exit_trainer_on_two_processes(tmp_path):
    """`accelerate launch` (its torchrun path; `--multi_gpu` only picks that launcher) on CPUs, gloo, as torchrun."""
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    accelerate += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    result = run_launched([*accelerate, DDP_TRAIN_SCRIPT, str(tmp_path)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(report["world_size"] == 2 and report["ddp"] for report in reports)
    assert reports[0]["final_checksum"] == pytest.approx(reports[1]["final_checksum"], rel=1e-12)
    assert EENetBertForSequenceClassification.from_pretrained(tmp_path / "model").config.num_exits == 3


def test_two_processes_without_use_cpu_are_refused_by_the_exit_trainer(tmp_path):
    """Without `use_cpu` on a CPU machine, Trainer would let each process train on its own: refused, clearly."""
    result = run_launched([*TWO_PROCESSES, DDP_TRAIN_SCRIPT, str(tmp_path), "no-use-cpu"])
    assert result.returncode != 0
    assert "2 processes were launched, but these arguments run a single process" in result.stderr
    assert not list(tmp_path.glob("rank*.json"))


def test_end_distributed_run_destroys_the_process_group(tmp_path):
    end_distributed_run()  # no process group: nothing to do
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert torch.distributed.is_initialized()
    end_distributed_run()
    assert not torch.distributed.is_initialized()
