"""Multi-exit ViT and ResNet on the shared engine: equivalence, compaction, persistence, loading, training, errors."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    ResNetModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

from hf_eenet import (
    BudgetTracker,
    ConfidenceThresholdPolicy,
    EarlyExitClassifierOutput,
    EENetResNetConfig,
    EENetResNetForImageClassification,
    EENetViTConfig,
    EENetViTForImageClassification,
    ForcedExitPolicy,
)

TINY_VIT = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=37,
    num_labels=3,
)
TINY_RESNET = dict(embedding_size=8, hidden_sizes=[8, 16, 32], depths=[1, 1, 1], layer_type="basic", num_labels=3)


@dataclass(frozen=True)
class Backbone:
    """One vision backbone under test: our classes, the stock ones, and where its blocks live."""

    name: str
    config_class: type
    model_class: type
    stock_config_class: type
    stock_model_class: type
    stock_base_class: type
    kwargs: dict
    eenet_kwargs: dict

    def config(self, **overrides):
        return self.config_class(**{**self.kwargs, **self.eenet_kwargs, **overrides})

    def stock_config(self, **overrides):
        return self.stock_config_class(**{**self.kwargs, **overrides})

    def model(self, **overrides):
        return self.model_class(self.config(**overrides)).eval()

    def blocks(self, model):
        return model.vit.layers if self.name == "vit" else model.resnet.encoder.stages


VIT = Backbone(
    "vit", EENetViTConfig, EENetViTForImageClassification, ViTConfig, ViTForImageClassification, ViTModel, TINY_VIT, {}
)
RESNET = Backbone(
    "resnet",
    EENetResNetConfig,
    EENetResNetForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    ResNetModel,
    TINY_RESNET,
    {"exit_cost_reference_size": 32},
)
BACKBONES = [VIT, RESNET]
by_name = pytest.mark.parametrize("backbone", BACKBONES, ids=lambda b: b.name)


def random_images(batch_size: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(seed))


def exit_patterns(batch_size: int, num_exits: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(batch_size)
    return {
        "all_first": torch.zeros(batch_size, dtype=torch.long),
        "all_last": torch.full((batch_size,), num_exits - 1, dtype=torch.long),
        "cycling": torch.arange(batch_size) % num_exits,
        "reversed": (num_exits - 1 - torch.arange(batch_size) % num_exits),
        "random": torch.randint(0, num_exits, (batch_size,), generator=generator),
    }


def assert_forced_exits_match_all_exits(model, images, **inputs):
    batch_size = images.shape[0]
    with torch.no_grad():
        reference = model(images, output_all_exits=True, **inputs).all_exit_logits  # (B, K, C)
        for name, targets in exit_patterns(batch_size, model.config.num_exits).items():
            out = model(images, exit_policy=ForcedExitPolicy(targets), **inputs)
            assert torch.equal(out.exit_index, targets), name
            expected = reference[torch.arange(batch_size), targets]
            torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5, msg=name)
            torch.testing.assert_close(out.exit_cost, torch.tensor(model.config.exit_costs)[targets])


@pytest.mark.parametrize("batch_size", [1, 7, 32])
@pytest.mark.parametrize(
    ("backbone", "overrides"),
    [(VIT, {}), (VIT, {"exit_pooling": "mean"}), (RESNET, {})],
    ids=["vit-cls", "vit-mean", "resnet"],
)
def test_early_exit_logits_equal_all_exits_logits(backbone, overrides, batch_size):
    model = backbone.model(**overrides)
    assert_forced_exits_match_all_exits(model, random_images(batch_size, seed=batch_size))


@by_name
def test_early_exit_logits_do_not_depend_on_batch_composition(backbone):
    """An image's logits are the same alone or in any batch, whichever exits its neighbours take."""
    model = backbone.model()
    images = random_images(9, seed=3)
    targets = torch.tensor([0, 2, 1, 0, 2, 2, 1, 0, 1])
    with torch.no_grad():
        together = model(images, exit_policy=ForcedExitPolicy(targets)).logits
        shuffled = torch.randperm(9, generator=torch.Generator().manual_seed(1))
        reordered = model(images[shuffled], exit_policy=ForcedExitPolicy(targets[shuffled])).logits
        torch.testing.assert_close(reordered, together[shuffled], atol=1e-5, rtol=1e-5)
        for i in range(9):
            single = model(images[i : i + 1], exit_policy=ForcedExitPolicy(targets[i : i + 1])).logits
            torch.testing.assert_close(single[0], together[i], atol=1e-5, rtol=1e-5)


