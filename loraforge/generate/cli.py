"""`loraforge zoo build`, `loraforge generator train | sample`, `loraforge meta train | adapt`: adapters as data,
on the command line."""

from __future__ import annotations

import argparse
import json

from loraforge.core.errors import LoraforgeError
from loraforge.generate.abmll import ABMLLConfig
from loraforge.generate.cvae import REFERENCE_CHANNELS
from loraforge.generate.zoo import ZooConfig

KINDS = ("icm-lora", "sg-lora", "hypernet")


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

    gen = subparsers.add_parser("generator", help="generate adapters from examples or a description")
    gen_sub = gen.add_subparsers(required=True, metavar="train | sample")
    p = gen_sub.add_parser("train", help="train a generator on a zoo")
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--zoo", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--latent-dim", type=int, default=64, help="CVAE latent size (icm-lora, sg-lora)")
    p.add_argument("--channels", default=",".join(map(str, REFERENCE_CHANNELS)),
                   help="CVAE encoder channels, one stride-2 block each (default: the reference's 12)")
    p.add_argument("--top-k", type=int, default=3, help="sg-lora: experts mixed into the condition")
    p.add_argument("--temperature", type=float, default=0.05, help="sg-lora: softmax temperature over cosines")
    p.add_argument("--condition", choices=("description", "examples"), default="description",
                   help="hypernet: what the hypernetwork reads")
    p.add_argument("--hidden", type=int, default=64, help="hypernet: hidden width")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_generator_train)

    p = gen_sub.add_parser("sample", help="write a PEFT-format LoRA for a new task")
    p.add_argument("--generator", required=True)
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--examples", help="chat JSONL of the task's examples (icm-lora)")
    given.add_argument("--description", help="the task in a sentence (sg-lora, hypernet)")
    p.add_argument("--seed", type=int, default=0, help="draws z ~ N(0, I) (icm-lora, sg-lora)")
    p.add_argument("--mean", action="store_true", help="decode z = 0 instead of a sample (icm-lora, sg-lora)")
    p.add_argument("--model", default=None, help="the base model the adapter is for (must be the generator's)")
    p.add_argument("--out", required=True)
    p.set_defaults(run=cmd_generator_sample)

    meta = subparsers.add_parser("meta", help="meta-learn a Bayesian LoRA prior over a zoo's tasks (ABMLL)")
    meta_sub = meta.add_subparsers(required=True, metavar="train | adapt")
    p = meta_sub.add_parser("train", help="meta-train the prior theta on the zoo's tasks")
    p.add_argument("--algo", choices=("abmll",), default="abmll")
    p.add_argument("--zoo", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--family", default=None, help="only this family's tasks (default: all)")
    p.add_argument("--steps", type=int, default=ABMLLConfig.meta_steps, help="meta steps")
    p.add_argument("--rank", type=int, default=None, help="default: the zoo's")
    p.add_argument("--beta", type=float, default=ABMLLConfig.beta)
    p.add_argument("--gamma", type=float, default=ABMLLConfig.gamma)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_meta_train)
    p = meta_sub.add_parser("adapt", help="adapt the prior to a new task's few examples; write its adapter")
    p.add_argument("--meta", required=True)
    p.add_argument("--examples", required=True, help="chat JSONL: the new task's support set")
    p.add_argument("--steps", type=int, default=None, help="inner steps (default: the meta-training's)")
    p.add_argument("--eval", default=None, help="chat JSONL of the task's labelled rows: print accuracy and ECE")
    p.add_argument("--out", required=True)
    p.set_defaults(run=cmd_meta_adapt)


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


