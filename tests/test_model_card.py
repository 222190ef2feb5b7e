"""Model cards: rendering, parsing back, persistence with the model, push_to_hub (Hub faked at the upload boundary)."""

from __future__ import annotations

import json
import re
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import matplotlib
import pytest
import torch
from conftest import random_text_batch, tiny_bert_config
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.utils import filter_repo_objects

from hf_eenet import (
    ConfidenceThresholdPolicy,
    EENetBertForSequenceClassification,
    EENetResNetConfig,
    EENetResNetForImageClassification,
)
from hf_eenet.model_card import CARD_DATA_FILE, EENetModelCardData, render_model_card
from hf_eenet.models.exit_policies import PatiencePolicy, StaticExitPolicy

matplotlib.use("Agg")


def make_plot(path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots()
    axis.plot([0.3, 0.5, 1.0], [0.85, 0.87, 0.88])
    figure.savefig(path)
    plt.close(figure)
    return path


@pytest.fixture
def carded_model(tmp_path):
    model = EENetBertForSequenceClassification(tiny_bert_config(num_labels=2)).eval()
    batch = random_text_batch(16)
    with torch.no_grad():
        logits = model(**batch, output_all_exits=True).all_exit_logits
    policy = ConfidenceThresholdPolicy(model.config.num_exits).fit(
        logits, torch.randint(0, 2, (16,)), model.config.exit_costs, budgets=[0.4, 0.6]
    )
    model.set_exit_policy(policy)
    model.model_card_data = EENetModelCardData(
        model_name="EENet MiniLM SST-2",
        base_model="sentence-transformers/all-MiniLM-L6-v2",
        language="en",
        license="apache-2.0",
        dataset_id="nyu-mll/glue",
        dataset_name="SST-2",
        dataset_config="sst2",
        exit_accuracies=[0.80, 0.85, 0.88],
        exit_accuracy_split="test",
        plot_path=str(make_plot(tmp_path / "plot.png")),
        training_hyperparameters={"learning_rate": 5e-5, "exit_head_learning_rate": 1e-3},
        fitting_hyperparameters={"calibration split": "validation"},
        policy_choices={"0.4": "max-prob (global)", "0.6": "regret (global), searched allocation"},
    )
    rows = [
        {"policy": "confidence-threshold", "budget": 0.4, "accuracy": 0.861, "cost": 0.398},
        {"policy": "confidence-threshold", "budget": 0.6, "accuracy": 0.874, "cost": 0.597},
        {"policy": "oracle", "budget": 0.4, "accuracy": 0.93, "cost": 0.27},
    ]
    model.model_card_data.add_budget_table("simulated", "test", rows)
    model.model_card_data.add_budget_table("measured", "test", [{**rows[0], "ms_per_sample": 1.5}])
    return model


def test_card_renders_every_section_and_parses_back(carded_model, tmp_path):
    card = render_model_card(carded_model)
    text = str(card)
    for heading in (
        "## How to use",
        "## Exits",
        "## Budget → accuracy and cost",
        "### Simulated on test",
        "### Measured on test",
        "## Training",
        "## Exit policy fitting",
        "## Framework versions",
    ):
        assert heading in text, heading
    assert 'pipeline("text-classification", model="path/to/this-model", budget=0.5)' in text
    assert "| 2 | 3 | 1.0" in text and "| cls | 88.00 % |" in text  # the last exit's row: pooling, accuracy
    assert "| exit | after block | relative cost | token pooling | accuracy (test, simulated) |" in text
    assert "| confidence-threshold | 0.40 | 86.10 % | 0.398 | 1.5 |" in text  # the measured row
    assert "![Accuracy against average cost for every policy](budget_plot.png)" in text
    assert "| learning_rate | 5e-05 |" in text and "| fitted budgets | 0.4, 0.6 |" in text
    assert "| budget | choice |" in text and "| 0.6 | regret (global), searched allocation |" in text
    carded_model.set_exit_policy(carded_model.exit_policy)  # a policy stored anew: the earlier fit's record goes
    assert carded_model.model_card_data.policy_choices == {} and "| budget | choice |" not in str(
        render_model_card(carded_model)
    )

    card.save(tmp_path / "README.md")
    parsed = ModelCard.load(tmp_path / "README.md")
    assert parsed.data.pipeline_tag == "text-classification"
    assert parsed.data.library_name == "transformers"
    assert {"hf_eenet", "early-exit"} <= set(parsed.data.tags)
    assert parsed.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert parsed.data.datasets == ["nyu-mll/glue"]
    results = parsed.data.eval_results
    # the stored policy's held-out rows, measured where they were measured
    assert [r.metric_value for r in results] == [0.861]
    assert results[0].dataset_split == "test"
    assert results[0].metric_name.startswith("accuracy at budget 0.4 (measured")


def test_model_index_leaves_out_the_calibration_split(carded_model):
    data = carded_model.model_card_data
    data.budget_tables = [t for t in data.budget_tables if t["kind"] == "simulated"]
    data.add_budget_table("simulated", "validation", [dict(data.budget_tables[0]["rows"][0], accuracy=0.99)])
    data.calibration_split = "validation"
    card = render_model_card(carded_model)
    assert [(r.dataset_split, r.metric_value) for r in card.data.eval_results] == [("test", 0.861), ("test", 0.874)]
    assert "### Simulated on validation (the calibration split the scheduler was fitted on)" in str(card)


def test_card_renders_identically_and_without_data(carded_model):
    assert str(render_model_card(carded_model)) == str(render_model_card(carded_model))
    bare = EENetBertForSequenceClassification(tiny_bert_config())
    text = str(render_model_card(bare))
    assert "No budget evaluation has been recorded" in text and "No exit policy has been fitted" in text


def test_save_pretrained_writes_card_and_from_pretrained_restores_its_data(carded_model, tmp_path):
    out = tmp_path / "model"
    carded_model.save_pretrained(out)
    assert {"README.md", "config.json", "model.safetensors", "eenet_card_data.json", "budget_plot.png"} <= {
        p.name for p in out.iterdir()
    }
    loaded = EENetBertForSequenceClassification.from_pretrained(out)
    assert loaded.model_card_data.budget_tables == carded_model.model_card_data.budget_tables
    again = tmp_path / "again"
    loaded.save_pretrained(again)
    assert (again / "README.md").read_text() == (out / "README.md").read_text()
    assert (again / "budget_plot.png").read_bytes() == (out / "budget_plot.png").read_bytes()


def test_an_existing_handwritten_readme_is_kept_unless_asked(carded_model, tmp_path):
    (tmp_path / "README.md").write_text("# My own notes\n")
    carded_model.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "# My own notes\n"
    carded_model.save_pretrained(tmp_path, overwrite_model_card=True)
    assert "## Budget → accuracy and cost" in (tmp_path / "README.md").read_text()


def test_bad_card_data_is_rejected(carded_model, tmp_path):
    with pytest.raises(ValueError, match="Unknown model card fields"):
        EENetModelCardData.from_dict({"model_name": "x", "colour": "blue"})
    with pytest.raises(ValueError, match="'simulated' or 'measured'"):
        carded_model.model_card_data.add_budget_table("guessed", "test", [])
    carded_model.model_card_data.exit_accuracies = [0.5]
    with pytest.raises(ValueError, match="1 values for 3 exits"):
        render_model_card(carded_model)
    carded_model.model_card_data.exit_accuracies = None
    carded_model.model_card_data.plot_path = str(tmp_path / "missing.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        carded_model.save_pretrained(tmp_path / "out")


class FakeHub:
    """Stands in for the Hub at the HTTP boundary of `HfApi`: records what would be created and uploaded."""

    def __init__(self, monkeypatch, remote_readme: bool):
        self.repos, self.branches, self.uploads = [], [], []
        hub = self

        def create_repo(api, repo_id, **kwargs):
            hub.repos.append({"repo_id": repo_id, **kwargs})
            return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"user/{repo_id}")

        def create_branch(api, repo_id, *, branch, exist_ok=False, **kwargs):
            hub.branches.append({"repo_id": repo_id, "branch": branch, "exist_ok": exist_ok})

        def file_exists(api, repo_id, filename, **kwargs):
            return remote_readme and filename == "README.md"

        def upload_folder(api, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
            names = [p.name for p in Path(folder_path).iterdir() if p.is_file()]
            names = filter_repo_objects(names, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
            files = {name: (Path(folder_path) / name).read_bytes() for name in names}
            hub.uploads.append({"repo_id": repo_id, "files": files, **kwargs})
            commit = SimpleNamespace(commit_url=f"https://example.invalid/{repo_id}")
            if not kwargs.get("run_as_future"):
                return commit
            future = Future()  # the Trainer pushes its checkpoints in the background
            future.set_result(commit)
            return future

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "file_exists", file_exists)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)


def test_push_to_hub_uploads_config_weights_and_our_card(carded_model, monkeypatch):
    hub = FakeHub(monkeypatch, remote_readme=False)
    carded_model.push_to_hub("org/eenet-tiny", commit_message="first")
    (upload,) = hub.uploads
    assert upload["repo_id"] == "org/eenet-tiny" and upload["commit_message"] == "first"
    files = upload["files"]
    assert {"config.json", "model.safetensors", "README.md", "eenet_card_data.json", "budget_plot.png"} <= set(files)
    readme = files["README.md"].decode()
    assert 'pipeline("text-classification", model="org/eenet-tiny", budget=0.5)' in readme
    assert json.loads(files["config.json"])["exit_policy"]["policy_type"] == "confidence-threshold"


def test_push_to_hub_keeps_an_existing_remote_card_unless_asked(carded_model, monkeypatch):
    hub = FakeHub(monkeypatch, remote_readme=True)
    carded_model.push_to_hub("org/eenet-tiny")
    assert "README.md" not in hub.uploads[0]["files"] and "model.safetensors" in hub.uploads[0]["files"]
    carded_model.push_to_hub("org/eenet-tiny", overwrite_model_card=True)
    assert "README.md" in hub.uploads[1]["files"]


def test_each_push_names_its_own_repo_and_stores_no_repo_id(carded_model, monkeypatch, tmp_path):
    hub = FakeHub(monkeypatch, remote_readme=False)
    carded_model.push_to_hub("org/a")
    downloaded = tmp_path / "a"  # what a user of org/a gets, loaded and pushed elsewhere
    downloaded.mkdir()
    for name, content in hub.uploads[0]["files"].items():
        (downloaded / name).write_bytes(content)
    EENetBertForSequenceClassification.from_pretrained(downloaded).push_to_hub("someone-else/b")
    carded_model.push_to_hub("org/c")
    assert [upload["repo_id"] for upload in hub.uploads] == ["org/a", "someone-else/b", "org/c"]
    for upload in hub.uploads:
        assert f'model="{upload["repo_id"]}"' in upload["files"]["README.md"].decode()
        assert json.loads(upload["files"][CARD_DATA_FILE])["model_id"] is None
    assert carded_model.model_card_data.model_id is None
    carded_model.save_pretrained(tmp_path / "local")
    assert 'model="path/to/this-model"' in (tmp_path / "local" / "README.md").read_text()


def test_push_to_hub_takes_the_stock_arguments(carded_model, monkeypatch):
    hub = FakeHub(monkeypatch, remote_readme=False)
    carded_model.push_to_hub(
        "org/eenet-tiny", tags=["my-tag"], commit_description="details", revision="v2", private=True
    )
    (upload,) = hub.uploads
    assert upload["commit_description"] == "details" and upload["revision"] == "v2" and not upload["create_pr"]
    assert hub.repos[0]["private"] is True
    assert hub.branches == [{"repo_id": "org/eenet-tiny", "branch": "v2", "exist_ok": True}]
    card = ModelCard(upload["files"]["README.md"].decode())
    assert {"my-tag", "hf_eenet"} <= set(card.data.tags) and "my-tag" not in carded_model.model_card_data.tags
    carded_model.push_to_hub("org/eenet-tiny", revision="v3", create_pr=True)  # a pull request: no branch
    assert len(hub.branches) == 1 and hub.uploads[1]["create_pr"] and hub.uploads[1]["revision"] == "v3"
    with pytest.raises(TypeError, match="commit_desc"):
        carded_model.push_to_hub("org/eenet-tiny", commit_desc="a typo is not swallowed")


def test_save_pretrained_push_to_hub_uploads_what_the_save_wrote(carded_model, monkeypatch, tmp_path):
    hub = FakeHub(monkeypatch, remote_readme=False)
    out = tmp_path / "eenet-tiny"
    out.mkdir()
    (out / "notes.txt").write_text("written before the save: not part of it")
    carded_model.save_pretrained(out, push_to_hub=True, remote_code=True, commit_message="save", private=True)
    (upload,) = hub.uploads
    assert hub.repos[0] == {"repo_id": "eenet-tiny", "private": True, "exist_ok": True}  # the directory's name
    assert upload["repo_id"] == "user/eenet-tiny" and upload["commit_message"] == "save"
    saved = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "notes.txt"}
    assert upload["files"] == saved
    assert {"README.md", CARD_DATA_FILE, "budget_plot.png", "config.json", "early_exit.py"} <= set(saved)
    readme = saved["README.md"].decode()
    assert 'model="user/eenet-tiny", trust_remote_code=True' in readme and "generated by hf_eenet" in readme
    assert "auto_map" in json.loads(saved["config.json"])