def block_inputs(model, blocks, targets: torch.Tensor, describe) -> list:
    """`describe(input)` of every block call in one early-exit forward of random images with forced `targets`."""
    seen: list = []
    hooks = [
        block.register_forward_hook(lambda module, args, output: seen.append(describe(args[0]))) for block in blocks
    ]
    try:
        with torch.no_grad():
            model(random_images(targets.numel()), exit_policy=ForcedExitPolicy(targets))
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def test_resnet_channels_last_stays_channels_last_through_compaction():
    """A channels-last ResNet (the fast layout for CNN inference) keeps that layout in every stage after compaction."""
    model = RESNET.model().to(memory_format=torch.channels_last)
    targets = torch.tensor([0, 2, 1, 0, 2, 1, 1, 0, 2])
    layouts = block_inputs(
        model, RESNET.blocks(model), targets, lambda x: x.is_contiguous(memory_format=torch.channels_last)
    )
    assert layouts == [True, True, True]
    assert_forced_exits_match_all_exits(model, random_images(9))
    # the images (given in the default layout) reach the stem channels-last, and the logits do not change
    stem = model.resnet.embedder.embedder.convolution
    seen = []
    hook = stem.register_forward_hook(
        lambda module, args, output: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    images = random_images(9)
    with torch.no_grad():
        channels_last_logits = model(images, budget=1.0).logits
    hook.remove()
    assert seen == [True]
    default_layout = RESNET.model()
    default_layout.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(channels_last_logits, default_layout.eval()(images, budget=1.0).logits)


@by_name
def test_compaction_reduces_work(backbone):
    """Count the images every block really processes: only those whose exit lies at or beyond it."""
    model = backbone.model()
    targets = torch.tensor([0, 0, 1, 2, 0, 1, 0, 0, 1, 0, 2, 0])
    processed = block_inputs(model, backbone.blocks(model), targets, lambda x: x.shape[0])
    assert processed == [12, int((targets >= 1).sum()), int((targets >= 2).sum())] == [12, 5, 2]


@by_name
def test_full_model_is_the_stock_model(backbone, tmp_path):
    stock = backbone.stock_model_class(backbone.stock_config()).eval()
    stock.save_pretrained(tmp_path)
    model = backbone.model_class.from_pretrained(tmp_path, **backbone.eenet_kwargs).eval()
    assert isinstance(model.config, backbone.config_class) and model.config.model_type == f"eenet-{backbone.name}"
    images = random_images(6)
    head_calls = []  # the full model runs no early-exit head
    for module in model.exit_heads.modules():
        module.register_forward_hook(lambda module, args, output: head_calls.append(module))
    with torch.no_grad():
        expected = stock(images).logits
        for budget in (None, 1.0, 3):
            out = model(images, budget=budget)
            torch.testing.assert_close(out.logits, expected, atol=1e-6, rtol=1e-6)
            assert out.exit_index.tolist() == [model.config.num_exits - 1] * 6
            assert out.exit_cost.tolist() == [1.0] * 6
        assert head_calls == []
        # the last exit of the all-exits path is the stock head too
        torch.testing.assert_close(model(images, output_all_exits=True).logits, expected, atol=1e-6, rtol=1e-6)
    assert head_calls  # the hooks do see the heads when they run


@by_name
def test_all_exits_mode_loss_and_features(backbone):
    model = backbone.model()
    images = random_images(5)
    labels = torch.tensor([0, 1, 2, 1, 0])
    with torch.no_grad():
        out = model(images, labels=labels, output_exit_features=True)
    assert isinstance(out, EarlyExitClassifierOutput)
    assert out.all_exit_logits.shape == (5, 3, 3)
    feature_sizes = [32, 32, 32] if backbone.name == "vit" else [8, 16, 32]
    assert [tuple(f.shape) for f in out.all_exit_features] == [(5, size) for size in feature_sizes]
    torch.testing.assert_close(out.logits, out.all_exit_logits[:, -1])
    for k, features in enumerate(out.all_exit_features):  # features are what each exit's classifier receives
        torch.testing.assert_close(model.exit_logits(k, features), out.all_exit_logits[:, k])
    weights = torch.tensor(model.config.exit_loss_weights)
    per_exit = torch.stack([torch.nn.functional.cross_entropy(out.all_exit_logits[:, k], labels) for k in range(3)])
    torch.testing.assert_close(out.loss, (weights * per_exit).sum() / weights.sum())
    model.train()
    assert model(images).all_exit_logits is not None  # training computes every exit
    model.eval()
    out = model(images, return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == (5, 3)


def colour_task(num_images: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy images whose class is the colour channel that is brighter."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (num_images,), generator=generator)
    images = 0.5 * torch.randn(num_images, 3, 32, 32, generator=generator)
    images[torch.arange(num_images), labels] += 1.0
    return images, labels


@by_name
def test_multi_exit_loss_trains_every_exit(backbone):
    torch.manual_seed(0)
    model = backbone.model().train()
    images, labels = colour_task(32)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(images, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    model.eval()
    test_images, test_labels = colour_task(64, seed=1)
    with torch.no_grad():
        predictions = model(test_images, output_all_exits=True).all_exit_logits.argmax(-1)
    accuracy = (predictions == test_labels[:, None]).float().mean(0)
    assert (accuracy > 0.9).all(), accuracy


def fitted_policy(model, images, labels) -> ConfidenceThresholdPolicy:
    with torch.no_grad():
        logits = model(images, output_all_exits=True).all_exit_logits
    costs = model.config.exit_costs
    budgets = [costs[0] + f * (1.0 - costs[0]) for f in (0.2, 0.5, 0.8)]
    return ConfidenceThresholdPolicy(model.config.num_exits).fit(logits, labels, costs, budgets=budgets)


@by_name
def test_save_load_round_trip_keeps_weights_config_and_decisions(backbone, tmp_path):
    model = backbone.model(exit_layers=[1, 3])
    images = random_images(16, seed=2)
    policy = fitted_policy(model, images, torch.randint(0, 3, (16,)))
    model.set_exit_policy(policy)
    model.config.default_budget = policy.budgets[-1]
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == f"eenet-{backbone.name}"
    assert saved["exit_policy"]["policy_type"] == "confidence-threshold"
    assert saved["exit_layers"] == [1, 3]

    loaded = backbone.model_class.from_pretrained(tmp_path).eval()
    original_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert original_state.keys() == loaded_state.keys()
    for name in original_state:
        assert torch.equal(original_state[name], loaded_state[name]), name
    ignored = {"_name_or_path"}
    assert {k: v for k, v in loaded.config.to_dict().items() if k not in ignored} == {
        k: v for k, v in model.config.to_dict().items() if k not in ignored
    }
    decisions = set()
    with torch.no_grad():
        for budget in (None, *policy.budgets, 1.0):
            a, b = model(images, budget=budget), loaded(images, budget=budget)
            assert torch.equal(a.exit_index, b.exit_index), budget
            torch.testing.assert_close(a.logits, b.logits, atol=1e-6, rtol=1e-6)
            decisions.add(tuple(a.exit_index.tolist()))
    assert len(decisions) > 1  # the budgets really lead to different exits


@by_name
def test_fitted_policy_engine_matches_simulation(backbone):
    model = backbone.model()
    images = random_images(24, seed=4)
    policy = fitted_policy(model, images, torch.randint(0, 3, (24,)))
    model.set_exit_policy(policy)
    with torch.no_grad():
        logits = model(images, output_all_exits=True).all_exit_logits
        for index, budget in enumerate(policy.budgets):
            out = model(images, budget=budget)
            assert torch.equal(out.exit_index, policy.simulate(logits, index))
            assert float(out.exit_cost.mean()) <= budget + 1e-6


@by_name
def test_budget_tracker_serves_each_batch_at_its_chosen_budget(backbone):
    model = backbone.model()
    policy = fitted_policy(model, random_images(24, seed=4), torch.randint(0, 3, (24,)))
    model.set_exit_policy(policy)
    target = (policy.budgets[0] + policy.budgets[1]) / 2  # between two fitted budgets
    tracker, replay = BudgetTracker(target, horizon=6), BudgetTracker(target, horizon=6)
    with torch.no_grad():
        for seed in range(8):
            images = random_images(6, seed=50 + seed)
            out = model(images, budget=tracker)
            plain = model(images, budget=replay.choose([*policy.budgets, 1.0], 6))  # the same choice, as a float
            replay.record(plain.exit_cost)
            assert torch.equal(out.exit_index, plain.exit_index)
            torch.testing.assert_close(out.logits, plain.logits, atol=0, rtol=0)
    assert tracker.samples_per_budget == replay.samples_per_budget
    assert tracker.total_cost == pytest.approx(replay.total_cost)


@by_name
def test_auto_classes(backbone, tmp_path):
    kwargs = {k: v for k, v in backbone.config().to_dict().items() if k != "model_type"}
    config = AutoConfig.for_model(f"eenet-{backbone.name}", **kwargs)
    assert isinstance(config, backbone.config_class)
    model = AutoModelForImageClassification.from_config(config)
    assert isinstance(model, backbone.model_class)
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), backbone.config_class)
    assert isinstance(AutoModelForImageClassification.from_pretrained(tmp_path), backbone.model_class)


@by_name
def test_loads_stock_classifier_with_only_exits_new(backbone, tmp_path):
    stock = backbone.stock_model_class(backbone.stock_config())
    stock.save_pretrained(tmp_path)
    model, info = backbone.model_class.from_pretrained(tmp_path, output_loading_info=True, **backbone.eenet_kwargs)
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert {key.split(".")[0] for key in info["missing_keys"]} == {"exit_heads"}
    state = model.state_dict()
    for name, value in stock.state_dict().items():
        assert torch.equal(state[name], value), name
    assert model.exit_policy is None and model.config.exit_policy is None
    # the new exits are initialised like the backbone's own modules (not left as uninitialised memory)
    norm = model.exit_heads[0].layernorm if backbone.name == "vit" else model.exit_heads[0].normalization
    assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and torch.equal(
        norm.bias, torch.zeros_like(norm.bias)
    )
    classifier = model.exit_heads[0].classifier.weight.detach()
    assert torch.isfinite(classifier).all() and 0 < float(classifier.std()) < 1


@by_name
def test_loads_stock_base_model_with_exits_and_classifier_new(backbone, tmp_path):
    base = backbone.stock_base_class(backbone.stock_config())
    base.save_pretrained(tmp_path)
    model, info = backbone.model_class.from_pretrained(tmp_path, output_loading_info=True, **backbone.eenet_kwargs)
    assert {key.split(".")[0] for key in info["missing_keys"]} == {"exit_heads", "classifier"}
    assert {key.split(".")[0] for key in info["unexpected_keys"]} <= {"pooler"}  # ViTModel's unused pooler
    prefix = backbone.name
    state = model.state_dict()
    for name, value in base.state_dict().items():
        if not name.startswith("pooler."):
            assert torch.equal(state[f"{prefix}.{name}"], value), name


def test_loads_a_vit_checkpoint_in_the_original_key_layout(tmp_path):
    """Hub ViT checkpoints (google/vit-base-patch16-224, ...) use the pre-v5 names: encoder.layer.N.attention..."""
    stock = ViTForImageClassification(VIT.stock_config()).eval()
    renames = [
        (".layers.", ".encoder.layer."),
        (".attention.q_proj.", ".attention.attention.query."),
        (".attention.k_proj.", ".attention.attention.key."),
        (".attention.v_proj.", ".attention.attention.value."),
        (".attention.o_proj.", ".attention.output.dense."),
        (".mlp.fc1.", ".intermediate.dense."),
        (".mlp.fc2.", ".output.dense."),
    ]
    legacy = {}
    for name, value in stock.state_dict().items():
        for old, new in renames:
            name = name.replace(old, new)
        legacy[name] = value.contiguous()
    assert "vit.encoder.layer.0.attention.attention.query.weight" in legacy
    stock.config.save_pretrained(tmp_path)
    save_file(legacy, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model, info = EENetViTForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["unexpected_keys"]
    assert {key.split(".")[0] for key in info["missing_keys"]} == {"exit_heads"}
    images = random_images(3)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images).logits, stock(images).logits)
    model.save_pretrained(tmp_path / "ours")
    assert set(load_file(str(tmp_path / "ours" / "model.safetensors"))) >= {
        "exit_heads.0.classifier.weight",
        "classifier.weight",
    }


def test_from_pretrained_overrides_recompute_derived_fields(tmp_path):
    RESNET.stock_config_class(**TINY_RESNET).save_pretrained(tmp_path)  # a stock config: reference size 224
    config = EENetResNetConfig.from_pretrained(tmp_path)
    assert config.model_type == "eenet-resnet" and config.exit_cost_reference_size == 224
    assert config.exit_head_strides == [2, 2]
    small = EENetResNetConfig.from_pretrained(tmp_path, exit_cost_reference_size=32)
    assert small.exit_head_strides == [2, 1]  # stage maps of 8x8, 4x4, 2x2
    assert small.exit_costs == EENetResNetConfig(**TINY_RESNET, exit_cost_reference_size=32).exit_costs
    small.save_pretrained(tmp_path)
    fewer = EENetResNetConfig.from_pretrained(tmp_path, exit_layers=[2, 3])
    assert fewer.exit_layers == [2, 3] and fewer.exit_head_strides == [1] and len(fewer.exit_costs) == 2
    assert fewer.exit_loss_weights == [1.0, 2.0]
    with pytest.raises(ValueError, match="must end with the number of backbone stages"):
        EENetResNetConfig.from_pretrained(tmp_path, exit_layers=[1, 2])
    vit = EENetViTForImageClassification.from_pretrained(
        _saved(ViTForImageClassification(VIT.stock_config()), tmp_path / "vit"), exit_layers=[2, 3]
    )
    assert vit.config.exit_layers == [2, 3] and len(vit.exit_heads) == 1 and len(vit.config.exit_costs) == 2


def _saved(model, path):
    model.save_pretrained(path)
    return path


@by_name
def test_calibrate_exit_costs_measures_latency(backbone):
    model = backbone.model()
    costs = model.calibrate_exit_costs({"pixel_values": random_images(4)}, num_repeats=3, num_warmup=1)
    assert model.config.exit_cost_source == "latency" and model.config.exit_costs == costs
    assert all(b > a for a, b in zip(costs, costs[1:])) and costs[0] > 0


def test_vit_interpolated_position_encoding():
    model = VIT.model()
    images = random_images(5, size=48)
    with pytest.raises(ValueError, match="doesn't match model"):
        model(images)
    assert model(images, interpolate_pos_encoding=True).logits.shape == (5, 3)
    assert_forced_exits_match_all_exits(model, images, interpolate_pos_encoding=True)


# --- FLOPs-based costs ----------------------------------------------------------------------------------------------


def full_flops(config) -> float:
    return config.stem_flops() + sum(config.block_flops()) + config.exit_head_flops()[-1]


@pytest.mark.parametrize(
    ("config", "gmacs"),
    [
        (EENetViTConfig(num_labels=1000), 17.56),  # ViT-B/16 at 224: 17.6 GMACs (often quoted as "GFLOPs")
        (EENetResNetConfig(num_labels=1000), 4.09),  # ResNet-50 (v1.5, stride in the 3x3 convolution)
        (
            EENetResNetConfig(
                layer_type="basic", hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], num_labels=1000
            ),
            1.82,
        ),  # ResNet-18
    ],
    ids=["vit-b16", "resnet-50", "resnet-18"],
)
def test_flops_of_reference_architectures(config, gmacs):
    assert full_flops(config) / 2e9 == pytest.approx(gmacs, rel=0.01)


