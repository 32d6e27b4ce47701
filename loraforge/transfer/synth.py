"""Synthetic task inputs from a handful of seeds (Trans-LoRA, arXiv 2405.17258, section 3: the data
synthesiser), by plain few-shot completion: every model that generates text can do it, base models
without a chat template included, and nothing depends on the model's tokenizer but its own prompt.

Each prompt lists the seeds' inputs in a shuffled order, then opens one more item:

    Inputs of one task, one per item.

    Input: <seed input>
    Input: <seed input>
    Input:

The model goes on writing items. The first is a candidate, and so is each later one that is
complete (another "Input:" starts after it), up to `per_prompt` of them: the prompt's prefill is paid
once for several candidates (Gemma-3-270M on the offset task, 16 prompts: 2.5 candidates a prompt in
13.0 s with 4 allowed, against 1 in 6.0 s: 1.15 times the candidates per second; the base model
often leaves the list after two or three). Each is cut at the real inputs' line count.
Prompts come in rounds until `n` candidates are in hand, as the paper synthesises until its set
reaches the size it wants.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from loraforge.core.rng import seeded

HEADER = "Inputs of one task, one per item.\n\n"
ITEM = "Input:"


def few_shot_prompt(inputs: list[str]) -> str:
    return HEADER + "".join(f"{ITEM} {text}\n" for text in inputs) + ITEM


def cut_candidates(continuation: str, max_lines: int, limit: int = 1) -> list[str]:
    """The new inputs in a continuation: its first item, then each later one that another item follows
    (the last may have been cut by the token budget), at most `limit`; each at most `max_lines`
    lines, stripped."""
    items = continuation.split("\n" + ITEM)
    return ["\n".join(text.strip().split("\n")[:max_lines]).strip() for text in items[:max(1, len(items) - 1)][:limit]]


def token_budget(tokenizer: Any, texts: list[str], items: int = 1) -> int:
    """New tokens to allow `items` candidates: for the first, twice the longest seed in this tokenizer's
    tokens plus 8 (a candidate may be longer than every seed, but not ramble on); for each later one,
    the longest seed plus 4 for its "Input:" line."""
    longest = max(len(tokenizer.encode(t, add_special_tokens=False)) for t in texts)
    return 2 * longest + 8 + (items - 1) * (longest + 4)


@torch.no_grad()
def complete(model: nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int, temperature: float,
             seed: int, batch_size: int = 16, progress: bool = True) -> list[str]:
    """Raw continuations of `prompts` (no chat template), sampled at `temperature` (0: greedy) from a
    generator seeded by `seed`, in batches, left-padded."""
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # generation appends on the right
    device = next(model.parameters()).device
    sampling = {"do_sample": True, "temperature": temperature, "top_p": 0.95} if temperature > 0 else {"do_sample": False}
    outputs: list[str] = []
    try:
        with seeded(seed):  # the draws come from `seed`; the caller's random streams are left where they were
            for start in tqdm(range(0, len(prompts), batch_size), disable=not progress, desc="synthesise", unit="batch"):
                # add_special_tokens: the model's own bos where it wants one (Gemma needs it, SmolLM2 has none).
                enc = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True).to(device)
                out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id, **sampling)
                outputs += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def synthesize_inputs(model: nn.Module, tokenizer: Any, seeds: list[str], n: int, max_lines: int,
                      temperature: float = 1.0, seed: int = 0, shots: int = 8, per_prompt: int = 4,
                      progress: bool = True) -> list[str]:
    """`n` candidate inputs (some may be empty or repeat: the filter and the caller see all of them),
    up to `per_prompt` from each prompt."""
    rng = random.Random(seed)
    budget = token_budget(tokenizer, seeds, per_prompt)
    candidates: list[str] = []
    prompted = rounds = 0
    while len(candidates) < n:  # every prompt gives at least one: each round shrinks what is missing
        # as many prompts as the yield so far says are missing, and a tenth more: a round of a few
        # prompts costs most of what a full batch does
        per = len(candidates) / prompted if prompted else per_prompt
        count = math.ceil(1.1 * (n - len(candidates)) / per)
        prompts = [few_shot_prompt(rng.sample(seeds, min(shots, len(seeds)))) for _ in range(count)]
        for continuation in complete(model, tokenizer, prompts, budget, temperature, seed + rounds, progress=progress):
            candidates += cut_candidates(continuation, max_lines, per_prompt)
        prompted, rounds = prompted + count, rounds + 1
    return candidates[:n]
