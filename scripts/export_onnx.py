"""Export an EENet model (BERT, ViT or ResNet) to ONNX segments, exits and policy decisions for onnxruntime.

Writes the graphs, `config.json`, the manifest (`eenet_onnx.json`) and the model's tokenizer or image processor to
`output_dir`; load it with `hf_eenet.onnx.EENetONNXModel.from_pretrained(output_dir)`. Example:

    python scripts/export_onnx.py --model_name_or_path outputs/minilm-sst2-eenet --output_dir outputs/minilm-sst2-onnx
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from hf_eenet.auto import checkpoint_config, is_eenet_config, load_eenet_model, load_processor
from hf_eenet.onnx import DEFAULT_OPSET, EENetONNXModel, export_onnx


@dataclass
class ExportArguments:
    r"""What to export, and where."""

    model_name_or_path: str = field(metadata={"help": "EENet checkpoint (Hub id or local directory)."})
    output_dir: str = field(metadata={"help": "Directory for the ONNX graphs, config, manifest and processor."})
    opset: int = field(default=DEFAULT_OPSET, metadata={"help": "ONNX opset."})
    check: bool = field(
        default=True, metadata={"help": "Load the export with onnxruntime (every graph and the manifest)."}
    )


def main(argv: list[str] | None = None) -> EENetONNXModel | None:
    (args,) = HfArgumentParser(ExportArguments).parse_args_into_dataclasses(args=argv)
    config = checkpoint_config(args.model_name_or_path)
    if not is_eenet_config(config):
        raise ValueError(
            f"{args.model_name_or_path!r} is a {config.model_type!r} checkpoint, not an EENet model; train its exits "
            "first (scripts/train_exits.py)."
        )
    processor = load_processor(args.model_name_or_path)  # before exporting: a checkpoint without one fails first
    model = load_eenet_model(args.model_name_or_path).eval()
    export_onnx(model, args.output_dir, opset=args.opset)
    processor.save_pretrained(args.output_dir)
    print(f"Exported {config.num_exits} segments, exits and policy decisions to {args.output_dir}")
    return EENetONNXModel(args.output_dir) if args.check else None


if __name__ == "__main__":
    sys.exit(main() and 0)
