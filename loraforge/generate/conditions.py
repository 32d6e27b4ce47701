"""What generators condition on: a task vector from in-context examples (ICM-LoRA), or a description's
sentence embedding (SG-LoRA, the hypernetwork).

Task vector (ICM-LoRA, arXiv 2501.17635, §3.3): the last position's final hidden state of the frozen base
model reading an in-context prompt of the task, averaged over several prompts. A prompt here is `shots`
examples of the task as a conversation (user, assistant, user, assistant, ...) in the model's chat
template; prompts differ in which examples they draw (seeded). The base model reads them, not a task's
LoRA: a new task has none.

Description embedding: all-MiniLM-L6-v2 (the embedded `minilm-l6`), mean-pooled over tokens and
L2-normalised, as sentence-transformers uses it.
"""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.core.errors import LoraforgeError
from loraforge.training.data import read_rows, render_chat

TEXT_ENCODERS = ("minilm-l6",)


@torch.no_grad()
def task_vector(model: nn.Module, tokenizer: Any, rows: list[dict], prompts: int = 8, shots: int = 4,
                seed: int = 0) -> torch.Tensor:
    """(d_model,): the mean over `prompts` in-context prompts of the last token's final hidden state."""
    if not rows:
        raise LoraforgeError("a task vector needs at least one example")
    rng = random.Random(seed)
    texts = []
    for _ in range(prompts):
        chosen = rng.sample(rows, min(shots, len(rows)))
        texts.append(render_chat([m for row in chosen for m in row["messages"]], tokenizer))
    device = next(model.parameters()).device
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    out = model(**enc, output_hidden_states=True)
    last = enc["attention_mask"].sum(1) - 1  # right padding: each prompt's last real token
    hidden = out.hidden_states[-1][torch.arange(len(texts), device=device), last]  # (P, d_model)
    return hidden.float().mean(0).cpu()


def examples_vector(model: nn.Module, tokenizer: Any, path: str, prompts: int = 8, shots: int = 4,
                    seed: int = 0) -> torch.Tensor:
    """The task vector of the examples in a chat JSONL file."""
    return task_vector(model, tokenizer, read_rows(path), prompts, shots, seed)


def load_text_encoder(name: str = "minilm-l6") -> tuple[nn.Module, Any]:
    from transformers.utils import logging

    from loraforge.core.models import load_model

    if name not in TEXT_ENCODERS:
        raise LoraforgeError(f"unknown text encoder {name!r}: choose one of {', '.join(TEXT_ENCODERS)}")
    level = logging.get_verbosity()
    logging.set_verbosity_error()  # the classification head it reports as newly initialised is never used
    try:
        model, tokenizer = load_model(name, task="classification")
    finally:
        logging.set_verbosity(level)
    return model.base_model.eval(), tokenizer  # the encoder without the (untrained) classification head


@torch.no_grad()
def embed_texts(texts: list[str], encoder: tuple[nn.Module, Any] | None = None) -> torch.Tensor:
    """(N, 384) L2-normalised mean-pooled sentence embeddings."""
    model, tokenizer = encoder or load_text_encoder()
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=128)
    hidden = model(**enc).last_hidden_state  # (N, T, 384)
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
    return F.normalize(pooled.float(), dim=-1)
