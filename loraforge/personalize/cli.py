"""`loraforge hyper train|personalize|subjects`, `loraforge easyref train` and `loraforge sample`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    hyper = subparsers.add_parser("hyper", help="hypernetwork personalisation: images of a subject -> a LoRA "
                                                "for a text-to-image UNet, in one forward")
    kinds = hyper.add_subparsers(required=True, metavar="train | personalize | subjects")
    p = kinds.add_parser("train", help="train the hypernetwork through the frozen UNet on subject folders")
    _model_flags(p)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--l2", type=float, default=1e-4, help="lambda of the L2 penalty on the predicted A and B")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_hyper_train)
    p = kinds.add_parser("personalize", help="a subject's images -> a PEFT LoRA folder (no optimisation)")
    p.add_argument("--hyper", required=True, help="folder written by `hyper train`")
    p.add_argument("--images", nargs="+", required=True, help="the subject's reference images")
    p.add_argument("--out", required=True, help="adapter folder to write (PEFT format)")
    p.add_argument("--diffusion", default=None, help="diffusion folder (default: the one H was trained on)")
    p.set_defaults(run=cmd_hyper_personalize)
    p = kinds.add_parser("subjects", help="write glyph subjects: a character in one style (font, colour, weight)")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=60, help="subjects")
    p.add_argument("--images", type=int, default=6, help="images per subject")
    p.add_argument("--heldout", action="store_true", help="in the held-out font (STIX) instead of the seen ones")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_subjects)

    easyref = subparsers.add_parser("easyref", help="EasyRef: a multi-reference encoder + decoupled cross-attention")
    p = easyref.add_subparsers(required=True, metavar="train").add_parser(
        "train", help="progressive training (alignment, then the adapter) on subject folders")
    _model_flags(p)
    p.add_argument("--encoder-kind", choices=("easyref", "mean"), default="easyref",
                   help="mean: the embedding-mean (IP-Adapter) baseline through the same adapter")
    p.add_argument("--align-steps", type=int, default=150)
    p.add_argument("--adapter-steps", type=int, default=150)
    p.add_argument("--tokens", type=int, default=4, help="learnable reference tokens")
    p.add_argument("--instruction", default="a character")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_easyref_train)

    p = subparsers.add_parser("sample", help="sample a text-to-image folder (+ LoRA, HM-CFG, DECOR, EasyRef "
                                             "references): images and a contact sheet")
    p.add_argument("--diffusion", required=True, help="unet/, scheduler/, text_encoder/, tokenizer/")
    p.add_argument("--adapter", default=None, help="a PEFT LoRA folder for the UNet")
    p.add_argument("--prompt", required=True)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--out", required=True)
    p.add_argument("--guidance", type=float, default=2.0, help="plain classifier-free guidance")
    p.add_argument("--hm-cfg", default=None, metavar="w_c,w_s", help="Hybrid-Model CFG weights (needs --adapter)")
    p.add_argument("--decor", action="store_true", help="DECOR: project the prompt's states off --decor-remove")
    p.add_argument("--decor-remove", default=None, metavar="WORDS", help="comma-separated unwanted words")
    p.add_argument("--decor-strength", type=float, default=1.0, help="a in X' = X - a X V V^T, in [0, 1]")
    p.add_argument("--references", nargs="+", default=None, help="EasyRef reference images (needs --easyref)")
    p.add_argument("--easyref", default=None, help="folder written by `easyref train`")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_sample)


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--diffusion", required=True, help="diffusion folder: unet/, scheduler/, text_encoder/, tokenizer/")
    p.add_argument("--encoder", required=True, help="CLIP folder whose image tower reads the references")
    p.add_argument("--subjects", required=True, help="folder of subject folders (images + prompt.txt)")
    p.add_argument("--out", required=True)


def _log(line: str) -> None:
    print(line, file=sys.stderr)


def cmd_hyper_train(args: argparse.Namespace) -> int:
    from loraforge.personalize.hypernet import HyperConfig, train_hyper

    config = HyperConfig(rank=args.rank, hidden=args.hidden, steps=args.steps, lr=args.lr, l2=args.l2, seed=args.seed)
    record = train_hyper(args.diffusion, args.encoder, args.subjects, args.out, config, log=_log)
    print(json.dumps({"out": args.out, "subjects": record["subjects"], "last": record["history"][-1]}))
    return 0


def cmd_hyper_personalize(args: argparse.Namespace) -> int:
    from loraforge.personalize.hypernet import TrainedHyper

    print(json.dumps(TrainedHyper(args.hyper).personalize(args.images, args.out, args.diffusion)))
    return 0


def cmd_subjects(args: argparse.Namespace) -> int:
    from loraforge.personalize.references import glyph_subjects

    subjects = glyph_subjects(args.out, args.n, args.images, args.heldout, args.seed)
    print(json.dumps({"out": args.out, "subjects": len(subjects)}))
    return 0


def cmd_easyref_train(args: argparse.Namespace) -> int:
    from loraforge.personalize.easyref import EasyRefConfig, train_easyref

    config = EasyRefConfig(encoder=args.encoder_kind, align_steps=args.align_steps, adapter_steps=args.adapter_steps,
                           tokens=args.tokens, instruction=args.instruction, seed=args.seed)
    record = train_easyref(args.diffusion, args.encoder, args.subjects, args.out, config, log=_log)
    print(json.dumps({"out": args.out, "subjects": record["subjects"], "last": record["history"][-1]}))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from PIL import Image

    from loraforge.adapters.functional import rows_from_state
    from loraforge.adapters.io import read_adapter
    from loraforge.core.errors import AdapterError, LoraforgeError
    from loraforge.core.files import atomic_dir
    from loraforge.personalize.decor import unwanted_basis, word_states
    from loraforge.personalize.easyref import TrainedEasyRef
    from loraforge.personalize.references import load_images
    from loraforge.personalize.sampling import FINGERPRINT, Conditioning, fingerprint, generate, parse_hm_cfg, sheet
    from loraforge.vision.datadream import load_diffusion

    if args.n < 1:
        raise LoraforgeError(f"--n must be at least 1, got {args.n}")
    hm = parse_hm_cfg(args.hm_cfg) if args.hm_cfg else None
    if args.decor != bool(args.decor_remove):
        raise LoraforgeError("--decor and --decor-remove WORDS go together")
    if bool(args.references) != bool(args.easyref):
        raise LoraforgeError("--references and --easyref FOLDER go together")
    unet, scheduler, text_encoder, tokenizer = load_diffusion(args.diffusion)
    condition = Conditioning(hm=hm, decor_strength=args.decor_strength)
    if args.adapter:
        config, _, state = read_adapter(args.adapter)
        made_for = config.provenance.get(FINGERPRINT)
        if made_for and made_for != fingerprint(unet):
            raise AdapterError(f"{args.adapter}: made for another diffusion model than {args.diffusion}")
        condition.adapter = rows_from_state(config, state, 1)
    if args.decor:
        words = [w.strip() for w in args.decor_remove.split(",") if w.strip()]
        condition.decor_basis = unwanted_basis(word_states(text_encoder, tokenizer, words))
    if args.easyref:
        easyref = TrainedEasyRef(args.easyref, unet, tokenizer, args.diffusion)
        condition.reference_tokens = easyref.tokens(load_images(args.references, unet.config.sample_size))
    images = generate(unet, scheduler.config, text_encoder, tokenizer, args.prompt, args.n, condition,
                      guidance=args.guidance, steps=args.steps, seed=args.seed)
    with atomic_dir(args.out) as tmp:
        for i, image in enumerate(images):
            Image.fromarray(image.numpy()).save(tmp / f"{i:03d}.png")
        sheet([images]).save(tmp / "contact_sheet.png")
        (tmp / "sample.json").write_text(json.dumps({k: v for k, v in vars(args).items() if k != "run"}, indent=2) + "\n")
    print(json.dumps({"out": str(Path(args.out)), "images": len(images)}))
    return 0
