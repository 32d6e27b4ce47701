"""`loraforge convert` and `loraforge export`: adapters for engines that load only LoRA, or GGUF."""

from __future__ import annotations

import argparse
import json

from loraforge.core.errors import LoraforgeError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("convert", help="any method's adapter as a plain PEFT LoRA (truncated SVD of each update)")
    p.add_argument("adapter", help="adapter folder (any method that merges, or a full fine-tune's folder)")
    p.add_argument("--to", choices=["lora"], required=True)
    p.add_argument("--rank", type=int, required=True, help="rank R of the LoRA: exact for layers whose update has rank <= R")
    p.add_argument("--out", required=True, help="folder of the plain LoRA (with conversion_report.json)")
    p.add_argument("--model", default="smollm2-135m", help="the adapter's base model: embedded name, HF folder or .gguf file")
    p.set_defaults(run=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    from loraforge.core.models import default_device, load_model
    from loraforge.export.convert import REPORT_NAME, convert_to_lora

    if args.rank < 1:
        raise LoraforgeError(f"--rank must be a positive integer, got {args.rank}")
    model, tokenizer = load_model(args.model)
    report = convert_to_lora(model.to(default_device()), tokenizer, args.adapter, args.rank, args.out)
    summary = {k: v for k, v in report.items() if k != "per_layer"}
    print(json.dumps(summary, indent=2))
    print(f"plain LoRA written to {args.out} (per-layer errors in {REPORT_NAME})")
    return 0
