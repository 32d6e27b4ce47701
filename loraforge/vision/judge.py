"""Judges of generated glyphs: which character and colour an image shows.

Two, so that the diffusion model's sanity figure does not rest on one model's errors: the testbed's
CLIP by its zero-shot prompts, and an independent small CNN trained with labels on the training
glyphs (its own test accuracy is reported beside it, so a reader knows what its verdicts are worth).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel

from loraforge.vision.clip import class_logits, pixels, text_features
from loraforge.vision.glyphs import CHARACTERS, COLOURS, ImageSet, class_name, colour_labels, signed_pixels

Judge = Callable[[torch.Tensor], list[dict[str, str]]]  # (B, H, W, 3) uint8 -> [{"char", "colour"}] per image


def _verdicts(chars: list[int], colours: list[int]) -> list[dict[str, str]]:
    return [{"char": CHARACTERS[c], "colour": list(COLOURS)[k]} for c, k in zip(chars, colours)]


def clip_judge(clip: CLIPModel, processor: object, tokenizer: object) -> Judge:
    """Character by "a letter K", colour by "a red character": the CLIP's zero-shot prompts."""
    with torch.no_grad():
        chars = text_features(clip, tokenizer, [f"a {class_name(c)}" for c in CHARACTERS])
        colours = text_features(clip, tokenizer, [f"a {c} character" for c in COLOURS])

    @torch.no_grad()
    def judge(images: torch.Tensor) -> list[dict[str, str]]:
        px = pixels(processor, images)
        return _verdicts(class_logits(clip, px, chars).argmax(-1).tolist(), class_logits(clip, px, colours).argmax(-1).tolist())
    return judge


def cnn_judge(train: ImageSet, test: ImageSet, steps: int = 1500, batch: int = 128, seed: int = 0) -> tuple[Judge, dict[str, float]]:
    """A three-layer CNN with a character and a colour head, trained on `train` (about 15 s on two
    cores for 1,500 steps); returns the judge and its accuracy on `test`."""
    size = train.images.shape[1]
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * (size // 4) ** 2, 128), nn.ReLU(), nn.Linear(128, len(CHARACTERS) + len(COLOURS)))
    x, chars, colours = signed_pixels(train.images), train.labels, colour_labels(train)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, len(x), (batch,), generator=generator)
        out = net(x[index])
        loss = F.cross_entropy(out[:, :len(CHARACTERS)], chars[index]) + F.cross_entropy(out[:, len(CHARACTERS):], colours[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    net.eval()

    @torch.no_grad()
    def judge(images: torch.Tensor) -> list[dict[str, str]]:
        out = net(signed_pixels(images))
        return _verdicts(out[:, :len(CHARACTERS)].argmax(1).tolist(), out[:, len(CHARACTERS):].argmax(1).tolist())

    verdicts = judge(test.images)
    accuracy = {"character": sum(v["char"] == a["char"] for v, a in zip(verdicts, test.attributes)) / max(1, len(test)),
                "colour": sum(v["colour"] == a["colour"] for v, a in zip(verdicts, test.attributes)) / max(1, len(test))}
    return judge, accuracy
