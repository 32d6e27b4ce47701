"""`loraforge` on the command line. The flags of `train` are `TrainConfig`'s fields, parsed by the one
config mechanism of `loraforge.core.configs` (also behind `bench` and `fed run`), so the CLI,
`--config run.yaml` and the Python API cannot drift apart.

Errors a user can fix (bad data, a missing model, an adapter for another base) print one line
and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from pathlib import Path
from typing import Any

from loraforge.core.errors import LoraforgeError

TRAIN_HELP = ("Train an adapter. Every flag is a TrainConfig field. --config FILE reads the same keys from YAML "
              "(flags given with it win); --print-config writes the effective config as YAML and exits, and "
              "--config reads that file back to the same run.")
COMMANDS = "demo | chat | train | eval | generate | merge | methods | analyze | fed | serve | convert | export | bench | zoo | generator | meta | testbed | fewshot | datadream | transfer | hyper | easyref | sample"
# Commands that live with their feature: each of these modules has add_parser(subparsers).
FEATURE_COMMANDS = ("loraforge.analysis.cli", "loraforge.federated.cli", "loraforge.serve.cli", "loraforge.bench.cli",
                    "loraforge.generate.cli", "loraforge.export.cli", "loraforge.vision.cli", "loraforge.demo.chat",
                    "loraforge.transfer.cli", "loraforge.personalize.cli")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, flags = parser.parse_known_args(argv)
    try:
        if getattr(args, "config_flags", False):  # a command whose flags are a config's fields (core.configs)
            return args.run(flags) or 0
        if flags:
            parser.error(f"unrecognized arguments: {' '.join(flags)}")
        return args.run(args) or 0
    except LoraforgeError as exc:
        print(f"loraforge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loraforge: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraforge", description="Low-rank adaptation of pretrained models.")
    sub = parser.add_subparsers(required=True, metavar=COMMANDS)

    p = sub.add_parser("train", help="train an adapter (loraforge train --help lists its flags)", add_help=False)
    p.set_defaults(run=cmd_train, config_flags=True)

    p = sub.add_parser("eval", help="loss, perplexity, accuracy or exact match of a model (+ adapter) on data")
    add_model_flags(p)
    p.add_argument("--data", required=True)
    p.add_argument("--metric", choices=("loss", "accuracy", "exact-match", "facts"), default=None,
                   help="what to measure: loss (and perplexity), accuracy (classification), exact-match "
                        "(generated answer = the last assistant turn, stripped; by number after '####'), "
                        "facts (the demo's held-out questions); default: accuracy for classification, loss otherwise")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--limit", type=int, default=None, help="generate answers for at most N rows (exact-match, facts)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--json", help="also write the metrics to this JSON file")
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("generate", help="answer a prompt (chat template applied)")
    add_model_flags(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("merge", help="fold an adapter into its base and write a plain Hugging Face folder")
    add_model_flags(p, adapter_required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--quant", choices=["nf4"], default=None,
                   help="the adapter was trained with --quant nf4: merge into the base's dequantised 4-bit weights, "
                        "the model it was trained with (as PEFT merges into a bitsandbytes base)")
    p.set_defaults(run=cmd_merge)

    p = sub.add_parser("methods", help="list the registered methods, initialisers and their options")
    p.add_argument("--shape", default="4096x4096", help="layer shape d_out x d_in for the parameter count")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print the methods and initialisers as JSON, with their options")
    p.set_defaults(run=cmd_methods)

    p = sub.add_parser("demo", help="the study-abroad advising demo on the embedded SmolLM2-135M")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kb", help="train and grade on this knowledge base (JSON; schema in loraforge.demo.kb_file; "
                                "every run writes its own as OUT/data/kb.json)")
    p.add_argument("--rag", action=argparse.BooleanOptionalAction, default=None,
                   help="train on questions behind their BM25 top-2 pages and grade base, base+rag, lora and "
                        "lora+rag (the default); --no-rag: no pages, base and lora only")
    p.add_argument("--universities", type=int, help="size of the generated knowledge base (default 19)")
    p.add_argument("--phase1-steps", type=int, help="phase 1 optimizer steps (default 36 with retrieval, 270 without)")
    p.add_argument("--phase2-steps", type=int, help="phase 2 optimizer steps (default 0 with retrieval: no phase 2; 12 without)")
    p.set_defaults(run=cmd_demo)

    for module in FEATURE_COMMANDS:
        importlib.import_module(module).add_parser(sub)
    return parser


def add_model_flags(p: argparse.ArgumentParser, adapter_required: bool = False) -> None:
    p.add_argument("--model", default="smollm2-135m", help="embedded name, local HF folder or .gguf file")
    p.add_argument("--adapter", required=adapter_required, help="adapter folder (loraforge or PEFT format)")
    p.add_argument("--task", choices=["causal-lm", "classification"], default=None)
    p.add_argument("--num-labels", type=int, default=None)


def train_config_from_argv(argv: list[str]):
    """The run `loraforge train ARGS` describes: TrainConfig's fields as flags (core.configs), on top
    of `--config FILE`'s keys; `--print-config` writes the effective config as YAML and exits."""
    from loraforge.core.configs import parse_flags, read_yaml
    from loraforge.training.config import TrainConfig

    files = argparse.ArgumentParser(add_help=False)
    files.add_argument("--config")
    files.add_argument("--print-config", action="store_true")
    given, rest = files.parse_known_args(argv)
    defaults = read_yaml(given.config) if given.config else {}
    if not isinstance(defaults.get("options", {}), dict):
        raise LoraforgeError(f"{given.config}: options must be a mapping of option names to values")
    config = TrainConfig(**parse_flags(TrainConfig, rest, prog="loraforge train", description=TRAIN_HELP,
                                       defaults=defaults))
    config.validate()
    config.adapter_config()  # refuses a bad method, init or option now, before any model or data loads
    return config, given.print_config


