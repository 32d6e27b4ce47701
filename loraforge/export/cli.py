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

    p = subparsers.add_parser("export", help="llama.cpp GGUF: a LoRA adapter (--adapter) or a merged model (--merged)")
    p.add_argument("--format", choices=["gguf"], required=True)
    p.add_argument("--adapter", default=None, help="plain LoRA adapter folder (convert other methods first)")
    p.add_argument("--merged", action="store_true", help="write the whole model, the adapter (if any) merged in")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--dtype", choices=["f32", "f16"], default="f32", help="tensor type (norms stay f32)")
    p.add_argument("--model", default="smollm2-135m", help="the adapter's base model: embedded name, HF folder or .gguf file")
    p.set_defaults(run=cmd_export)


def cmd_convert(args: argparse.Namespace) -> int:
    from loraforge.adapters.convert import REPORT_NAME, convert_to_lora
    from loraforge.adapters.io import load_base
    from loraforge.core.models import default_device

    if args.rank < 1:
        raise LoraforgeError(f"--rank must be a positive integer, got {args.rank}")
    model, tokenizer = load_base(args.model, args.adapter)  # a classification adapter: its task and head
    report = convert_to_lora(model.to(default_device()), tokenizer, args.adapter, args.rank, args.out)
    summary = {k: v for k, v in report.items() if k != "per_layer"}
    print(json.dumps(summary, indent=2))
    print(f"plain LoRA written to {args.out} (per-layer errors in {REPORT_NAME})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from loraforge.adapters.inject import merge_and_unload
    from loraforge.adapters.io import load_adapter
    from loraforge.core.models import gguf_source, load_model
    from loraforge.export.llamacpp import write_lora_gguf, write_merged_gguf

    if not args.merged and args.adapter is None:
        raise LoraforgeError("export needs --adapter A (a llama.cpp LoRA), or --merged (the whole model)")
    model, tokenizer = load_model(args.model, task="causal-lm")
    if not args.merged:
        out = write_lora_gguf(model, args.adapter, args.out, args.dtype)
        print(f"llama.cpp LoRA written to {out} (load it on {args.model} with --lora {out})")
        return 0
    if args.adapter is not None:
        model = merge_and_unload(load_adapter(model, args.adapter))
    out = write_merged_gguf(model, tokenizer, args.out, args.dtype, gguf_source(args.model))
    print(f"{'merged' if args.adapter else 'base'} model written to {out} ({args.dtype})")
    return 0
