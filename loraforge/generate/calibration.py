"""Label-word classification with a causal LM, its accuracy and expected calibration error.

A task of the `labels` family answers with one of a few words. The model's probability of each word is
read at the first answer position, over the words' first tokens only (the words of a task differ in
their first token), and renormalised over them; the prediction is the most probable word and its
confidence that probability. With S > 1 the probabilities are averaged over S forwards (S weight samples
of a Bayesian adapter: ABMLL's predictive distribution).

ECE (Guo et al., arXiv 1706.04599): predictions binned by confidence into 10 equal-width bins,
ECE = sum_b (n_b / N) |accuracy_b - confidence_b|.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loraforge.core.errors import LoraforgeError
from loraforge.training.data import IGNORE_INDEX, tokenize_messages


def answer_words(rows: list[dict]) -> list[str]:
    """The distinct answers of a task's rows, sorted: its label words."""
    words = sorted({row["messages"][-1]["content"] for row in rows})
    if not 2 <= len(words) <= 20:
        raise LoraforgeError(f"a label-word task answers with 2 to 20 distinct words; these rows have {len(words)}")
    return words


def prompt_and_first_tokens(row: dict, words: list[str], tokenizer: Any) -> tuple[list[int], list[int]]:
    prompt, firsts = None, []
    for word in words:
        messages = row["messages"][:-1] + [{"role": "assistant", "content": word}]
        ids, labels = tokenize_messages(messages, tokenizer, max_length=10 ** 6)
        # The last assistant turn's first token (earlier turns may be few-shot examples, labelled too).
        start = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX and labels[i - 1] == IGNORE_INDEX)
        prompt = prompt or ids[:start]
        firsts.append(ids[start])
    if len(set(firsts)) != len(firsts):
        raise LoraforgeError(f"label words {words} share a first token: they cannot be told apart at one position")
    return prompt, firsts


@torch.no_grad()
def label_probs(model: nn.Module, tokenizer: Any, rows: list[dict], words: list[str], samples: int = 1,
                batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs (N, W) over `words`, labels (N,) the index of each row's answer)."""
    prompts, firsts = zip(*(prompt_and_first_tokens(r, words, tokenizer) for r in rows))
    labels = torch.tensor([words.index(r["messages"][-1]["content"]) for r in rows])
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id or 0
    probs = torch.zeros(len(rows), len(words))
    for start in range(0, len(rows), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):  # left padding: every prompt's last token at the last position
            ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
        tokens = torch.tensor(firsts[start:start + batch_size], device=device)  # (b, W)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # as unpadded: a left-padded row's first token at 0
        inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device)}
        for _ in range(samples):
            logits = model(**inputs).logits[:, -1].float()  # (b, V)
            probs[start:start + len(chunk)] += torch.softmax(logits.gather(1, tokens), dim=-1).cpu() / samples
    return probs, labels


def accuracy_and_ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = 10) -> dict[str, float]:
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).float()
    which = torch.clamp((confidence * bins).long(), max=bins - 1)  # confidence 1.0 goes in the last bin
    ece = torch.tensor(0.0)
    for b in range(bins):
        members = which == b
        if members.any():
            ece += members.float().mean() * (correct[members].mean() - confidence[members].mean()).abs()
    return {"accuracy": correct.mean().item(), "ece": ece.item()}