def tiny_tokenizer(directory: Path):
    from transformers import BertTokenizerFast

    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[f"w{i}" for i in range(94)]]) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab))


def run_card_snippets(directory: Path) -> list[dict]:
    """Execute the Python snippets of the README in `directory`; returns each snippet's namespace."""
    readme = (directory / "README.md").read_text()
    namespaces = []
    for code in re.findall(r"```python\n(.*?)```", readme, re.S):
        namespaces.append({})
        exec(compile(code, str(directory / "README.md"), "exec"), namespaces[-1])
    assert len(namespaces) == 2  # the pipeline and the Auto classes
    return namespaces


def test_card_of_a_stored_policy_that_takes_no_budget(tmp_path):
    model = EENetBertForSequenceClassification(tiny_bert_config()).eval()
    for policy in (PatiencePolicy(model.config.num_exits, patience=1), StaticExitPolicy(model.config.num_exits)):
        model.set_exit_policy(policy)
        text = str(render_model_card(model))
        assert "The stored policy runs on every call without a budget" in text
        assert "budget=" not in "".join(re.findall(r"```python\n(.*?)```", text, re.S))
        assert "smallest fitted" not in text and "fitted budgets" not in text and "learned exit scheduler" not in text
    # the saved static policy (exit 0) runs in the card's snippets (with `budget=1.0` the full model would run)
    model.model_card_data = EENetModelCardData(model_id=str(tmp_path))
    model.save_pretrained(tmp_path)
    tiny_tokenizer(tmp_path).save_pretrained(tmp_path)
    pipeline_snippet, auto_snippet = run_card_snippets(tmp_path)
    assert pipeline_snippet["classifier"]("w1 w2")[0]["exit_index"] == 0
    assert auto_snippet["outputs"].exit_index.tolist() == [0]