def test_vit_flops_costs():
    config = EENetViTConfig(**{**TINY_VIT, "num_hidden_layers": 6}, exit_layers=[2, 4, 6])
    assert config.num_patches == 16 and config.exit_cost_source == "flops"
    blocks, heads, full = config.block_flops(), config.exit_head_flops(), full_flops(config)
    expected = [
        (config.stem_flops() + sum(blocks[:end]) + sum(heads[: k + 1])) / full for k, end in enumerate([2, 4, 6])
    ]
    assert config.exit_costs == pytest.approx(expected)
    costs = config.exit_costs
    assert costs[0] < costs[1] < costs[2] and 1.0 < costs[2] < 1.01
    base = EENetViTConfig(exit_layers=[4, 8, 12])  # ViT-B/16: the patch embedding is negligible
    assert base.exit_costs[0] == pytest.approx(1 / 3, abs=0.01) and base.exit_costs[1] == pytest.approx(
        2 / 3, abs=0.01
    )
    larger = EENetViTConfig(**{**TINY_VIT, "image_size": 64})  # 64 patches: attention weighs more
    assert larger.block_flops()[0] > 4 * config.block_flops()[0]
    assert EENetViTConfig(**TINY_VIT, exit_pooling="mean").exit_head_flops()[0] > config.exit_head_flops()[0]


