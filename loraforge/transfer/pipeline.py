"""Trans-LoRA's two stages (arXiv 2405.17258, algorithm of ../shared/methods/trans-lora.md):

- `prepare` (source time, real data D at hand): keep seeds S, synthesise inputs with the source base,
  train the discriminator phi on real vs synthetic, write the kit (kit.py).
- `transfer` (transfer time, only the kit): the target base synthesises candidates x~ from S (step 2),
  phi keeps those with p_real >= P (step 3), source + adapter labels them greedily, y~ (step 4), and
  the normal trainer fits a fresh adapter of any method on the target to {(x~, y~)} (step 5).

Each writes its folder whole or not at all: a bad input, an empty accepted set or a failed run leaves
no half-written KIT or OUT.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loraforge.adapters.inject import detach
from loraforge.adapters.io import load_adapter, load_pretrained
from loraforge.core.config import read_adapter_config
from loraforge.core.configs import opt
from loraforge.core.errors import LoraforgeError, ModelNotFoundError
from loraforge.core.files import atomic_dir
from loraforge.core.models import load_model
from loraforge.core.registry import get_method
from loraforge.training.checkpoint import CHECKPOINT_DIR
from loraforge.training.config import TrainConfig
from loraforge.training.data import data_path, from_records, render_chat
from loraforge.training.evaluate import generate
from loraforge.training.loop import train
from loraforge.transfer.discriminator import accept, accuracy, p_real, split, train_discriminator
from loraforge.transfer.kit import (
    DISCRIMINATOR,
    KIT_JSON,
    SEEDS,
    SOURCE_ADAPTER,
    Kit,
    chat_row,
    kit_json,
    read_kit,
    task_rows,
)
from loraforge.transfer.synth import synthesize_inputs


@dataclass
class PrepareConfig:
    """`loraforge transfer prepare`: the kit, made at source time from the real data."""

    adapter: str = field(metadata={"help": "the source adapter (PEFT format), trained on --data's task"})
    data: str = field(metadata={"help": "the real task data, single-turn JSONL (chat / alpaca / prompt-completion / gsm8k)"})
    out: str = field(metadata={"help": "the kit folder to write"})
    model: str = opt("smollm2-135m", "the source base model: embedded name, local HF folder or .gguf file")
    seeds: int = opt(5, "real rows kept as seeds S (the paper: a handful)")
    seed_choice: str = opt("random", "random (the paper) | cover: the rows that together hold the most distinct "
                                     "words, so that a few seeds span the task (every university of the advisor)")
    real: int = opt(128, "real inputs the discriminator learns from, at most; it gets as many synthetic ones")
    disc_steps: int = opt(60, "discriminator training steps")
    disc_rank: int = opt(8, "discriminator LoRA rank")
    lr: float = opt(1e-3, "discriminator learning rate")
    batch_size: int = opt(16, "discriminator rows per step")
    temperature: float = opt(1.0, "sampling temperature of the synthetic inputs")
    seed: int = opt(0, "seeds the choice of seeds, the sampling and the training")


@dataclass
class TransferConfig:
    """`loraforge transfer run`: a target adapter from nothing but the kit."""

    kit: str = field(metadata={"help": "the kit folder `transfer prepare` wrote"})
    out: str = field(metadata={"help": "folder to write: adapter/ (PEFT format), synthetic.jsonl, candidates.jsonl, report.json"})
    target_model: str = opt("gemma3-270m", "the new base model: embedded name, local HF folder or .gguf file")
    samples: int = opt(128, "candidate inputs the target base synthesises")
    threshold: float = opt(0.5, "P in (0, 1): keep candidates whose p_real >= P")
    filter: bool = opt(True, "--no-filter: keep every distinct new candidate, whatever the discriminator says")
    target_method: str = opt("lora", "the target adapter's method (`loraforge methods`)")
    steps: int = opt(200, "target training steps")
    rank: int = opt(8, "target adapter rank")
    alpha: float = opt(16.0, "target adapter alpha")
    targets: str = opt("all-linear", "the target adapter's modules: all-linear, comma-separated names, or a regex")
    lr: float = opt(1e-3, "target learning rate")
    batch_size: int = opt(8, "target rows per step")
    temperature: float = opt(1.0, "sampling temperature of the candidates")
    seed: int = opt(0, "seeds the sampling and the training")


def _at_least(values: dict[str, int], low: int = 1) -> None:
    for name, value in values.items():
        if value < low:
            raise LoraforgeError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")


def prepare(config: PrepareConfig, progress: bool = True) -> Kit:
    """Write the kit of `config.adapter`'s task to `config.out` (see the module docstring)."""
    _at_least({"seeds": config.seeds, "disc_steps": config.disc_steps, "disc_rank": config.disc_rank,
               "batch_size": config.batch_size})
    _at_least({"real": config.real}, 2)  # one to train the discriminator on, one held out
    if config.seed_choice not in ("random", "cover"):
        raise LoraforgeError(f"--seed-choice is random or cover, got {config.seed_choice!r}")
    adapter_config, _ = read_adapter_config(config.adapter)
    if adapter_config.task_type == "SEQ_CLS":
        raise LoraforgeError(f"--adapter {config.adapter} is a classification adapter; Trans-LoRA transfers "
                             "generation tasks ([system,] user, assistant)")
    system, pairs = task_rows(data_path(config.data))
    if len(pairs) < config.seeds + 2:
        raise LoraforgeError(f"--data has {len(pairs)} rows: --seeds {config.seeds} and at least 2 more are needed")
    rng = random.Random(config.seed)
    rng.shuffle(pairs)
    seeds = pairs[:config.seeds] if config.seed_choice == "random" else covering(pairs, config.seeds)
    real = list(dict.fromkeys(user for user, _ in pairs))[:config.real]

    source, tokenizer = load_model(config.model, task="causal-lm")
    load_adapter(source, config.adapter)  # refuse an adapter of another base now, not at transfer time
    detach(source)  # the synthesiser is the base model
    answer_tokens = max(len(tokenizer.encode(answer, add_special_tokens=False)) for _, answer in pairs)
    input_lines = max(user.count("\n") + 1 for user, _ in pairs)
    candidates = synthesize_inputs(source, tokenizer, [user for user, _ in seeds], len(real), input_lines,
                                   config.temperature, config.seed, progress=progress)
    del source
    real_inputs = set(real)
    synthetic = [c for c in dict.fromkeys(candidates) if c and c not in real_inputs]  # a copy of a real input is real
    train_rows, held_out = split(real, synthetic, config.seed)

    model, clf_tokenizer = load_model(config.model, task="classification", num_labels=2)
    with atomic_dir(config.out) as tmp:
        model = train_discriminator(model, clf_tokenizer, train_rows, tmp / DISCRIMINATOR, config.disc_steps,
                                    config.disc_rank, config.lr, config.batch_size, config.seed, progress)
        kit = Kit(source_model=config.model, source_adapter=str(Path(config.adapter).resolve()), system=system,
                  input_lines=input_lines, answer_tokens=answer_tokens + answer_tokens // 4 + 8,
                  n_real=len(real), n_synthetic=len(synthetic),
                  discriminator_accuracy=accuracy(model, clf_tokenizer, held_out), seed=config.seed)
        shutil.copytree(config.adapter, tmp / SOURCE_ADAPTER)
        (tmp / SEEDS).write_text("".join(json.dumps(chat_row(system, user, answer)) + "\n" for user, answer in seeds))
        (tmp / KIT_JSON).write_text(kit_json(kit))
    return kit