def test_image_card_snippets_run(tmp_path, monkeypatch):
    from PIL import Image
    from test_modeling_eenet_vision import VIT
    from transformers import ViTImageProcessor

    model = VIT.model()
    model.model_card_data = EENetModelCardData(model_id=str(tmp_path / "model"))
    model.save_pretrained(tmp_path / "model")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (40, 40), (200, 30, 90)).save("image.png")  # the snippets' example input
    pipeline_snippet, auto_snippet = run_card_snippets(tmp_path / "model")
    assert "Image" in pipeline_snippet and "Image" in auto_snippet  # each snippet imports it
    assert auto_snippet["outputs"].logits.shape == (1, model.config.num_labels)


def test_card_data_load_from_the_subfolder(carded_model, tmp_path):
    carded_model.save_pretrained(tmp_path)
    carded_model.model_card_data.model_name = "in the subfolder"
    carded_model.save_pretrained(tmp_path / "sub")
    loaded = EENetBertForSequenceClassification.from_pretrained(tmp_path, subfolder="sub")
    assert loaded.model_card_data.model_name == "in the subfolder"
    (tmp_path / "sub" / CARD_DATA_FILE).unlink()
    loaded = EENetBertForSequenceClassification.from_pretrained(tmp_path, subfolder="sub")
    assert getattr(loaded, "model_card_data", None) is None  # not the card data of the directory above