def test_resnet_flops_costs():
    config = EENetResNetConfig(num_labels=1000, exit_layers=[2, 3, 4])
    costs = config.exit_costs
    assert costs[0] < costs[1] < costs[2] and 1.0 < costs[2] < 1.15
    blocks = config.block_flops()
    full = full_flops(config)
    assert costs[0] > (config.stem_flops() + blocks[0] + blocks[1]) / full  # plus the first exit head
    assert config.stage_output_sizes() == [56, 28, 14, 7] and config.exit_head_strides == [2, 2]
    assert config.exit_head_channels() == [128, 256]  # bottleneck width of stages 2 and 3
    small = EENetResNetConfig(**TINY_RESNET, exit_cost_reference_size=32)
    assert small.stage_output_sizes() == [8, 4, 2] and small.exit_head_strides == [2, 1]
    assert small.exit_head_channels() == [8, 16]


# --- exits inside stages -------------------------------------------------------------------------------------------
BLOCK_RESNET = {"depths": [2, 1, 2], "exit_layer_unit": "block"}


def test_resnet_exits_after_blocks_equal_the_all_exits_logits():
    model = RESNET.model(**BLOCK_RESNET, exit_layers=[1, 2, 4, 5])
    assert model.config.exit_input_channels() == [8, 8, 32] and model.config.exit_head_strides == [2, 2, 1]
    assert_forced_exits_match_all_exits(model, random_images(7, seed=5))
    targets = torch.tensor([0, 1, 3, 2, 0, 3, 1])
    processed = block_inputs(model, model.exit_units(), targets, lambda x: x.shape[0])
    # blocks 1-2 (stage 0), 3 (stage 1), 4-5 (stage 2): each runs on the images that have not left yet
    assert processed == [7, 5, 3, 3, 2]


