"""Shared fixtures: tiny configs (transformers' ModelTester sizes), offline, deterministic."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import hf_eenet  # noqa: E402,F401  (registers the Auto classes)
from hf_eenet import EENetBertConfig  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def tiny_bert_config(**overrides) -> EENetBertConfig:
    kwargs = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        num_labels=3,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    kwargs.update(overrides)
    return EENetBertConfig(**kwargs)


def random_text_batch(batch_size: int, max_length: int = 16, vocab_size: int = 99, seed: int = 0) -> dict:
    """Token ids with right padding and mixed lengths (1..max_length), like a tokenizer's padded output."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_length + 1, (batch_size,), generator=generator)
    lengths[0] = max_length  # at least one full-length sample
    input_ids = torch.randint(1, vocab_size, (batch_size, max_length), generator=generator)
    attention_mask = (torch.arange(max_length)[None, :] < lengths[:, None]).long()
    input_ids = input_ids * attention_mask  # pad id 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def left_padded(batch: dict) -> dict:
    """The same rows padded on the left instead of the right (as a tokenizer with `padding_side="left"`)."""
    lengths = batch["attention_mask"].sum(1)
    return {
        name: torch.stack([row.roll(int(row.numel() - n)) for row, n in zip(value, lengths)])
        for name, value in batch.items()
    }


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