def test_trainer_push_to_hub_uploads_the_same_card(carded_model, monkeypatch, tmp_path):
    from datasets import Dataset

    from hf_eenet.trainer import EarlyExitTrainer, EarlyExitTrainingArguments

    hub = FakeHub(monkeypatch, remote_readme=False)
    args = EarlyExitTrainingArguments(
        str(tmp_path / "out"), hub_model_id="org/eenet-tiny", report_to="none", use_cpu=True, max_steps=1
    )
    trainer = EarlyExitTrainer(model=carded_model, args=args, train_dataset=Dataset.from_dict({"input_ids": [[1, 2]]}))
    trainer.push_to_hub()
    (upload,) = hub.uploads
    readme = upload["files"]["README.md"].decode()
    assert "generated by hf_eenet" in readme and "### Simulated on test" in readme
    assert 'pipeline("text-classification", model="org/eenet-tiny", budget=0.5)' in readme
    assert "model.safetensors" in upload["files"] and "eenet_card_data.json" in upload["files"]
    assert json.loads(upload["files"]["eenet_card_data.json"])["model_id"] is None  # named, not stored


def test_scheduler_trainer_push_to_hub_uploads_the_same_card(carded_model, monkeypatch, tmp_path):
    from datasets import Dataset

    from hf_eenet.trainer import ExitSchedulerArguments, ExitSchedulerTrainer

    hub = FakeHub(monkeypatch, remote_readme=False)
    args = ExitSchedulerArguments(
        str(tmp_path / "out"), hub_model_id="org/eenet-tiny", report_to="none", use_cpu=True, fit_baselines=False
    )
    calibration = Dataset.from_dict({"input_ids": [[1, 2, 3]] * 8, "label": [0, 1] * 4})
    trainer = ExitSchedulerTrainer(model=carded_model, args=args, eval_dataset=calibration)
    trainer.fit_scheduler(split="dev")
    trainer.push_to_hub()
    (upload,) = hub.uploads
    readme = upload["files"]["README.md"].decode()
    assert "generated by hf_eenet" in readme and "### Simulated on dev" in readme
    assert 'pipeline("text-classification", model="org/eenet-tiny", budget=0.5)' in readme
    assert "| eenet | 0.50 |" in readme and "model.safetensors" in upload["files"]


def test_exit_table_says_how_each_exit_pools():
    bert = EENetBertForSequenceClassification(tiny_bert_config(exit_pooling="mean", exit_head_pooling="attention"))
    text = str(render_model_card(bert))
    assert "| 0 | 1 | " in text and "| attention |" in text and "| mean |" in text
    resnet = EENetResNetForImageClassification(
        EENetResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)
    )
    assert "token pooling" not in str(render_model_card(resnet))  # feature maps: no token pooling to report


def test_exit_table_lists_fixed_segment_costs_when_measured():
    config = EENetResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)
    resnet = EENetResNetForImageClassification(config)
    assert "fixed segment cost" not in str(render_model_card(resnet))
    config.set_exit_costs([0.4, 1.01], source="latency", segment_costs=[0.035], batch_size=64)
    text = str(render_model_card(resnet))
    assert "priced for batches of\n64" in text and "| fixed segment cost per batch |" in text
    assert "| 0 | 1 | 0.400 | 0.000 |" in text and "| 1 | 2 | 1.010 | 0.035 |" in text
