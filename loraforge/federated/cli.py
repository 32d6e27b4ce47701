"""`loraforge fed aggregate`: combine clients' adapters into one (FedAvg, FLoRA, LoRA-FAIR), or
with --merge-into fold the aggregate into the base model as FLoRA's server does.
`loraforge fed run`: federated training in Flower's simulation engine (flower.py; needs the fed extra)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from loraforge.core.errors import AdapterError
from loraforge.federated.strategies import STRATEGIES, taking

RUN_HELP = ("Federated training in Flower's simulation engine: every flag is a FedRunConfig field; --cpus N "
            "(default 2) is how many CPUs the simulation may use, one per client at a time.")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `fed` (with its `aggregate` and `run` subcommands) to the top-level `loraforge` subparsers."""
    fed = subparsers.add_parser("fed", help="federated fine-tuning: aggregate clients' adapters, run on Flower")
    sub = fed.add_subparsers(required=True, metavar="aggregate | run")
    p = sub.add_parser("aggregate", help="aggregate adapter folders into one adapter (or a merged model)")
    p.add_argument("--strategy", required=True, choices=STRATEGIES.names())
    p.add_argument("--adapters", required=True, nargs="+", help="the clients' adapter folders (PEFT format)")
    p.add_argument("--weights", help="comma-separated, one per adapter, non-negative, summing to 1 "
                                     "(e.g. n_k / sum n_j); default: equal")
    p.add_argument("--out", required=True, help="folder for the aggregate adapter (or the merged model)")
    p.add_argument("--pad", action="store_true",
                   help=f"{' / '.join(taking('pad'))}: zero-pad clients to the largest rank")
    p.add_argument("--lam", type=float, default=None,
                   help=f"{' / '.join(taking('lam'))}: ridge weight of the server residual (default 0.01)")
    p.add_argument("--merge-into", metavar="MODEL", help="fold the aggregate into this base model and write a "
                                                         "plain Hugging Face folder to --out")
    p.set_defaults(run=cmd_aggregate)

    p = sub.add_parser("run", help="federated training in Flower's simulation engine (needs the [fed] extra); "
                                   "`loraforge fed run --help` lists its flags", add_help=False)
    p.set_defaults(run=cmd_run, config_flags=True)
    return fed


def cmd_aggregate(args: argparse.Namespace) -> int:
    from loraforge.federated import aggregate

    weights = parse_weights(args.weights) if args.weights else None
    given = {"pad": args.pad or None, "lam": args.lam}  # the strategy's settings, where a flag was given
    options = {name: value for name, value in given.items() if value is not None}
    settings = STRATEGIES.settings(args.strategy)
    for name in options:
        if name not in settings:
            raise AdapterError(f"--{name} is for {' and '.join(taking(name))}; {args.strategy} takes "
                               f"{' '.join('--' + s for s in settings) or 'none of these flags'}")
    if not args.merge_into:
        result = aggregate(args.strategy, args.adapters, weights, out=args.out, **options)
        print(f"{args.strategy}: aggregate of {len(args.adapters)} adapters (rank {result.config.rank}) "
              f"written to {args.out}")
        return 0
    from loraforge.adapters.io import load_pretrained
    from loraforge.training.evaluate import merge_to_folder

    with tempfile.TemporaryDirectory(prefix="loraforge-fed-") as tmp:
        adapter_dir = Path(tmp) / "aggregate"
        aggregate(args.strategy, args.adapters, weights, out=adapter_dir, **options)
        model, tokenizer = load_pretrained(args.merge_into, adapter_dir)
        merge_to_folder(model, tokenizer, args.out)
    print(f"{args.strategy}: aggregate of {len(args.adapters)} adapters merged into {args.merge_into}, "
          f"written to {args.out}")
    return 0


def cmd_run(argv: list[str]) -> int:
    """`loraforge fed run ARGS`: FedRunConfig's fields as flags (core.configs), plus --cpus."""
    try:
        from loraforge.federated.flower import FedRunConfig, run
    except ImportError as exc:
        raise AdapterError(f"fed run needs Flower: pip install 'loraforge[fed]' ({exc})") from exc
    from loraforge.core.configs import parse_flags

    simulation = argparse.ArgumentParser(add_help=False)
    simulation.add_argument("--cpus", type=int, default=2)
    given, rest = simulation.parse_known_args(argv)
    config = FedRunConfig(**parse_flags(FedRunConfig, rest, prog="loraforge fed run", description=RUN_HELP))
    out = run(config, num_cpus=given.cpus)
    print(f"global adapter, metrics.jsonl and accuracy.png in {out}")
    return 0


def parse_weights(text: str) -> list[float]:
    try:
        return [float(w) for w in text.split(",")]
    except ValueError as exc:
        raise AdapterError(f"--weights {text!r}: expected comma-separated numbers such as 0.2,0.3,0.5") from exc
