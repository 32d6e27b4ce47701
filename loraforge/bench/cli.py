"""`loraforge bench ...`: each benchmark is a sub-command."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys


def add_parser(subparsers) -> None:
    from .methods import BenchRun

    bench = subparsers.add_parser("bench", help="benchmarks; tables go to docs/benchmarks.md")
    kinds = bench.add_subparsers(required=True, metavar="methods")
    p = kinds.add_parser("methods", help="train every registered method with one budget and compare")
    for f in dataclasses.fields(BenchRun):
        if f.name not in ("method", "init"):
            p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    p.add_argument("--methods", default=None, help="comma-separated subset (default: every registered method)")
    p.set_defaults(run=run_methods)


def run_methods(args: argparse.Namespace) -> int:
    from .methods import BenchRun, bench_methods

    fields = {f.name for f in dataclasses.fields(BenchRun)}
    base = BenchRun(**{k: v for k, v in vars(args).items() if k in fields})
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    bench_methods(base, methods, command="loraforge " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    return 0