def test_resnet_exits_at_the_ends_of_stages_are_the_same_in_either_unit(tmp_path):
    """Counted in blocks, exits at the stage ends give the same architecture, costs and logits as counted in stages."""
    by_stage = RESNET.model(depths=[2, 1, 2], exit_layers=[1, 2, 3])
    by_stage.save_pretrained(tmp_path)
    by_block = RESNET.model_class.from_pretrained(tmp_path, exit_layer_unit="block", exit_layers=[2, 3, 5]).eval()
    assert by_block.config.exit_costs == pytest.approx(by_stage.config.exit_costs)
    assert by_block.config.exit_head_strides == by_stage.config.exit_head_strides
    images = random_images(4)
    with torch.no_grad():
        expected = by_stage(images, output_all_exits=True).all_exit_logits
        torch.testing.assert_close(by_block(images, output_all_exits=True).all_exit_logits, expected)


def test_resnet_block_costs_count_each_block():
    config = RESNET.config(**BLOCK_RESNET, exit_layers=[1, 2, 3, 4, 5], exit_cost_reference_size=32)
    by_stage = RESNET.config(depths=[2, 1, 2], exit_cost_reference_size=32)
    blocks = config.block_flops()
    assert len(blocks) == 5 and sum(blocks[:2]) == pytest.approx(by_stage.block_flops()[0])
    assert sum(blocks[3:]) == pytest.approx(by_stage.block_flops()[2])
    assert config.unit_output_sizes() == [8, 8, 4, 2, 2] and config.stage_output_sizes() == [8, 4, 2]
    assert config.exit_costs[0] < by_stage.exit_costs[0]  # half of stage 0, and a head as wide as stage 0's