def covering(pairs: list[tuple[str, str]], n: int) -> list[tuple[str, str]]:
    """n (input, answer) rows chosen greedily, each adding the most words (lower-cased) that the rows
    before it do not hold; ties go to the earlier row. An interpretation: the paper samples its seeds,
    but a handful sampled from a task of many entities names a few of them, and a synthesiser cannot
    ask about an entity it never saw."""
    words = [set(re.findall(r"\w+", f"{user} {answer}".lower())) for user, answer in pairs]
    chosen: list[int] = []
    covered: set[str] = set()
    for _ in range(n):
        best = max((i for i in range(len(pairs)) if i not in chosen), key=lambda i: len(words[i] - covered))
        chosen.append(best)
        covered |= words[best]
    return [pairs[i] for i in chosen]


def _load_target(name: str) -> tuple[Any, Any]:
    """The target base, refused up front when it cannot generate text for the trainer to learn from."""
    try:
        model, tokenizer = load_model(name, task="causal-lm")
    except ModelNotFoundError:
        raise
    except LoraforgeError as e:  # an encoder, say: no language-model head
        raise LoraforgeError(f"--target-model {name} cannot generate text: {e}") from None
    try:
        render_chat([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], tokenizer)
    except ValueError as e:
        raise LoraforgeError(f"--target-model {name} cannot generate text: {e}") from None
    return model, tokenizer


def label(kit: Kit, kit_dir: str | Path, inputs: list[str]) -> list[str]:
    """Trans-LoRA step 4: the teacher's answers, greedy, from the source model + the kit's adapter."""
    teacher, tokenizer = load_pretrained(kit.source_model, Path(kit_dir) / SOURCE_ADAPTER, task="causal-lm")
    conversations = [chat_row(kit.system, user)["messages"] for user in inputs]
    return generate(teacher, tokenizer, conversations, max_new_tokens=kit.answer_tokens, temperature=0.0)


@dataclass
class Pool:
    """Steps 2-3 before the threshold: how many candidates the target generated, the distinct new ones
    (no empty text, no copy of a seed) and the discriminator's p_real of each. A filtered and an
    unfiltered run of one config share it (the bench measures the filter on the same candidates), and
    with it the teacher's labels (step 4): each candidate is labelled once, by the first run that keeps it."""

    generated: int
    texts: list[str]
    p_real: list[float]
    seconds: dict[str, float]
    labels: dict[str, str] = field(default_factory=dict)  # candidate -> the teacher's greedy answer


