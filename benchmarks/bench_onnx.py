"""Wall-clock speed of the onnxruntime early-exit runtime against torch early exit and the stock model.

Side by side in one run on the same SST-2 test sentences, at batch 1 and 32: the stock `transformers`
`BertForSequenceClassification` (the fitted model's own weights, loaded as a plain BERT classifier), our torch model
and its ONNX export (`hf_eenet.onnx.export_onnx`, run by `EENetONNXModel` on onnxruntime's CPU provider) at budgets
1.0, 0.5 and 0.3 with the stored EENet scheduler. It also checks that both early-exit engines take the same exit for
every sentence and reports the largest logit difference.

Run (from the repository root, after the SST-2 workflow in benchmarks/results/sst2_minilm.md):

    .venv/bin/python benchmarks/bench_onnx.py --model outputs/minilm-sst2-eenet --output benchmarks/results/onnx_minilm.md
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

import onnxruntime
import torch
import transformers
from bench_speed import DEFAULT_DATA, load_sentences, time_runs, tokenize_batches, write_report
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertForSequenceClassification
from transformers.utils import logging as hf_logging

import hf_eenet
from hf_eenet.onnx import EENetONNXModel, export_onnx

BUDGETS = (1.0, 0.5, 0.3)


def run_all(model, batches, **kwargs):
    """A callable running `model` over every batch once."""
    return lambda: [model(**batch, **kwargs) for batch in batches]


ONNX_FULL = "onnxruntime early exit, budget 1.0"  # the full model on onnxruntime: the second baseline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="outputs/minilm-sst2-eenet", help="EENet BERT with a fitted scheduler.")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="SST-2 tsv with a 'sentence' column.")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS), help="Budgets timed (1.0: full).")
    parser.add_argument("--num-samples", type=int, default=192)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", default=None, help="Write the markdown report here.")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    ours = AutoModelForSequenceClassification.from_pretrained(args.model).eval()
    if ours.exit_policy is None:
        raise SystemExit(f"{args.model} has no fitted exit policy: run scripts/fit_scheduler.py first.")
    stock = BertForSequenceClassification.from_pretrained(args.model).eval()  # the same weights, stock class
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    sentences, data_label = load_sentences(Path(args.data), args.num_samples)
    command = "python benchmarks/bench_onnx.py " + " ".join(argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory() as directory:
        export_onnx(ours, directory)
        onnx_model = EENetONNXModel(directory)  # segments on `--threads` threads
        lines = [
            "# ONNX runtime early exit vs torch early exit vs stock transformers: MiniLM-L6 on SST-2 (measured)",
            "",
            f"Command: `{command}`",
            "",
            f"- machine: {platform.processor() or platform.machine()}, {args.threads} threads (torch and onnxruntime), "
            f"CPU; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, transformers "
            f"{transformers.__version__}, hf_eenet {hf_eenet.__version__}",
            f"- data: the first {len(sentences)} sentences of {data_label}, padded to the longest in each batch "
            f"(max {args.max_length} tokens); stored policy: {ours.config.exit_policy['policy_type']}",
            f"- timing: median of {args.repeats} interleaved repeats over all sentences",
            "",
        ]
        for batch_size in args.batch_sizes:
            batches = tokenize_batches(tokenizer, sentences, batch_size, args.max_length, "cpu")
            runs = {"stock transformers": run_all(stock, batches)}
            agreement = []
            for budget in [1.0, *(b for b in args.budgets if b != 1.0)]:  # 1.0: what onnxruntime alone gains
                runs[f"torch early exit, budget {budget}"] = run_all(ours, batches, budget=budget)
                runs[f"onnxruntime early exit, budget {budget}"] = run_all(onnx_model, batches, budget=budget)
                with torch.inference_mode():
                    pairs = [(ours(**x, budget=budget), onnx_model(**x, budget=budget)) for x in batches]
                same = sum(int((a.exit_index == o.exit_index).sum()) for a, o in pairs)
                diff = max(float((a.logits - o.logits).abs().max()) for a, o in pairs)
                cost = float(torch.cat([o.exit_cost for _, o in pairs]).mean())
                agreement.append((budget, same, diff, cost))
            times = time_runs(runs, args.repeats, "cpu")
            stock_time, onnx_full_time = times["stock transformers"], times[ONNX_FULL]
            lines += [
                f"## batch size {batch_size}",
                "",
                "| configuration | ms / sample | speed-up vs stock | speed-up vs the full model on onnxruntime |",
                "|---|---|---|---|",
            ]
            for name, seconds in times.items():
                versus_onnx = f"{onnx_full_time / seconds:.2f}x" if name.startswith("onnxruntime") else "—"
                lines.append(
                    f"| {name} | {1000 * seconds / len(sentences):.2f} | {stock_time / seconds:.2f}x | {versus_onnx} |"
                )
            lines += [
                "",
                "| budget | same exit (torch vs onnx) | max logit difference | realized cost |",
                "|---|---|---|---|",
            ]
            for budget, same, diff, cost in agreement:
                lines.append(f"| {budget} | {same} / {len(sentences)} | {diff:.1e} | {cost:.3f} |")
            lines.append("")
            print("\n".join(lines[-len(times) - len(agreement) - 8 :]), flush=True)
    write_report(lines, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