# --- errors ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backbone", "overrides", "match"),
    [
        (VIT, {"exit_layers": [1, 2]}, r"must end with the number of backbone blocks \(3\) .*got \[1, 2\]"),
        (VIT, {"exit_layers": [0, 3]}, r"strictly increasing integers in \[1, 3\], got \[0, 3\]"),
        (VIT, {"exit_pooling": "max"}, "`exit_pooling` must be 'cls' or 'mean', got 'max'"),
        (VIT, {"exit_head_pooling": "attention"}, "`exit_head_pooling` does not apply to this model: every exit"),
        (RESNET, {"exit_pooling": "mean"}, "`exit_pooling` does not apply to this model: a ResNet's exit heads"),
        (RESNET, {"exit_head_pooling": "attention"}, "`exit_head_pooling` does not apply to this model"),
        (VIT, {"exit_loss_weights": [1.0]}, r"`exit_loss_weights` must hold 3 non-negative .*got \[1.0\]"),
        (RESNET, {"exit_layers": [1, 2, 3, 4]}, r"must end with the number of backbone stages \(3\).*\[1, 2, 3, 4\]"),
        (RESNET, {"exit_layers": [2, 2, 3]}, r"strictly increasing integers in \[1, 3\], got \[2, 2, 3\]"),
        (RESNET, {"exit_head_strides": [2]}, r"exit_head_strides.*got \[2\]"),
        (RESNET, {"exit_head_strides": [3, 1]}, r"exit_head_strides.*got \[3, 1\]"),
        (RESNET, {"exit_cost_reference_size": 0}, "`exit_cost_reference_size` must be an integer >= 1, got 0"),
        (RESNET, {"hidden_sizes": [8, 16]}, r"one entry per stage, got \[8, 16\] and \[1, 1, 1\]"),
        (RESNET, {"default_budget": -1}, r"`default_budget` must be a finite number > 0 .*got -1.0"),
        (RESNET, {"exit_layer_unit": "layer"}, "`exit_layer_unit` must be one of .*got 'layer'"),
        (
            RESNET,
            {**BLOCK_RESNET, "exit_layers": [1, 3]},
            "must end with the number of backbone residual blocks \\(5\\)",
        ),
    ],
)
def test_bad_config_values_are_rejected(backbone, overrides, match):
    with pytest.raises(ValueError, match=match):
        backbone.config(**overrides)


