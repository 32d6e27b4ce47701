"""`loraforge bench ...`: each benchmark is a sub-command."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys


def add_parser(subparsers) -> None:
    from .methods import BenchRun

    bench = subparsers.add_parser("bench", help="benchmarks; tables go to docs/benchmarks.md")
    kinds = bench.add_subparsers(required=True, metavar="methods | parity")
    p = kinds.add_parser("methods", help="train every registered method with one budget and compare")
    for f in dataclasses.fields(BenchRun):
        if f.name not in ("method", "init"):
            p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    p.add_argument("--methods", default=None, help="comma-separated subset (default: every registered method)")
    p.set_defaults(run=run_methods)

    p = kinds.add_parser("parity", help="loraforge and PEFT load each other's adapters: logit differences")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rank", type=int, default=8)
    p.set_defaults(run=run_parity)


def run_methods(args: argparse.Namespace) -> int:
    from .methods import BenchRun, bench_methods

    fields = {f.name for f in dataclasses.fields(BenchRun)}
    base = BenchRun(**{k: v for k, v in vars(args).items() if k in fields})
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    bench_methods(base, methods, command=_command())
    return 0


def run_parity(args: argparse.Namespace) -> int:
    from .parity import bench_parity

    bench_parity(args.model, args.rank, command=_command())
    return 0


def _command() -> str:
    return "loraforge " + " ".join(shlex.quote(a) for a in sys.argv[1:])
