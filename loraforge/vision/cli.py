"""`loraforge testbed build glyphs`, `loraforge fewshot` and `loraforge datadream`: the vision stage on the command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from loraforge.core.configs import parse_flags
from loraforge.core.files import atomic_write_text

FEWSHOT_HELP = ("CLIP few-shot classification, class-name prompts as the classifier: zero-shot, a linear probe and "
                "an adapter on both towers (--method, --regularizer), accuracy on the test split per shot count, "
                "averaged over seeds.")
DATADREAM_HELP = ("DataDream: LoRA on the diffusion UNet and text encoder from the real shots, images generated "
                  "with it, CLIP LoRA-tuned on them and the shots; OUT gets the adapters, contact_sheet.png and "
                  "report.json.")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    testbed = subparsers.add_parser("testbed", help="build the vision testbed: glyph images, a small CLIP and a "
                                                    "text-to-image UNet (cached)")
    build = testbed.add_subparsers(required=True, metavar="build").add_parser("build", help="build a testbed")
    p = build.add_subparsers(required=True, metavar="glyphs").add_parser(
        "glyphs", help="glyphs of matplotlib's fonts + sklearn digits, a CLIP and a UNet trained on them")
    p.add_argument("--quick", action="store_true", help="the small testbed of tests and bench --quick (~10 min)")
    p.add_argument("--out", default=None, help="folder to build into (default: under the user cache)")
    p.add_argument("--clip-minutes", type=float, default=None, help="override the preset's CLIP training time")
    p.add_argument("--unet-minutes", type=float, default=None, help="override the preset's UNet training time")
    p.set_defaults(run=cmd_build)
    p = subparsers.add_parser("fewshot", help="CLIP few-shot classification with an adapter on both towers "
                                              "(loraforge fewshot --help lists its flags)", add_help=False)
    p.set_defaults(run=cmd_fewshot, config_flags=True)
    p = subparsers.add_parser("datadream", help="DataDream: LoRA a text-to-image model on the shots, generate a "
                                                "training set, tune CLIP on it (loraforge datadream --help)", add_help=False)
    p.set_defaults(run=cmd_datadream, config_flags=True)


def cmd_build(args: argparse.Namespace) -> int:
    from loraforge.vision.glyphs import testbed_dir
    from loraforge.vision.testbed import PRESETS, build_testbed

    preset = PRESETS["quick" if args.quick else "full"]
    overrides = {k: v for k, v in (("clip_minutes", args.clip_minutes), ("unet_minutes", args.unet_minutes)) if v is not None}
    out = args.out or testbed_dir(args.quick)
    report = build_testbed(out, dataclasses.replace(preset, **overrides), log=lambda line: print(line, file=sys.stderr))
    print(json.dumps({"out": str(out), "minutes": report["minutes"], "clip_zero_shot": report["clip_zero_shot"],
                      "cnn_judge_accuracy": report["cnn_judge_accuracy"],
                      "diffusion_clip_agreement": report["diffusion_clip_agreement"]}, indent=2))
    return 0


def cmd_fewshot(flags: list[str]) -> int:
    from loraforge.vision.fewshot import FewShotSettings, run_fewshot

    settings = FewShotSettings(**parse_flags(FewShotSettings, flags, prog="loraforge fewshot",
                                             description=FEWSHOT_HELP))
    result = run_fewshot(settings, log=lambda line: print(line, file=sys.stderr))
    if settings.json:
        atomic_write_text(settings.json, json.dumps(result, indent=2) + "\n")
    print(json.dumps({"zero_shot": result["zero_shot"], "rows": [
        {k: r[k] for k in ("shots", "system", "accuracy")} for r in result["rows"]]}, indent=2))
    return 0


def cmd_datadream(flags: list[str]) -> int:
    from loraforge.vision.datadream import DataDreamSettings, run_datadream

    settings = DataDreamSettings(**parse_flags(DataDreamSettings, flags, prog="loraforge datadream",
                                               description=DATADREAM_HELP))
    report = run_datadream(settings, log=lambda line: print(line, file=sys.stderr))
    print(json.dumps({k: report[k] for k in ("accuracy", "real_only_accuracy", "zero_shot", "seconds")}, indent=2))
    return 0