@by_name
@pytest.mark.parametrize(
    ("budget", "error", "match"),
    [
        (0.0, ValueError, "> 0"),
        (float("nan"), ValueError, "> 0"),
        ("0.5", TypeError, "must be a number"),
        (0.01, ValueError, "smallest budget this model can meet"),
        (0.99, ValueError, "needs a fitted exit policy"),
    ],
)
def test_bad_budgets_are_rejected(backbone, budget, error, match):
    with pytest.raises(error, match=match):
        backbone.model()(random_images(2), budget=budget)


@by_name
def test_bad_inputs_are_rejected(backbone):
    model = backbone.model()
    for mode in ({}, {"output_all_exits": True}, {"labels": torch.zeros(0, dtype=torch.long)}, {"budget": 1.0}):
        with pytest.raises(ValueError, match="The batch is empty: pass at least one image"):
            model(torch.zeros(0, 3, 32, 32), **mode)
    with pytest.raises(ValueError, match="`pixel_values` are required"):
        model()
    with pytest.raises(ValueError, match="batch_size, num_channels, height, width"):
        model(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="channel dimension"):
        model(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="cannot be used when `labels` are given"):
        model(random_images(2), labels=torch.tensor([0, 1]), budget=0.9)
    for mode in ({"output_all_exits": True}, {"output_exit_features": True}):
        for request in ({"budget": 0.9}, {"budget": BudgetTracker(0.9)}, {"exit_policy": ForcedExitPolicy([0, 1])}):
            with pytest.raises(ValueError, match="cannot be used when all exits are computed"):
                model(random_images(2), **mode, **request)
    with pytest.raises(ValueError, match="cannot be used when all exits are computed"):
        model.train()(random_images(2), budget=0.9)
    model.eval()
    flags = ["output_hidden_states"] + (["output_attentions"] if backbone is VIT else [])  # as the stock models take
    for flag in flags:
        with pytest.raises(ValueError, match=f"`{flag}=True` was passed, but EENet models return"):
            model(random_images(2), **{flag: True})
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        model(random_images(2), labels=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="holds 3 exit indices but the batch has 2"):
        model(random_images(2), exit_policy=ForcedExitPolicy(torch.tensor([0, 1, 2])))


