"""Train a tiny EENet BERT with `EarlyExitTrainer` under DDP (gloo, CPU); run by tests/test_trainer.py via torchrun.

Usage: `torchrun --standalone --nproc_per_node 2 tests/ddp_train_script.py OUTPUT_DIR [retrofit | no-use-cpu]` (or
`accelerate launch`, or plain `python` for one process). Every rank writes `OUTPUT_DIR/rank{r}.json` with the world
size and checksums of its initial and final parameters (all, and the backbone's); the main process saves the trained
model to `OUTPUT_DIR/model`. `no-use-cpu` leaves out `use_cpu`, which a multi-process CPU launch needs.
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from hf_eenet import EENetBertConfig, EENetBertForSequenceClassification  # noqa: E402
from hf_eenet.trainer import EarlyExitTrainer, EarlyExitTrainingArguments, end_distributed_run  # noqa: E402


def checksum(model: torch.nn.Module, prefix: str = "") -> float:
    return float(sum(p.detach().double().abs().sum() for n, p in model.named_parameters() if n.startswith(prefix)))


def main(output_dir: str, retrofit: bool = False, use_cpu: bool = True) -> None:
    torch.manual_seed(0)
    config = EENetBertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37, num_labels=2
    )
    model = EENetBertForSequenceClassification(config)
    initial, initial_backbone = checksum(model), checksum(model, "bert.")
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 2, (32,), generator=generator)
    input_ids = torch.randint(1, 50, (32, 8), generator=generator) + 49 * labels[:, None]
    dataset = Dataset.from_dict({"input_ids": input_ids.tolist(), "label": labels.tolist()})
    args = EarlyExitTrainingArguments(
        output_dir=output_dir,
        use_cpu=use_cpu,
        ddp_backend="gloo" if use_cpu and "WORLD_SIZE" in os.environ else None,  # a launcher's run: gloo on CPU
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        distillation_weight=0.5,
        distillation_start=0.5,
        logging_steps=2,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        retrofit=retrofit,
    )
    trainer = EarlyExitTrainer(model=model, args=args, train_dataset=dataset)
    result = trainer.train()
    trainer.save_model(os.path.join(output_dir, "model"))  # the main process writes it
    rank = trainer.args.process_index
    ddp_kwargs = {}
    wrapped = trainer.model_wrapped
    if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
        ddp_kwargs["find_unused_parameters"] = bool(wrapped.find_unused_parameters)
    report = {
        "world_size": trainer.args.world_size,
        "initial_checksum": initial,
        "final_checksum": checksum(trainer.accelerator.unwrap_model(trainer.model)),
        "initial_backbone_checksum": initial_backbone,
        "final_backbone_checksum": checksum(trainer.accelerator.unwrap_model(trainer.model), "bert."),
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "ddp": isinstance(wrapped, torch.nn.parallel.DistributedDataParallel),
        **ddp_kwargs,
    }
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(report, handle)


if __name__ == "__main__":
    main(sys.argv[1], retrofit="retrofit" in sys.argv[2:], use_cpu="no-use-cpu" not in sys.argv[2:])
    end_distributed_run()
