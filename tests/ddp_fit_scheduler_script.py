"""Fit the scheduler of a tiny EENet BERT with `ExitSchedulerTrainer`, under DDP (torchrun, gloo) or alone.

Usage: `torchrun --standalone --nproc_per_node 2 tests/ddp_fit_scheduler_script.py OUTPUT_DIR [no-use-cpu]` (or plain
`python`); with `no-use-cpu` the arguments leave out `use_cpu` and `ddp_backend` (a misconfigured CPU launch).
Every rank writes `OUTPUT_DIR/rank{r}.json`: world size, calibration samples seen, the stored policy's tensors and the
rows of the confidence-threshold baselines.
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from hf_eenet import EENetBertConfig, EENetBertForSequenceClassification  # noqa: E402
from hf_eenet.trainer import ExitSchedulerArguments, ExitSchedulerTrainer, end_distributed_run  # noqa: E402


def main(output_dir: str, use_cpu: bool = True) -> None:
    torch.manual_seed(0)
    config = EENetBertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37, num_labels=2
    )
    model = EENetBertForSequenceClassification(config)
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 2, (37,), generator=generator)
    input_ids = torch.randint(1, 99, (37, 8), generator=generator)
    dataset = Dataset.from_dict({"input_ids": input_ids.tolist(), "label": labels.tolist()})
    args = ExitSchedulerArguments(
        output_dir=output_dir,
        use_cpu=use_cpu,
        ddp_backend="gloo" if "WORLD_SIZE" in os.environ and use_cpu else None,
        per_device_eval_batch_size=8,
        budgets=[0.5, 0.8],
        policy_kwargs={"max_epochs": 30, "patience": 5},
        report_to="none",
        disable_tqdm=True,
    )
    trainer = ExitSchedulerTrainer(model=model, args=args, eval_dataset=dataset)
    rows = trainer.fit_scheduler()
    stored = trainer.accelerator.unwrap_model(trainer.model).exit_policy
    report = {
        "world_size": trainer.args.world_size,
        "num_samples": rows[0]["num_samples"],
        "policy_type": stored.policy_type,
        "policy": {name: tensor.tolist() for name, tensor in stored.state_dict().items()},
        "baseline_rows": [row for row in rows if row["policy"].startswith(("max-prob", "entropy"))],
    }
    with open(os.path.join(output_dir, f"rank{trainer.args.process_index}.json"), "w") as handle:
        json.dump(report, handle)


if __name__ == "__main__":
    main(sys.argv[1], use_cpu=sys.argv[2:] != ["no-use-cpu"])
    end_distributed_run()