def cmd_train(argv: list[str]) -> int:
    from loraforge.core.configs import to_yaml
    from loraforge.training.loop import train

    config, print_config = train_config_from_argv(argv)
    if print_config:
        print(to_yaml(dataclasses.asdict(config)), end="")
        return 0
    result = train(config)
    if result.main_process:  # under `accelerate launch` every worker runs this: one report, rank 0's
        last = next((r for r in reversed(result.history) if "loss" in r), {})
        print(f"adapter written to {result.out / 'adapter'} (final loss {last.get('loss', float('nan')):.4f})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from loraforge.adapters.inject import classification_head
    from loraforge.adapters.io import load_pretrained
    from loraforge.core.models import default_device
    from loraforge.training.data import load_dataset
    from loraforge.training.evaluate import check_metric, default_metric, evaluate_dataset, exact_match

    model, tokenizer = load_pretrained(args.model, args.adapter, task=args.task, num_labels=args.num_labels)
    task = args.task or ("classification" if classification_head(model) else "causal-lm")
    metric = args.metric or default_metric(task)
    check_metric(metric, task)
    model.to(default_device())
    if metric == "facts":  # held-out questions, not training rows: no loss to compute
        metrics: dict[str, Any] = _fact_metrics(model, tokenizer, Path(args.data), args)
    else:
        data = load_dataset(args.data, tokenizer, task=task, max_length=args.max_length, num_labels=args.num_labels)
        metrics = evaluate_dataset(model, data, batch_size=args.batch_size, pad_id=tokenizer.pad_token_id or 0, progress=True)
    if metric == "exact-match":
        metrics.update(exact_match(model, tokenizer, args.data, max_new_tokens=args.max_new_tokens,
                                   batch_size=args.batch_size, limit=args.limit))
    print(json.dumps(metrics, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


def _fact_metrics(model: Any, tokenizer: Any, path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Fact accuracy on rows of the demo's heldout.jsonl (one EvalItem per line), graded as the demo does."""
    from loraforge.core.errors import DataError
    from loraforge.demo import DemoSettings, ask
    from loraforge.demo.advising import EvalItem

    if not path.is_file():
        raise DataError(path, None, "file not found")
    items = []
    for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            items.append(EvalItem(**json.loads(text)))
        except (json.JSONDecodeError, TypeError) as e:
            raise DataError(path, line, f"not a held-out question (keys of loraforge.demo.advising.EvalItem): {e}") from None
    if not items:
        raise DataError(path, None, "no held-out questions")
    settings = DemoSettings(max_new_tokens=args.max_new_tokens, eval_batch_size=args.batch_size)
    return ask(model, tokenizer, items[:args.limit], settings)[1]


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from loraforge.adapters.io import load_pretrained
    from loraforge.core.models import default_device
    from loraforge.training.evaluate import generate

    torch.manual_seed(args.seed)
    model, tokenizer = load_pretrained(args.model, args.adapter)
    model.to(default_device())
    print(generate(model, tokenizer, [args.prompt], max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_p=args.top_p)[0])
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    import torch

    from loraforge.adapters.io import load_pretrained
    from loraforge.training.evaluate import merge_to_folder

    model, tokenizer = load_pretrained(args.model, args.adapter, task=args.task, num_labels=args.num_labels)
    if args.quant:
        from loraforge.quant.nf4 import dequantize_base, quantize_base

        quantize_base(model)
        dequantize_base(model)
    out = merge_to_folder(model, tokenizer, args.out, dtype=getattr(torch, args.dtype) if args.dtype else None)
    print(f"merged model written to {out}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from loraforge.core.config import AdapterConfig
    from loraforge.core.registry import describe_options, initializers, methods

    own_init = {name: i for i in initializers() for name in i.default_for}  # a method's own start: its options apply
    options = {m.name: describe_options(m.options) + describe_options(getattr(own_init.get(m.name), "options", None))
               for m in methods()}
    if args.json:
        from loraforge.serve.updates import serving_path

        print(json.dumps({
            "methods": [{"name": m.name, "axis": m.axis, "paper": m.paper, "merges": m.merges,
                         "peft_loads": m.peft_type is not None, "verified": m.verified,
                         "serves": serving_path(m.name), "options": options[m.name]}
                        for m in methods()],
            "initializers": [{"name": i.name, "paper": i.paper, "methods": list(i.methods), "needs_data": i.needs_data,
                              "options": describe_options(i.options)} for i in initializers()],
        }, indent=2))
        return 0
    try:
        d_out, d_in = (int(v) for v in args.shape.lower().split("x"))
    except ValueError:
        raise LoraforgeError(f"--shape must look like 4096x4096 (d_out x d_in), got {args.shape!r}") from None
    config = AdapterConfig(rank=args.rank)
    rows = [(m.name, m.axis, f"{m.trainable_params(d_in, d_out, config):,}", "yes" if m.merges else "no",
             "yes" if m.peft_type else "no", "yes" if m.verified else "interpretation", m.paper) for m in methods()]
    header = ("method", "axis", f"params {d_out}x{d_in} r={args.rank}", "merges", "PEFT loads", "verified", "paper")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    print("\noptions (--option NAME=VALUE):")
    chosen_inits = [(f"--init {i.name}", describe_options(i.options)) for i in initializers() if not i.default_for]
    for owner, described in [*options.items(), *chosen_inits]:
        for f in described:
            print(f"  {owner}: {f['name']} ({f['type']}, default {f['default']!r}): {f['help']}")
    from loraforge.core.plugins import OPTIMIZERS, REGULARIZERS, SELECTORS

    print(f"\n--optimizer: {', '.join(OPTIMIZERS.names())}\n--regularizer: {', '.join(REGULARIZERS.names())}\n"
          f"--select: {', '.join(SELECTORS.names())}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from loraforge.demo import DemoSettings, run_demo

    given = {"rag": args.rag, "universities": args.universities, "phase1_steps": args.phase1_steps,
             "phase2_steps": args.phase2_steps}
    settings = DemoSettings(**{k: v for k, v in given.items() if v is not None})
    results = run_demo(out=args.out, seed=args.seed, kb=args.kb, settings=settings)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
