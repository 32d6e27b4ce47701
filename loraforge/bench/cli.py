"""`loraforge bench ...`: each benchmark is a sub-command."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

PROJECT_REPORT = Path("docs/benchmarks.md")  # `--report` alone: the benchmarks page of the project run from


def add_parser(subparsers) -> None:
    from loraforge.bench.methods import BenchRun

    bench = subparsers.add_parser("bench", help="benchmarks: each prints its table; --report PATH also appends it "
                                                "to that Markdown file")
    kinds = bench.add_subparsers(required=True, metavar="methods | parity | intruders | fed | serve | speed")
    p = kinds.add_parser("methods", help="train every registered method with one budget and compare")
    for f in dataclasses.fields(BenchRun):
        if f.name not in ("method", "init", "rule"):
            p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    p.add_argument("--methods", default=None, help="comma-separated subset (default: every registered method)")
    p.add_argument("--rules", default="adamw", help="comma-separated optimizers, regularizers and selectors, each run "
                                                   "with every method (e.g. adamw,lora-plus,lora-pro,allora,glad,lisa)")
    p.add_argument("--pairs", default=None, help="comma-separated METHOD/RULE combinations to run instead of crossing "
                                                 "--methods with --rules (e.g. lora/adamw,dora/adamw,lora/lisa)")
    p.add_argument("--lrs", default=None, help="comma-separated learning rates: sweep them all (e.g. 1e-5,1e-4,1e-3,1e-2)")
    p.add_argument("--inits", default=None, help="comma-separated initialisers, each run on plain LoRA (default: every "
                                                 "one that starts LoRA when --methods is not given; '' for none)")
    p.add_argument("--method-lrs", default="", help="learning rates per method or initialiser, e.g. full=1e-4,pissa=5e-4 (others: --lr)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, each pinned to one core with one thread")
    p.set_defaults(run=run_methods)

    p = kinds.add_parser("parity", help="loraforge and PEFT load each other's adapters: logit differences")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rank", type=int, default=8)
    p.set_defaults(run=run_parity)

    from loraforge.bench.speed import SpeedRun

    p = kinds.add_parser("speed", help="a LoRA training step against the frozen-base limit and PEFT, per precision")
    for f in dataclasses.fields(SpeedRun):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            p.add_argument(flag, type=type(f.default), default=f.default)
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.set_defaults(run=run_speed)

    from loraforge.bench.intruders import IntruderBench

    p = kinds.add_parser("intruders", help="LoRA ranks vs full fine-tuning: intruder dimensions, forgetting, mitigation")
    _dataclass_flags(p, IntruderBench)
    p.set_defaults(run=run_intruders)

    from loraforge.bench.fed import FedBench

    p = kinds.add_parser("fed", help="FedAvg vs FLoRA vs LoRA-FAIR vs centralised on Flower's simulation engine")
    _dataclass_flags(p, FedBench)
    p.set_defaults(run=run_fed)

    from loraforge.bench.serve import ServeBench

    p = kinds.add_parser("serve", help="multi-adapter serving throughput against PEFT and merging; --load: HTTP load test")
    _dataclass_flags(p, ServeBench)
    p.set_defaults(run=run_serve)

    for p in kinds.choices.values():
        p.add_argument("--report", type=Path, nargs="?", const=PROJECT_REPORT, default=None, metavar="PATH",
                       help=f"append a dated section (machine, command, table) to this Markdown file, its figure "
                            f"beside it; --report alone: {PROJECT_REPORT}. Default: print the table only")


def run_methods(args: argparse.Namespace) -> int:
    from loraforge.bench.methods import BenchRun, bench_methods

    fields = {f.name for f in dataclasses.fields(BenchRun)}
    base = BenchRun(**{k: v for k, v in vars(args).items() if k in fields})
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    inits = None if args.inits is None else [i.strip() for i in args.inits.split(",") if i.strip()]
    pairs = _pairs(args.pairs) if args.pairs else None
    if pairs:
        if args.methods or args.inits or args.rules != "adamw":
            raise SystemExit("--pairs names the combinations itself: drop --methods, --rules and --inits")
        rules, inits = None, []
    if args.lrs:
        from loraforge.bench.sweep import bench_sweep

        bench_sweep(base, methods, rules, [float(x) for x in args.lrs.split(",")], command=_command(), inits=inits,
                    jobs=args.jobs, pairs=pairs, report=args.report)
    else:
        bench_methods(base, methods, command=_command(), rules=rules, inits=inits,
                      method_lrs=_method_lrs(args.method_lrs), jobs=args.jobs, pairs=pairs, report=args.report)
    return 0


def _pairs(text: str) -> list[tuple[str, str]]:
    """'lora/adamw,dora/adamw' -> [('lora', 'adamw'), ('dora', 'adamw')], with an error that names a bad item."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        method, slash, rule = item.partition("/")
        if not slash or not method.strip() or not rule.strip():
            raise SystemExit(f"--pairs: {item!r} is not METHOD/RULE")
        pairs.append((method.strip(), rule.strip()))
    return pairs


def _method_lrs(text: str) -> dict[str, float]:
    """'full=1e-4,bone=5e-4' -> {'full': 1e-4, 'bone': 5e-4}, with an error that names a bad item."""
    rates = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        try:
            rates[name.strip()] = float(value)
        except ValueError:
            raise SystemExit(f"--method-lrs: {item!r} is not NAME=RATE") from None
    return rates


def run_parity(args: argparse.Namespace) -> int:
    from loraforge.bench.parity import bench_parity

    bench_parity(args.model, args.rank, command=_command(), report=args.report)
    return 0


def run_intruders(args: argparse.Namespace) -> int:
    from loraforge.bench.intruders import IntruderBench, bench_intruders

    bench_intruders(_from_args(IntruderBench, args), command=_command(), report=args.report)
    return 0


def run_fed(args: argparse.Namespace) -> int:
    from loraforge.bench.fed import FedBench, bench_fed

    bench_fed(_from_args(FedBench, args), command=_command(), report=args.report)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from loraforge.bench.serve import ServeBench, bench_serve

    bench_serve(_from_args(ServeBench, args), command=_command(), report=args.report)
    return 0


def _dataclass_flags(p: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of a benchmark's settings dataclass, with its default."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            kind = str if f.default is None else type(f.default)
            p.add_argument(flag, type=kind, default=f.default, help=f"default {f.default}")


def _from_args(cls: type, args: argparse.Namespace):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def run_speed(args: argparse.Namespace) -> int:
    from loraforge.bench.speed import SpeedRun, bench_speed

    fields = {f.name for f in dataclasses.fields(SpeedRun)}
    bench_speed(SpeedRun(**{k: v for k, v in vars(args).items() if k in fields}), args.json, command=_command(),
                report=args.report)
    return 0


def _command() -> str:
    return "loraforge " + " ".join(shlex.quote(a) for a in sys.argv[1:])