def candidate_pool(config: TransferConfig, target: Any, tokenizer: Any, progress: bool = True) -> Pool:
    """The target base synthesises `config.samples` candidates from the kit's seeds; the kit's
    discriminator scores the distinct new ones."""
    kit, seeds = read_kit(config.kit)
    t0 = time.perf_counter()
    candidates = synthesize_inputs(target, tokenizer, [user for user, _ in seeds], config.samples, kit.input_lines,
                                   config.temperature, config.seed, progress=progress)
    seconds = {"synthesise": time.perf_counter() - t0}
    t0 = time.perf_counter()
    seed_inputs = {user for user, _ in seeds}
    distinct = [c for c in dict.fromkeys(candidates) if c and c not in seed_inputs]  # copies teach nothing new
    discriminator, clf_tokenizer = load_pretrained(kit.source_model, Path(config.kit) / DISCRIMINATOR)
    scores = p_real(discriminator, clf_tokenizer, distinct)
    seconds["score"] = time.perf_counter() - t0
    return Pool(len(candidates), distinct, scores, seconds)


def transfer(config: TransferConfig, progress: bool = True, pool: Pool | None = None) -> dict[str, Any]:
    """Distil the kit's adapter into a fresh one on `config.target_model`; write OUT; return the report.
    `pool`: candidates already synthesised and scored for this config (`candidate_pool`), reused."""
    start = time.perf_counter()
    if not 0 < config.threshold < 1:  # NaN fails too
        raise LoraforgeError(f"--threshold is a probability in (0, 1), got {config.threshold}")
    _at_least({"samples": config.samples, "steps": config.steps, "rank": config.rank,
               "batch_size": config.batch_size})
    get_method(config.target_method)  # an unknown method is refused before anything loads
    kit, _ = read_kit(config.kit)

    target, tokenizer = _load_target(config.target_model)
    reused = pool is not None
    pool = pool or candidate_pool(config, target, tokenizer, progress)
    seconds = {} if reused else dict(pool.seconds)  # a reused pool's time was spent, and counted, once
    kept = accept(pool.p_real, config.threshold) if config.filter else [True] * len(pool.texts)
    accepted = [(text, score) for text, score, keep in zip(pool.texts, pool.p_real, kept) if keep]
    if not accepted:
        best = f"{max(pool.p_real):.3f}" if pool.p_real else "none: every candidate was empty or a seed"
        raise LoraforgeError(f"no candidate passed the filter ({pool.generated} generated, best p_real {best}, "
                             f"--threshold {config.threshold}): lower --threshold, raise --samples, or --no-filter")

    t0 = time.perf_counter()
    unlabelled = [text for text, _ in accepted if text not in pool.labels]
    if unlabelled:
        pool.labels.update(zip(unlabelled, label(kit, config.kit, unlabelled)))
    rows = [{**chat_row(kit.system, text, pool.labels[text]), "p_real": round(score, 4)}
            for text, score in accepted if pool.labels[text]]
    seconds["label"] = time.perf_counter() - t0
    if not rows:
        raise LoraforgeError(f"the teacher gave an empty answer to all {len(accepted)} accepted inputs: nothing to "
                             "train the target on")

    t0 = time.perf_counter()
    train_config = TrainConfig(model=config.target_model, method=config.target_method, rank=config.rank,
                               alpha=config.alpha, targets=config.targets, steps=config.steps, lr=config.lr,
                               batch_size=config.batch_size, seed=config.seed)
    with atomic_dir(config.out) as tmp:
        train_config.out = str(tmp)
        data = from_records([{"messages": row["messages"]} for row in rows], tokenizer)
        result = train(train_config, model=target, tokenizer=tokenizer, train_data=data, progress=progress)
        shutil.rmtree(tmp / CHECKPOINT_DIR)  # optimizer state of a run OUT can only replace whole, not resume
        seconds["train"] = time.perf_counter() - t0
        losses = [row["loss"] for row in result.history if "loss" in row]
        report = {"generated": pool.generated, "distinct": len(pool.texts), "accepted": len(accepted),
                  "acceptance_rate": len(accepted) / pool.generated, "labelled": len(rows),
                  "discriminator_accuracy": kit.discriminator_accuracy, "final_loss": losses[-1],
                  "seconds": time.perf_counter() - start, "stage_seconds": seconds, "pool_reused": reused,
                  "source_model": kit.source_model, "settings": asdict(config)}
        (tmp / "synthetic.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        # every candidate with its score, kept or not: what the filter did, to read
        (tmp / "candidates.jsonl").write_text("".join(json.dumps({"input": text, "p_real": round(score, 4), "kept": keep})
                                                      + "\n" for text, score, keep in zip(pool.texts, pool.p_real, kept)))
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