@pytest.mark.parametrize("backbone", BACKBONES, ids=lambda b: b.name)
def test_regression_and_multi_label_configs_are_refused(backbone):
    for kwargs in ({"num_labels": 1}, {"num_labels": 3, "problem_type": "multi_label_classification"}):
        with pytest.raises(ValueError, match="EENet models are single-label classifiers"):
            backbone.model_class(backbone.config(**kwargs))


@pytest.mark.parametrize(
    ("unit", "depths", "exits"),
    [("stage", [2, 1, 1], [1, 2, 3]), ("block", [1, 1, 2], [1, 2, 3, 4]), ("block", [2, 2, 2], [1, 2, 3, 4, 5, 6])],
)
def test_resnet_depths_given_at_load_reach_exits_after_every_block(tmp_path, unit, depths, exits):
    model = RESNET.model(depths=[2, 1, 2], exit_layer_unit=unit)
    assert model.config.exit_layers == list(range(1, len(model.config.exit_units()) + 1))
    model.save_pretrained(tmp_path)
    # (ignore_mismatched_sizes: block-unit exits move to stages of other widths, where their heads are new)
    loaded = EENetResNetForImageClassification.from_pretrained(tmp_path, depths=depths, ignore_mismatched_sizes=True)
    assert loaded.config.exit_layers == exits and len(loaded.exit_heads) == len(exits) - 1
    assert loaded.config.exit_costs == RESNET.config(depths=depths, exit_layer_unit=unit).exit_costs
