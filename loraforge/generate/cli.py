"""`loraforge zoo build`: adapters as data, on the command line."""

from __future__ import annotations

import argparse

from loraforge.generate.zoo import ZooConfig


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    zoo = subparsers.add_parser("zoo", help="an adapter zoo: one LoRA per task of a procedural family")
    zoo_sub = zoo.add_subparsers(required=True, metavar="build")
    p = zoo_sub.add_parser("build", help="train one LoRA (K checkpoints) per task value into ZOO")
    p.add_argument("--family", required=True, help="offset | labels")
    p.add_argument("--values", required=True, help="comma-separated task values, e.g. 1,2,3 or good/bad,yes/no")
    p.add_argument("--out", required=True, help="the zoo folder (tasks already in its index are kept)")
    p.add_argument("--model", default=ZooConfig.model)
    p.add_argument("--steps", type=int, default=ZooConfig.steps)
    p.add_argument("--checkpoints", type=int, default=ZooConfig.checkpoints, help="adapters kept per task (K)")
    p.add_argument("--restart-steps", type=int, default=ZooConfig.restart_steps,
                   help="steps of each restart that yields checkpoints 1..K-1")
    p.add_argument("--rank", type=int, default=ZooConfig.rank)
    p.add_argument("--alpha", type=float, default=ZooConfig.alpha)
    p.add_argument("--targets", default=ZooConfig.targets)
    p.add_argument("--lr", type=float, default=ZooConfig.lr)
    p.add_argument("--batch-size", type=int, default=ZooConfig.batch_size)
    p.add_argument("--n-train", type=int, default=ZooConfig.n_train)
    p.add_argument("--n-test", type=int, default=ZooConfig.n_test)
    p.add_argument("--data", default=None, help="folder holding sst2/train.tsv (labels); default $LORAFORGE_DATA")
    p.add_argument("--seed", type=int, default=ZooConfig.seed)
    p.set_defaults(run=cmd_zoo_build)


def cmd_zoo_build(args: argparse.Namespace) -> int:
    from loraforge.generate.zoo import build_zoo, load_zoo

    config = ZooConfig(family=args.family, values=[v.strip() for v in args.values.split(",") if v.strip()],
                       model=args.model, out=args.out, steps=args.steps, checkpoints=args.checkpoints,
                       restart_steps=args.restart_steps, rank=args.rank, alpha=args.alpha, targets=args.targets,
                       lr=args.lr, batch_size=args.batch_size, n_train=args.n_train, n_test=args.n_test,
                       data=args.data, seed=args.seed)
    zoo = load_zoo(build_zoo(config))
    print(f"zoo {zoo.root}: {len(zoo.tasks)} tasks on {zoo.model}, rank {zoo.rank}, {len(zoo.targets)} target modules")
    return 0
