"""Tiny random CLIP and UNet models for the vision tests (never the real testbed)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPModel

from loraforge.vision.clip_testbed import ClipSize, new_clip
from loraforge.vision.testbed import TestbedPreset
from loraforge.vision.unet_testbed import UNetSize, new_unet

TINY_CLIP = ClipSize(hidden=32, vision_layers=1, text_layers=1, heads=2, projection=16)
TINY_PRESET = TestbedPreset(n_train=120, n_test=40, n_heldout=40, clip=TINY_CLIP, clip_minutes=0.005, unet=UNetSize(channels=(8, 16)),
                            unet_minutes=0.005, sanity_samples=4, eval_every=2, sample_steps=2)


def tiny_clip_folder(folder: Path) -> Path:
    """A random tiny CLIP saved as a standard folder (weights, processor, caption tokenizer)."""
    model, processor, tokenizer = new_clip(folder, TINY_CLIP, 16)
    for part in (model, processor, tokenizer):
        part.save_pretrained(folder)
    return folder


def tiny_clip(folder: Path) -> CLIPModel:
    torch.manual_seed(0)  # the same weights on every call
    return new_clip(folder, TINY_CLIP, 16)[0].eval()


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return new_unet(UNetSize(channels=(8, 16)), 16, TINY_CLIP.hidden)[0].eval()
