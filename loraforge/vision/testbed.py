"""`loraforge testbed build glyphs`: the vision testbed, built once and cached.

    OUT/
      data/         glyphs: train.safetensors, test.safetensors, heldout_font.safetensors, glyphs.json
      clip/         a CLIPModel folder: config.json, model.safetensors, preprocessor_config.json,
                    vocab.json + merges.txt (the caption words, CLIP's BPE format), tokenizer files
      diffusion/    unet/ and scheduler/ (diffusers), text_encoder/ and tokenizer/ (the CLIP's text tower)
      testbed.json  sizes, minutes, the training curves and the sanity figures

Sanity figures: the CLIP's zero-shot accuracy on the seen-attribute test glyphs (character, colour)
and on the handwritten digits; the diffusion samples' agreement (character and colour both right),
by the CLIP and by an independent CNN judge trained on the training glyphs (judge.cnn_judge, its
own test accuracy beside it), for guidance 1 to 4. The folder is written whole or not at all
(core.files.atomic_dir).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import CLIPTextModel

from loraforge.core.errors import LoraforgeError
from loraforge.core.files import atomic_dir
from loraforge.vision.clip import pixels, zero_shot_accuracy
from loraforge.vision.clip_testbed import ClipSize, new_clip, sanity, train_clip
from loraforge.vision.glyphs import CHARACTERS, build_glyphs, digits
from loraforge.vision.judge import clip_judge, cnn_judge
from loraforge.vision.unet_testbed import (
    UNetSize,
    agreement,
    new_unet,
    sample,
    sanity_prompts,
    save_diffusion,
    train_unet,
)

GUIDANCES = (1.0, 2.0, 3.0, 4.0)


@dataclass
class TestbedPreset:
    n_train: int
    n_test: int
    n_heldout: int  # glyphs in the held-out font: bench vision's glyphs:font draws 16 shots a class from half
    clip: ClipSize
    clip_minutes: float
    unet: UNetSize
    unet_minutes: float
    image_size: int = 16
    seed: int = 0
    sanity_samples: int = 100  # prompts per guidance value in the final figures
    eval_every: int = 50  # CLIP steps between running sanity figures (the UNet's: 4x as many)
    sample_steps: int = 25  # DDIM steps per sample

    def __post_init__(self) -> None:
        for flag, minutes in (("--clip-minutes", self.clip_minutes), ("--unet-minutes", self.unet_minutes)):
            if not 0 < minutes < math.inf:
                raise LoraforgeError(f"{flag} must be a positive number of minutes, got {minutes}")


PRESETS = {
    # --quick: tests of the whole chain and bench --quick; under 10 minutes on two idle cores.
    "quick": TestbedPreset(n_train=4000, n_test=400, n_heldout=64 * len(CHARACTERS), clip=ClipSize(hidden=64, vision_layers=3),
                           clip_minutes=3.0, unet=UNetSize(channels=(32, 64), attention_from=1), unet_minutes=5.5,
                           sanity_samples=60),
    # 2.2M-parameter UNet: 0.44 s a step of 64 here against 0.26 s for the quick one's 1.0M.
    "full": TestbedPreset(n_train=20000, n_test=2000, n_heldout=100 * len(CHARACTERS), clip=ClipSize(), clip_minutes=12.0,
                          unet=UNetSize(channels=(48, 96), attention_from=1), unet_minutes=35.0, eval_every=200),
}


def build_testbed(out: str | Path, preset: TestbedPreset, log: Callable[[str], None] = print) -> dict:
    """Build the whole testbed into `out`; returns what testbed.json holds."""
    start = time.monotonic()
    with atomic_dir(out) as tmp:
        log(f"rendering {preset.n_train} + {preset.n_test} + {preset.n_heldout} glyphs")
        splits = build_glyphs(tmp / "data", preset.n_train, preset.n_test, preset.n_heldout, preset.seed, preset.image_size)
        clip, processor, tokenizer = new_clip(tmp / "clip", preset.clip, preset.image_size)
        log(f"training CLIP ({_params(clip)} parameters) for {preset.clip_minutes} min")
        clip_curve = train_clip(clip, processor, tokenizer, splits["train"], splits["test"], preset.clip_minutes,
                                seed=preset.seed, eval_every=preset.eval_every, log=log)
        clip.eval()
        for part in (clip, processor, tokenizer):
            part.save_pretrained(tmp / "clip")
        test_px = pixels(processor, splits["test"].images)
        shifted = digits(preset.image_size, preset.seed)
        clip_figures = {**sanity(clip, tokenizer, test_px, splits["test"]),
                        "digits": zero_shot_accuracy(clip, tokenizer, pixels(processor, shifted.images), shifted.labels,
                                                     [f"a {c}" for c in shifted.classes]),
                        "heldout_font": sanity(clip, tokenizer, pixels(processor, splits["heldout_font"].images),
                                               splits["heldout_font"])["character"]}
        text_encoder = CLIPTextModel(clip.config.text_config)
        text_encoder.load_state_dict(clip.text_model.state_dict())
        text_encoder.eval()
        unet, scheduler = new_unet(preset.unet, preset.image_size, clip.config.text_config.hidden_size)
        judge = clip_judge(clip, processor, tokenizer)
        independent, judge_accuracy = cnn_judge(splits["train"], splits["test"], seed=preset.seed)
        log(f"CNN judge on the test glyphs: character {judge_accuracy['character']:.3f}, colour {judge_accuracy['colour']:.3f}")
        log(f"training the UNet ({_params(unet)} parameters) for {preset.unet_minutes} min")
        unet_curve = train_unet(unet, scheduler, text_encoder, tokenizer, splits["train"], preset.unet_minutes,
                                seed=preset.seed, eval_every=preset.eval_every * 4, judge=independent,
                                sample_steps=preset.sample_steps, log=log)
        unet.eval()
        save_diffusion(tmp / "diffusion", unet, scheduler, text_encoder, tokenizer)
        prompts, asked = sanity_prompts(preset.sanity_samples, preset.seed + 1)
        by_guidance = {}
        for g in GUIDANCES:
            images = sample(unet, scheduler.config, text_encoder, tokenizer, prompts, guidance=g, steps=preset.sample_steps,
                            seed=preset.seed + 1)
            by_guidance[str(g)] = {"clip": agreement(images, asked, judge), "cnn": agreement(images, asked, independent)}
            log(f"guidance {g}: samples right by CLIP {by_guidance[str(g)]['clip']:.2f}, "
                f"by the CNN judge {by_guidance[str(g)]['cnn']:.2f}")
        report = {"preset": dataclasses.asdict(preset), "clip_parameters": _params(clip), "unet_parameters": _params(unet),
                  "clip_zero_shot": clip_figures, "cnn_judge_accuracy": judge_accuracy,
                  "diffusion_clip_agreement": by_guidance,
                  "clip_curve": clip_curve, "unet_curve": unet_curve,
                  "minutes": round((time.monotonic() - start) / 60, 2)}
        (tmp / "testbed.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

