"""`loraforge analyze`: the report on an adapter (or a full fine-tune), or its intruder-mitigated copy.

    loraforge analyze --model M --adapter DIR [--compare DIR2 ...] --out REPORT_DIR [--k 10] [--epsilon 0.5]
    loraforge analyze --model M --adapter DIR --mitigate 0.75 --out NEW_ADAPTER

--adapter and --compare take adapter folders or folders of a fine-tuned model's safetensors weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from loraforge.core.errors import LoraforgeError


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("analyze", help="intruder dimensions, spectra and effective rank of adapters; "
                                              "--mitigate writes an adapter with its intruders scaled down")
    p.add_argument("--model", default="smollm2-135m", help="the base model: embedded name, local HF folder or .gguf file")
    p.add_argument("--adapter", required=True, help="adapter folder, or a folder of fine-tuned safetensors weights")
    p.add_argument("--compare", nargs="+", default=[], metavar="DIR",
                   help="more adapters / weight folders: a column and a line each, plus subspace similarity")
    p.add_argument("--out", required=True, help="report folder (or the new adapter's folder with --mitigate)")
    p.add_argument("--k", type=int, default=10, help="top singular vectors of W' checked for intruders")
    p.add_argument("--epsilon", type=float, default=0.5, help="intruder iff max |cosine| with W0's vectors < epsilon")
    p.add_argument("--mitigate", type=float, default=None, metavar="LAMBDA",
                   help="scale intruder singular values by LAMBDA (PEFT's default 0.75) and write the new adapter")
    p.set_defaults(run=cmd_analyze)
    return p


def cmd_analyze(args: argparse.Namespace) -> int:
    from loraforge.analysis.model import adapter_similarity, analyze, check_settings, mitigate
    from loraforge.analysis.report import write_report
    from loraforge.analysis.weights import source_kind

    check_settings(args.k, args.epsilon, 1.0 if args.mitigate is None else args.mitigate)
    sources = [args.adapter, *args.compare]
    kinds = [source_kind(s) for s in sources]  # fail on a missing folder before loading the model
    if args.mitigate is not None:
        if args.compare:
            raise LoraforgeError("--mitigate rewrites one adapter: drop --compare")
        if kinds[0] != "adapter":
            raise LoraforgeError(f"--mitigate needs an adapter folder; {args.adapter} holds full weights")
    model = load_base(args.model, args.adapter if kinds[0] == "adapter" else None)

    if args.mitigate is not None:
        found = mitigate(model, args.adapter, args.out, lam=args.mitigate, k=args.k, epsilon=args.epsilon)
        changed = sum(bool(i) for i in found.values())
        print(f"{sum(map(len, found.values()))} intruders in {changed} of {len(found)} modules scaled by "
              f"{args.mitigate}; adapter written to {args.out}")
        return 0

    labels = _labels(sources)
    compare = len(sources) > 1
    results = {label: analyze(model, source, args.k, args.epsilon, keep_subspace=compare, label=label)
               for label, source in zip(labels, sources)}
    similarity = {label: adapter_similarity(results[labels[0]], results[label]) for label in labels[1:]}
    report = write_report(results, args.out, args.k, args.epsilon, similarity, model_name=args.model)
    print(f"{report['total_intruders']} intruder dimensions in {len(report['modules'])} modules of {labels[0]} "
          f"(k={args.k}, epsilon={args.epsilon}); report written to {Path(args.out) / 'report.md'}")
    return 0


def load_base(model_name: str, adapter_dir: str | None):
    """The base model, loaded for the task and head the adapter was trained with (if one is given)."""
    from loraforge.adapters.inject import classification_head, detach
    from loraforge.adapters.io import load_pretrained
    from loraforge.core.registry import get_method

    model, _ = load_pretrained(model_name, adapter_dir)  # checks the adapter fits this model
    if adapter_dir is None:
        return model
    if not get_method(model.loraforge_config.method).trains_base:
        return detach(model)
    # A full fine-tune was loaded into the weights themselves: W0 needs a fresh copy, same head.
    head = classification_head(model)
    labels = model.get_submodule(head).out_features if head else None
    return load_pretrained(model_name, None, task="classification" if head else None, num_labels=labels)[0]


def _labels(sources: list[str]) -> list[str]:
    """Folder names; where two folders share a name, their position and path."""
    names = [Path(s).name or str(s) for s in sources]
    return [name if names.count(name) == 1 else f"{i + 1}:{s}" for i, (name, s) in enumerate(zip(names, sources))]
