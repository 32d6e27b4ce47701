"""The testbed's CLIP: a small `CLIPModel` trained contrastively on glyph captions, saved as a standard folder.

Loss per batch of N images with captions sampled afresh each step (words dropped at random, so that
short prompts such as "a letter K" or "a red character" mean something to the text tower):

    L = CE_soft(S, T) / 2 + CE_soft(S^T, T^T) / 2          S = exp(t) * norm(img) @ norm(txt)^T   (N, N)
      + CE(head_char(img), char) + CE(head_colour(img), colour)          (auxiliary heads, build only)

T is row-normalised caption equality: two images with the same caption are both positives (CLIP's
one-hot target would push identical captions apart). The auxiliary heads on the image embedding
speed up learning shape (the issue's first try, contrastive only, stayed at chance on characters
after 13 minutes); they are dropped before saving, so the folder holds a plain CLIPModel.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from loraforge.vision.clip import pixels, zero_shot_accuracy
from loraforge.vision.glyphs import BACKGROUNDS, CHARACTERS, COLOURS, ImageSet, caption, colour_labels
from loraforge.vision.vocab import caption_tokenizer

KEEP = {"colour": 0.6, "weight": 0.5, "char": 0.7, "background": 0.5}  # P(word kept) in a training caption


@dataclass
class ClipSize:
    hidden: int = 128  # both towers' width
    vision_layers: int = 4
    text_layers: int = 2
    heads: int = 4
    projection: int = 64
    patch: int = 4  # 16x16 images -> 16 patches
    max_length: int = 16  # the longest caption is 11 tokens with <|startoftext|> and <|endoftext|>


def vocabulary_texts() -> list[str]:
    """Every word a caption or a class prompt can hold."""
    attrs = [{"char": c, "colour": col, "weight": "bold", "background": bg}
             for c in CHARACTERS for col in COLOURS for bg in BACKGROUNDS]
    return [caption(a) for a in attrs] + ["a character", "a digit letter"]


def new_clip(folder: str | Path, size: ClipSize, image_size: int) -> tuple[CLIPModel, CLIPImageProcessor, object]:
    """A randomly initialised CLIP over the caption vocabulary; tokenizer files written to `folder`."""
    tokenizer = caption_tokenizer(vocabulary_texts(), folder, size.max_length)
    text = dict(vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=2 * size.hidden,
                num_hidden_layers=size.text_layers, num_attention_heads=size.heads,
                max_position_embeddings=size.max_length, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=size.hidden, intermediate_size=2 * size.hidden, num_hidden_layers=size.vision_layers,
                  num_attention_heads=size.heads, image_size=image_size, patch_size=size.patch)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=size.projection)
    processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                                   image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return CLIPModel(config), processor, tokenizer


def sanity(model: CLIPModel, tokenizer: object, pixel_values: torch.Tensor, test: ImageSet) -> dict[str, float]:
    """Zero-shot accuracy on `test`: character by "a letter K", colour by "a red character"."""
    return {"character": zero_shot_accuracy(model, tokenizer, pixel_values, test.labels, [f"a {c}" for c in test.classes]),
            "colour": zero_shot_accuracy(model, tokenizer, pixel_values, colour_labels(test),
                                         [f"a {c} character" for c in COLOURS])}


def train_clip(model: CLIPModel, processor: CLIPImageProcessor, tokenizer: object, train: ImageSet, test: ImageSet,
               minutes: float, batch: int = 128, lr: float = 2e-3, seed: int = 0, eval_every: int = 100,
               log: Callable[[str], None] = print) -> list[dict[str, float]]:
    """Train in place for `minutes` of wall time; returns the curve of sanity figures against minutes."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train_px, test_px = pixels(processor, train.images), pixels(processor, test.images)
    colours = colour_labels(train)
    heads = nn.ModuleDict({"char": nn.Linear(model.config.projection_dim, len(CHARACTERS)),
                           "colour": nn.Linear(model.config.projection_dim, len(COLOURS))})
    params = list(model.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    token_cache: dict[str, list[int]] = {}
    curve, start, step = [], time.monotonic(), 0
    model.train()
    while True:
        elapsed = (time.monotonic() - start) / 60
        if step % eval_every == 0 or elapsed >= minutes:
            figures = sanity(model, tokenizer, test_px, test)
            curve.append({"minutes": round(elapsed, 2), "step": step, **figures})
            log(f"clip step {step} {elapsed:.1f} min: zero-shot character {figures['character']:.3f} "
                f"colour {figures['colour']:.3f}")
            model.train()
            if elapsed >= minutes:
                return curve
        index = torch.from_numpy(rng.integers(0, len(train), batch))
        captions = [caption(train.attributes[i], {k: rng.random() < p for k, p in KEEP.items()}) for i in index.tolist()]
        for text in set(captions) - token_cache.keys():
            token_cache[text] = tokenizer(text)["input_ids"]
        ids = nn.utils.rnn.pad_sequence([torch.tensor(token_cache[t]) for t in captions], batch_first=True,
                                        padding_value=tokenizer.pad_token_id)  # (N, L)
        out = model(input_ids=ids, attention_mask=(torch.arange(ids.shape[1]) < torch.tensor(
            [len(token_cache[t]) for t in captions])[:, None]).long(), pixel_values=train_px[index])
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)  # (N, N)
        target = same / same.sum(1, keepdim=True)
        contrastive = (F.cross_entropy(out.logits_per_image, target) + F.cross_entropy(out.logits_per_text, target)) / 2
        embeds = out.image_embeds  # (N, D), already normalised: the heads read the direction CLIP compares
        aux = F.cross_entropy(heads["char"](embeds * 8), train.labels[index]) + \
            F.cross_entropy(heads["colour"](embeds * 8), colours[index])
        optimizer.zero_grad(set_to_none=True)
        (contrastive + aux).backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # CLIP's cap: a scale of at most 100
        step += 1
