"""CLIP as a classifier: image and prompt features, zero-shot logits, any CLIPModel folder.

Zero-shot classification (Radford et al., arXiv 2103.00020, Fig. 1): the classes' prompts are
encoded once by the text tower, and an image's class is the prompt whose normalised embedding has
the largest cosine with the image's,

    logits = exp(t) * normalize(f_img(x)) @ normalize(f_txt(prompts))^T       (N, C)

where exp(t) is CLIP's learnt logit scale. Every path goes through the folder's own processor, so a
real CLIP folder (224 px) and the testbed's (16 px) run the same code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

from loraforge.core.errors import ModelNotFoundError


def check_clip(folder: str | Path) -> None:
    """Refuse a folder that is not a CLIP's (no config.json, or another model's), without loading it."""
    if not (Path(folder) / "config.json").is_file():
        raise ModelNotFoundError(f"{folder}: not a CLIP folder (no config.json); build one with "
                                 "`loraforge testbed build glyphs`")
    try:
        kind = json.loads((Path(folder) / "config.json").read_text()).get("model_type")
    except (ValueError, UnicodeDecodeError, AttributeError) as exc:
        raise ModelNotFoundError(f"{folder}/config.json is not a JSON object ({exc})") from None
    if kind != "clip":
        raise ModelNotFoundError(f"{folder}: a {kind!r} model, not a CLIP (model_type 'clip')")


def load_clip(folder: str | Path) -> tuple[CLIPModel, object, object]:
    """The CLIPModel of a local folder, its image processor and tokenizer (never downloads)."""
    check_clip(folder)
    try:
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True)
        processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:  # a missing processor or tokenizer, truncated weights
        raise ModelNotFoundError(f"{folder}: not a complete CLIP folder ({str(exc).splitlines()[0]})") from None
    return model.eval(), processor, tokenizer


def pixels(processor: object, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """(N, H, W, 3) uint8 images -> the processor's (N, 3, S, S) pixel values."""
    out = [processor(images=list(np.asarray(images[i:i + batch])), return_tensors="pt")["pixel_values"]
           for i in range(0, len(images), batch)]
    return torch.cat(out) if out else torch.zeros(0)


def tokens(tokenizer: object, texts: list[str]) -> dict[str, torch.Tensor]:
    return dict(tokenizer(texts, padding=True, truncation=True, return_tensors="pt"))


def image_features(model: CLIPModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """Normalised image embeddings (N, D)."""
    return F.normalize(model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output, dim=-1)


def text_features(model: CLIPModel, tokenizer: object, texts: list[str]) -> torch.Tensor:
    """Normalised prompt embeddings (C, D)."""
    batch = {k: v.to(model.device) for k, v in tokens(tokenizer, texts).items()}
    return F.normalize(model.get_text_features(**batch, return_dict=True).pooler_output, dim=-1)


def class_logits(model: CLIPModel, pixel_values: torch.Tensor, prompt_features: torch.Tensor) -> torch.Tensor:
    return model.logit_scale.exp() * image_features(model, pixel_values) @ prompt_features.T  # (N, C)


@torch.no_grad()
def zero_shot_accuracy(model: CLIPModel, tokenizer: object, pixel_values: torch.Tensor, labels: torch.Tensor,
                       prompts: list[str], batch: int = 512) -> float:
    """Accuracy of the prompt classifier: `prompts[c]` describes class c."""
    was_training = model.training
    model.eval()
    prompt_features = text_features(model, tokenizer, prompts)
    hits = 0
    for i in range(0, len(labels), batch):
        x = pixel_values[i:i + batch].to(model.device)
        hits += int((class_logits(model, x, prompt_features).argmax(-1).cpu() == labels[i:i + batch]).sum())
    model.train(was_training)
    return hits / max(1, len(labels))