def cmd_generator_train(args: argparse.Namespace) -> int:
    from loraforge.generate.cvae import CVAEConfig
    from loraforge.generate.zoo import load_zoo

    zoo = load_zoo(args.zoo)
    try:
        channels = tuple(int(c) for c in args.channels.split(","))
    except ValueError:
        raise LoraforgeError(f"--channels must be comma-separated integers, got {args.channels!r}") from None
    cvae = CVAEConfig(latent_dim=args.latent_dim, channels=channels, steps=args.steps, lr=args.lr, seed=args.seed)
    if args.kind == "icm-lora":
        from loraforge.generate.icm_lora import ICMLoRAConfig, train_icm_lora

        out = train_icm_lora(zoo, args.out, ICMLoRAConfig(cvae=cvae, seed=args.seed))
    elif args.kind == "sg-lora":
        from loraforge.generate.sg_lora import SGLoRAConfig, train_sg_lora

        out = train_sg_lora(zoo, args.out, SGLoRAConfig(cvae=cvae, top_k=args.top_k, temperature=args.temperature,
                                                        seed=args.seed))
    else:
        from loraforge.generate.hypernet import HypernetConfig, train_hypernet

        out = train_hypernet(zoo, args.out, HypernetConfig(condition=args.condition, hidden=args.hidden,
                                                           steps=args.steps, lr=args.lr, seed=args.seed))
    print(f"{args.kind} generator written to {out}")
    return 0


def cmd_generator_sample(args: argparse.Namespace) -> int:
    from loraforge.generate.generator import load_generator, write_generated

    record, _ = load_generator(args.generator, args.model)
    seed = None if args.mean else args.seed
    z = {"z": "zero" if seed is None else f"seed {seed}"}
    if record.kind == "icm-lora":
        from loraforge.generate.icm_lora import ICMLoRA

        if args.examples is None:
            raise LoraforgeError("an icm-lora generator conditions on examples: pass --examples FILE")
        icm = ICMLoRA.load(args.generator)
        state = icm.generate(icm.vector_of(args.examples), seed)
        given = {"examples": args.examples, **z}
    elif record.kind == "sg-lora":
        from loraforge.generate.sg_lora import SGLoRA

        if args.description is None:
            raise LoraforgeError("an sg-lora generator conditions on a description: pass --description TEXT")
        state, weights = SGLoRA.load(args.generator).generate(args.description, seed)
        given = {"description": args.description, "expert_weights": {
            t["id"]: round(float(w), 4) for t, w in zip(record.tasks, weights) if w > 0}, **z}
    elif record.kind == "hypernet":
        from loraforge.generate.hypernet import Hypernet

        hyper = Hypernet.load(args.generator)
        state = hyper.generate(hyper.condition_of(args.description, args.examples))
        given = {"description": args.description} if args.description is not None else {"examples": args.examples}
    else:
        raise LoraforgeError(f"{args.generator}: unknown generator kind {record.kind!r}")
    out = write_generated(args.out, record, state, given)
    print(f"{record.kind} adapter written to {out}")
    return 0


def cmd_meta_train(args: argparse.Namespace) -> int:
    from loraforge.generate.meta import train_meta
    from loraforge.generate.zoo import load_zoo

    zoo = load_zoo(args.zoo)
    config = ABMLLConfig(rank=args.rank or zoo.rank, meta_steps=args.steps, beta=args.beta, gamma=args.gamma,
                         seed=args.seed)
    print(f"abmll prior written to {train_meta(zoo, args.out, config, family=args.family)}")
    return 0


def cmd_meta_adapt(args: argparse.Namespace) -> int:
    from loraforge.generate.meta import adapt_meta

    adapted = adapt_meta(args.meta, args.examples, args.out, steps=args.steps)
    print(f"abmll adapter written to {adapted.path}")
    if args.eval:
        from loraforge.generate.calibration import accuracy_and_ece, answer_words, label_probs
        from loraforge.training.data import read_rows

        rows = read_rows(args.eval)
        probs, labels = label_probs(adapted.model, adapted.tokenizer, rows, answer_words(rows),
                                    samples=adapted.config.samples)
        print(json.dumps(accuracy_and_ece(probs, labels)))
    return 0
