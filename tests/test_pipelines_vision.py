"""The budgeted image-classification pipeline: budgets at build and call time, batching, stock models unaffected."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_modeling_eenet_vision import RESNET, VIT
from transformers import (
    ConvNextImageProcessorPil,
    ImageClassificationPipeline,
    ViTImageProcessorPil,
    pipeline,
)

from hf_eenet import ConfidenceThresholdPolicy, EENetImageClassificationPipeline, StaticExitPolicy

LABELS = {0: "airplane", 1: "cat", 2: "ship"}
BACKBONES = {"vit": VIT, "resnet": RESNET}
by_name = pytest.mark.parametrize("name", list(BACKBONES))


def make_images(count: int, seed: int = 0) -> list[Image.Image]:
    """RGB images of mixed sizes (the processor resizes them), made with numpy."""
    rng = np.random.default_rng(seed)
    sizes = [(40, 40), (32, 48), (64, 36)]
    return [
        Image.fromarray(rng.integers(0, 256, (*sizes[i % 3], 3), dtype=np.uint8), mode="RGB") for i in range(count)
    ]


IMAGES = make_images(8)


def image_processor(name: str):
    if name == "vit":
        return ViTImageProcessorPil(size={"height": 32, "width": 32})
    return ConvNextImageProcessorPil(size={"shortest_edge": 32}, crop_pct=1.0)  # as microsoft/resnet-50 uses


def labelled(backbone, stock: bool = False):
    kwargs = {"id2label": LABELS, "label2id": {v: k for k, v in LABELS.items()}}
    config = backbone.stock_config(**kwargs) if stock else backbone.config(**kwargs)
    return (backbone.stock_model_class if stock else backbone.model_class)(config).eval()


@pytest.fixture(scope="module")
def eenet_models():
    models = {}
    for name, backbone in BACKBONES.items():
        torch.manual_seed(0)
        model = labelled(backbone)
        pixel_values = image_processor(name)(make_images(24, seed=1) + IMAGES, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            logits = model(pixel_values, output_all_exits=True).all_exit_logits
        costs = model.config.exit_costs
        budgets = [round(costs[0] + f * (1.0 - costs[0]), 4) for f in (0.2, 0.35, 0.5, 0.65, 0.8)]
        policy = ConfidenceThresholdPolicy(model.config.num_exits).fit(
            logits, torch.arange(32) % 3, costs, budgets=budgets
        )
        model.set_exit_policy(policy)
        models[name] = model
    return models


def direct_results(model, processor, images, budget):
    """What the model itself says, one image at a time (where a pipeline moved it: the GPU on a machine with one)."""
    results = []
    with torch.no_grad():
        for image in images:
            out = model(**processor(image, return_tensors="pt").to(model.device), budget=budget)
            probs = out.logits.softmax(-1)[0]
            results.append((model.config.id2label[int(probs.argmax())], float(probs.max()), int(out.exit_index[0])))
    return results


def middle_budget(model) -> float:
    return model.exit_policy.budgets[2]


@by_name
def test_pipeline_builds_our_class_for_the_builtin_task(eenet_models, name):
    classifier = pipeline("image-classification", model=eenet_models[name], image_processor=image_processor(name))
    assert isinstance(classifier, EENetImageClassificationPipeline)


@by_name
@pytest.mark.parametrize("batch_size", [1, 3])
def test_build_time_budget(eenet_models, name, batch_size):
    model, processor = eenet_models[name], image_processor(name)
    budget = middle_budget(model)
    classifier = pipeline("image-classification", model=model, image_processor=processor, budget=budget)
    results = classifier(IMAGES, batch_size=batch_size)
    expected = direct_results(model, processor, IMAGES, budget)
    assert len({exit for *_, exit in expected}) > 1  # the images really leave at different exits
    assert len(results) == len(IMAGES)
    for ranked, (label, score, exit_index) in zip(results, expected):
        assert len(ranked) == 3 and {r["exit_index"] for r in ranked} == {exit_index}
        assert ranked[0]["label"] == label and ranked[0]["score"] == pytest.approx(score, abs=1e-5)
        assert [r["exit_cost"] for r in ranked] == pytest.approx([model.config.exit_costs[exit_index]] * 3)


@by_name
def test_call_time_budget_overrides_build_time(eenet_models, name):
    model, processor = eenet_models[name], image_processor(name)
    classifier = pipeline("image-classification", model=model, image_processor=processor, budget=1.0)
    low_budget = model.exit_policy.budgets[0]
    low = classifier(IMAGES, budget=low_budget, batch_size=4, top_k=1)
    expected = direct_results(model, processor, IMAGES, low_budget)
    assert [(r[0]["label"], r[0]["exit_index"]) for r in low] == [(label, exit) for label, _, exit in expected]
    full = classifier(IMAGES)
    assert {r[0]["exit_index"] for r in full} == {model.config.num_exits - 1}
    assert {r[0]["exit_cost"] for r in full} == {1.0}


@by_name
def test_single_image_and_top_k(eenet_models, name):
    model = eenet_models[name]
    classifier = pipeline(
        "image-classification", model=model, image_processor=image_processor(name), budget=middle_budget(model)
    )
    single = classifier(IMAGES[0], top_k=1)
    assert isinstance(single, list) and len(single) == 1
    assert set(single[0]) == {"label", "score", "exit_index", "exit_cost"}
    ranked = classifier(IMAGES[0], function_to_apply="none")
    assert [r["label"] for r in ranked][0] == single[0]["label"] and len(ranked) == 3


@by_name
def test_pipeline_from_a_saved_directory(eenet_models, name, tmp_path):
    model, processor = eenet_models[name], image_processor(name)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    budget = middle_budget(model)
    classifier = pipeline("image-classification", model=str(tmp_path), budget=budget)
    assert isinstance(classifier.model, BACKBONES[name].model_class)
    expected = direct_results(model, processor, IMAGES, budget)
    assert [(r[0]["label"], r[0]["exit_index"]) for r in classifier(IMAGES, top_k=1)] == [
        (label, exit) for label, _, exit in expected
    ]


@by_name
def test_stock_models_behave_exactly_as_before(name):
    torch.manual_seed(0)
    stock = labelled(BACKBONES[name], stock=True)
    processor = image_processor(name)
    ours = pipeline("image-classification", model=stock, image_processor=processor)
    assert isinstance(ours, EENetImageClassificationPipeline)
    reference = ImageClassificationPipeline(model=stock, image_processor=processor)
    for kwargs in ({}, {"top_k": 1}, {"function_to_apply": "sigmoid"}, {"batch_size": 3}):
        assert ours(IMAGES, **kwargs) == reference(IMAGES, **kwargs), kwargs
    assert ours(IMAGES[0]) == reference(IMAGES[0])
    with pytest.raises(ValueError, match="only accepted by early-exit"):
        pipeline("image-classification", model=stock, image_processor=processor, budget=0.5)
    with pytest.raises(ValueError, match="only accepted by early-exit"):
        ours(IMAGES, budget=0.5)


@by_name
@pytest.mark.parametrize(
    ("budget", "error", "match"),
    [
        (0, ValueError, r"finite number > 0 .*got 0.0\."),
        (float("nan"), ValueError, r"finite number > 0 .*got nan\."),
        ("half", TypeError, "must be a number .*got str: 'half'"),
        (0.1, ValueError, r"budget 0.1 is below the cost of the cheapest exit .*smallest budget this model can meet"),
        ("below-fitted", ValueError, r"budget 0.\d+ is below the smallest fitted budget 0.\d+"),
    ],
)
def test_bad_budgets_fail_when_the_pipeline_is_built_or_called(eenet_models, name, budget, error, match):
    model, processor = eenet_models[name], image_processor(name)
    if budget == "below-fitted":  # reachable by the model, but below every budget the policy was fitted for
        budget = (model.config.exit_costs[0] + model.exit_policy.budgets[0]) / 2
    with pytest.raises(error, match=match):
        pipeline("image-classification", model=model, image_processor=processor, budget=budget)
    classifier = pipeline("image-classification", model=model, image_processor=processor)
    with pytest.raises(error, match=match):
        classifier(IMAGES, budget=budget)


@by_name
def test_budget_on_a_model_without_policy_fails_early(name):
    model = labelled(BACKBONES[name])
    with pytest.raises(ValueError, match="needs a fitted exit policy"):
        pipeline("image-classification", model=model, image_processor=image_processor(name), budget=0.95)


@by_name
def test_an_exit_policy_reaches_the_model(eenet_models, name):
    model = eenet_models[name]
    classifier = pipeline("image-classification", model=model, image_processor=image_processor(name))
    policy = StaticExitPolicy(model.config.num_exits, exit=0)
    assert {r[0]["exit_index"] for r in classifier(IMAGES, exit_policy=policy, batch_size=3, top_k=1)} == {0}
