"""`loraforge transfer prepare | run`: Trans-LoRA on the command line; the flags are the fields of
`PrepareConfig` and `TransferConfig` (pipeline.py)."""

from __future__ import annotations

import argparse
import json

from loraforge.core.configs import parse_flags

PREPARE_HELP = ("at source time, with the real data: keep --seeds rows, synthesise inputs with the source model, "
                "train the discriminator (a LoRA on the source, real vs synthetic) and write the kit")
RUN_HELP = ("from nothing but the kit: synthesise inputs with the target base, keep those the discriminator takes "
            "for real, label them greedily with source + adapter, train a fresh adapter on the target; OUT gets "
            "adapter/ (PEFT format), synthetic.jsonl (the labelled rows), candidates.jsonl (every candidate, its p_real, "
            "kept or not) and report.json")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    transfer = subparsers.add_parser("transfer", help="Trans-LoRA: move an adapter to another base model without "
                                                      "its training data")
    stages = transfer.add_subparsers(required=True, metavar="prepare | run")
    p = stages.add_parser("prepare", help=f"{PREPARE_HELP} (--help lists the flags)", add_help=False)
    p.set_defaults(run=cmd_prepare, config_flags=True)
    p = stages.add_parser("run", help=f"{RUN_HELP} (--help lists the flags)", add_help=False)
    p.set_defaults(run=cmd_run, config_flags=True)


def cmd_prepare(flags: list[str]) -> int:
    from loraforge.transfer.pipeline import PrepareConfig, prepare

    config = PrepareConfig(**parse_flags(PrepareConfig, flags, prog="loraforge transfer prepare",
                                         description=PREPARE_HELP))
    kit = prepare(config)
    print(json.dumps({"kit": config.out, "discriminator_accuracy": kit.discriminator_accuracy,
                      "n_real": kit.n_real, "n_synthetic": kit.n_synthetic}, indent=2))
    return 0


def cmd_run(flags: list[str]) -> int:
    from loraforge.transfer.pipeline import TransferConfig, transfer

    config = TransferConfig(**parse_flags(TransferConfig, flags, prog="loraforge transfer run", description=RUN_HELP))
    report = transfer(config)
    print(json.dumps({k: report[k] for k in ("generated", "accepted", "acceptance_rate", "discriminator_accuracy",
                                             "seconds")}, indent=2))
    return 0
