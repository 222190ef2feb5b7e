"""Render the model cards of the reference models into `model_cards/` (what `push_to_hub` would upload as README).

The card comes from the saved model alone (its config, scheduler and `eenet_card_data.json`, written by the workflow
scripts); this script only adds what a local run cannot know: the Hub ids of the model and of the data set it mirrors.
Example (after the SST-2 workflow of benchmarks/results/sst2_minilm.md):

    .venv/bin/python model_cards/render_reference_cards.py --model_dir outputs/minilm-sst2-eenet \
        --model_id hf-eenet/all-MiniLM-L6-v2-eenet-sst2 --dataset_id nyu-mll/glue --dataset_config sst2 \
        --dataset_name SST-2 --language en --license apache-2.0 --output model_cards/all-MiniLM-L6-v2-eenet-sst2
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import AutoModelForSequenceClassification

import hf_eenet  # noqa: F401  (registers the EENet Auto classes and the card support)
from hf_eenet.model_card import write_model_card


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--model_id", required=True, help="Hub id the card's usage snippets load.")
    parser.add_argument("--dataset_id", default=None)
    parser.add_argument("--dataset_config", default=None)
    parser.add_argument("--dataset_name", default=None)
    parser.add_argument("--language", default=None)
    parser.add_argument("--license", default=None)
    parser.add_argument("--output", required=True, help="Directory for README.md and its plot.")
    args = parser.parse_args(argv)
    model = AutoModelForSequenceClassification.from_pretrained(args.model_dir)
    card = model.model_card_data
    card.model_id = card.model_name = args.model_id
    for name in ("dataset_id", "dataset_config", "dataset_name", "language", "license"):
        if getattr(args, name) is not None:
            setattr(card, name, getattr(args, name))
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    readme = write_model_card(model, output, overwrite=True)
    print(f"Wrote {readme}")
    return readme


if __name__ == "__main__":
    main()
