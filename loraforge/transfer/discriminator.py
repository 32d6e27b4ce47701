"""The discriminator of Trans-LoRA (arXiv 2405.17258, section 3): a LoRA on the source model, with a
two-way classification head, that tells real task inputs (class 1) from synthetic ones (class 0).
It is trained once, at source time, by the normal trainer; at transfer time it filters candidates:

    accept(x~)  <=>  p_real(x~) = softmax(head(M_s + phi)(x~))[1] >= P

For a fixed pool of candidates the accepted set can only shrink as P grows (spec check 2): every
score is computed once, and the filter is a threshold on it.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loraforge.core.errors import LoraforgeError
from loraforge.training.config import TrainConfig
from loraforge.training.data import from_records
from loraforge.training.loop import train
from loraforge.transfer.kit import REAL, SYNTHETIC

HELD_OUT = 0.2  # share of each class kept out of training, for the accuracy kit.json reports


def split(real: list[str], synthetic: list[str], seed: int) -> tuple[list[dict], list[dict]]:
    """(train records, held-out records) of {"text", "label"}, each class split HELD_OUT / rest."""
    rng = random.Random(seed)
    train_rows, held_rows = [], []
    for texts, label in ((real, REAL), (synthetic, SYNTHETIC)):
        rows = [{"text": t, "label": label} for t in texts]
        rng.shuffle(rows)
        n_held = max(1, round(HELD_OUT * len(rows)))
        if len(rows) - n_held < 1:
            raise LoraforgeError(f"the discriminator needs at least 2 {'real' if label == REAL else 'synthetic'} "
                                 f"inputs (one to train on, one held out), got {len(rows)}")
        held_rows += rows[:n_held]
        train_rows += rows[n_held:]
    rng.shuffle(train_rows)
    return train_rows, held_rows


def train_discriminator(model: nn.Module, tokenizer: Any, rows: list[dict], out: str | Path, steps: int, rank: int,
                        lr: float, batch_size: int, seed: int, progress: bool = True) -> nn.Module:
    """Train a LoRA + head on `model` (the source, loaded for classification with 2 labels) on `rows`,
    and write the adapter to `out`."""
    with tempfile.TemporaryDirectory(prefix="discriminator-") as run_dir:
        config = TrainConfig(model=model.config.loraforge_base, task="classification", num_labels=2, out=run_dir,
                             method="lora", rank=rank, alpha=2.0 * rank, steps=steps, lr=lr, batch_size=batch_size,
                             seed=seed)
        result = train(config, model=model, tokenizer=tokenizer, train_data=from_records(rows, tokenizer,
                       task="classification", num_labels=2), progress=progress)
        shutil.move(str(Path(run_dir, "adapter")), str(out))  # /tmp may be another file system
    return result.model


@torch.no_grad()
def p_real(model: nn.Module, tokenizer: Any, texts: list[str], batch_size: int = 32) -> list[float]:
    """The discriminator's probability that each text is a real task input."""
    model.eval()
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=512).to(device)
        logits = model(**enc).logits.float()  # (B, 2)
        scores += logits.softmax(-1)[:, REAL].tolist()
    return scores


def accept(scores: list[float], threshold: float) -> list[bool]:
    """Keep a candidate when its p_real reaches the threshold: monotone in the threshold by construction."""
    return [score >= threshold for score in scores]


def accuracy(model: nn.Module, tokenizer: Any, rows: list[dict]) -> float:
    """Share of `rows` ({"text", "label"}) the discriminator classifies right at threshold 0.5."""
    scores = p_real(model, tokenizer, [row["text"] for row in rows])
    return sum((s >= 0.5) == (row["label"] == REAL) for s, row in zip(scores, rows)) / len(rows)
