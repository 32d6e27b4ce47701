"""`loraforge demo`: turn SmolLM2-135M-Instruct into a study-abroad advisor, offline, on a CPU.

An embedded re-enactment of the seed's first study (LoRA fine-tuning of an instruction model into
a study-abroad advisor, in two phases, answers in Markdown), on an invented knowledge base that
the base model cannot know (`loraforge.demo.advising`):

    1. ask the held-out questions (phrasings no training row uses) to the base model
    2. phase 1: LoRA on the broad single-question set
    3. phase 2: the same adapter, on the multi-turn advising dialogues
    4. ask the held-out questions again; write report.md, results.json, loss.png

Every record carries one short system prompt, so the model knows its role and the sequences stay
short (SmolLM2's template would otherwise insert its own, longer one).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from loraforge.core.files import atomic_write_text
from loraforge.core.models import load_model
from loraforge.demo.advising import build_knowledge_base, fact_correct, heldout_questions, is_markdown, write_datasets
from loraforge.demo.kb_file import kb_to_json, load_kb, write_kb
from loraforge.demo.rag import PageIndex, ground_file
from loraforge.training.config import TrainConfig
from loraforge.training.data import load_dataset
from loraforge.training.evaluate import generate
from loraforge.training.loop import TrainResult, train
from loraforge.training.metrics import plot_loss
from loraforge.training.retrieval import BM25, kb_pages, recall_at_k

SYSTEM = "You are a study-abroad advisor."


@dataclasses.dataclass
class DemoSettings:
    model: str = "smollm2-135m"
    universities: int = 12  # x 4 evaluated fact types = the held-out questions
    per_fact: int = 8  # training phrasings per evaluated fact (every phrasing of the pool)
    rank: int = 16
    alpha: float = 32.0
    targets: str = "all-linear"
    batch_size: int = 8
    phase1_steps: int = 270  # 4.5 passes over phase 1
    phase1_lr: float = 2e-3
    phase2_steps: int = 12
    phase2_lr: float = 5e-4
    # Phase 2 starts a fresh AdamW on an adapter that already holds the facts: its first steps move
    # every weight by about lr whatever the gradient, so it warms up over a quarter of its steps.
    phase2_warmup: float = 0.25
    max_new_tokens: int = 48  # the longest graded answer is about 30 tokens
    eval_batch_size: int = 48
    # --rag: train on questions behind their BM25 top-k pages (4-5 times longer rows than the plain
    # ones, so fewer steps fit the same minutes) and grade base, base+rag, lora and lora+rag.
    rag: bool = False
    rag_k: int = 2


def ask(model, tokenizer, items, settings: DemoSettings, index: PageIndex | None = None) -> tuple[list[str], dict[str, Any]]:
    """Answers and grades; with `index`, each question goes behind its retrieved pages."""
    questions = [[{"role": "system", "content": SYSTEM},
                  {"role": "user", "content": index.ground(item.question) if index else item.question}]
                 for item in items]
    answers = generate(model, tokenizer, questions, max_new_tokens=settings.max_new_tokens,
                       batch_size=settings.eval_batch_size, progress=True)
    correct = [fact_correct(a, item) for a, item in zip(answers, items)]
    by_type: dict[str, list[bool]] = {}
    for item, ok in zip(items, correct):
        by_type.setdefault(item.fact_type, []).append(ok)
    metrics = {
        "fact_accuracy": sum(correct) / len(items),
        "markdown_rate": sum(is_markdown(a) for a in answers) / len(items),
        "fact_accuracy_by_type": {t: sum(v) / len(v) for t, v in by_type.items()},
    }
    return answers, metrics


def retrieval_recall(knowledge, items, ks=(1, 2, 3)) -> dict[str, float]:
    """BM25's recall@k over the knowledge base's pages for the held-out questions, by k: whether
    retrieval can find the page a question is about (`loraforge.training.retrieval`)."""
    names = [u.name for u in knowledge.universities]
    bm25 = BM25(kb_pages(kb_to_json(knowledge)))
    questions, relevant = [i.question for i in items], [names.index(i.university) for i in items]
    return {str(k): recall_at_k(bm25, questions, relevant, k) for k in ks}


def run_demo(out: str | Path = "runs/demo", seed: int = 0, settings: DemoSettings | None = None,
             kb: str | Path | None = None) -> dict[str, Any]:
    """`kb`: a knowledge-base JSON file (schema in `loraforge.demo.kb_file`) to train and grade on
    instead of the generated one of `settings.universities`; it is read before the model loads."""
    settings = settings or DemoSettings()
    out = Path(out)
    knowledge = load_kb(kb, seed) if kb is not None else build_knowledge_base(seed, n_universities=settings.universities)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    torch.manual_seed(seed)

    model, tokenizer = load_model(settings.model)
    # The data go through files, as `loraforge train --data out/data/phase1.jsonl` would read them.
    paths = write_datasets(out / "data", seed=seed, system=SYSTEM, per_fact=settings.per_fact, kb=knowledge)
    write_kb(knowledge, out / "data" / "kb.json")  # the same schema --kb reads: edit it and run again
    index = PageIndex(knowledge, k=settings.rag_k) if settings.rag else None
    if index:
        paths = {name: ground_file(paths[name], out / "data" / f"{name}_rag.jsonl", index, seed)
                 for name in ("phase1", "phase2")}
    max_length = 1024 if index else 256  # pages make a row about 270 tokens instead of 60
    phase1 = load_dataset(paths["phase1"], tokenizer, max_length=max_length)
    phase2 = load_dataset(paths["phase2"], tokenizer, max_length=max_length)
    items = heldout_questions(knowledge, seed)

    print(f"[1/4] asking {len(items)} held-out questions to the base model")
    answers_before, before = ask(model, tokenizer, items, settings)
    conditions = {"base": before}
    if index:
        conditions["base+rag"] = ask(model, tokenizer, items, settings, index)[1]

    results: list[TrainResult] = []
    for phase, data, steps, lr, warmup in (
            ("phase1", phase1, settings.phase1_steps, settings.phase1_lr, TrainConfig.warmup),
            ("phase2", phase2, settings.phase2_steps, settings.phase2_lr, settings.phase2_warmup)):
        print(f"[{2 + len(results)}/4] {phase}: {len(data)} rows, {steps} steps")
        config = TrainConfig(model=settings.model, out=str(out / phase), rank=settings.rank, alpha=settings.alpha,
                             targets=settings.targets, steps=steps, lr=lr, warmup=warmup, batch_size=settings.batch_size,
                             max_length=max_length, length_grouped=True, seed=seed)
        results.append(train(config, model=model, tokenizer=tokenizer, train_data=data))

    print("[4/4] asking the held-out questions again")
    answers_after, after = ask(model, tokenizer, items, settings)
    conditions["lora"] = after
    if index:
        # The default condition of a --rag run, so the results' "after" keys are lora+rag's.
        answers_after, after = ask(model, tokenizer, items, settings, index)
        conditions["lora+rag"] = after

    history = results[0].history + [dict(r, step=r["step"] + settings.phase1_steps) for r in results[1].history]
    train_rows = [r for r in history if "samples_per_s" in r]
    samples = settings.batch_size * len(train_rows)
    train_seconds = sum(settings.batch_size / r["samples_per_s"] for r in train_rows)
    summary = {
        "fact_accuracy_before": before["fact_accuracy"],
        "fact_accuracy_after": after["fact_accuracy"],
        "markdown_rate_before": before["markdown_rate"],
        "markdown_rate_after": after["markdown_rate"],
        "fact_accuracy_by_type_after": after["fact_accuracy_by_type"],
        "loss_reduction": results[0].loss_reduction,
        "loss_reduction_phase2": results[1].loss_reduction,
        "samples_per_s": samples / train_seconds,
        "seconds": time.perf_counter() - start,
        "facts": len(items),
        "retrieval_recall_at_k": retrieval_recall(knowledge, items),
        "facts_graded": len(items),
        "conditions": {name: {"fact_accuracy": m["fact_accuracy"], "markdown_rate": m["markdown_rate"]}
                       for name, m in conditions.items()},
        "train_rows": {"phase1": len(phase1), "phase2": len(phase2)},
        "settings": dataclasses.asdict(settings),
    }
    plot_loss(history, out / "loss.png", title="advising demo: phase 1 then phase 2")
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "answers.jsonl", "".join(
        json.dumps({"question": item.question, "fact_type": item.fact_type, "expected": item.expected,
                    "before": a, "after": b, "correct_after": fact_correct(b, item)}) + "\n"
        for item, a, b in zip(items, answers_before, answers_after)))
    atomic_write_text(out / "report.md", render_report(summary, items, answers_before, answers_after))
    return summary


def render_report(summary: dict[str, Any], items, before: list[str], after: list[str]) -> str:
    s = summary
    lines = [
        "# loraforge demo: a study-abroad advisor from SmolLM2-135M-Instruct",
        "",
        f"LoRA r={s['settings']['rank']}, alpha={s['settings']['alpha']}, {s['settings']['targets']}; "
        f"phase 1: {s['train_rows']['phase1']} Q&A rows, {s['settings']['phase1_steps']} steps; "
        f"phase 2: {s['train_rows']['phase2']} dialogues, {s['settings']['phase2_steps']} steps; "
        f"batch {s['settings']['batch_size']}. Whole run: {s['seconds']:.0f} s.",
        "",
        f"| measure ({s['facts']} held-out questions) | before | after | paper (Mistral-7B, GPU) |",
        "|---|---|---|---|",
        f"| fact accuracy | {s['fact_accuracy_before']:.2f} | {s['fact_accuracy_after']:.2f} | 0.92 (domain accuracy) |",
        f"| Markdown rate | {s['markdown_rate_before']:.2f} | {s['markdown_rate_after']:.2f} | 0.95 |",
        f"| training-loss reduction (phase 1) | | {s['loss_reduction']:.2f} | 0.527 |",
        f"| throughput (samples/s) | | {s['samples_per_s']:.2f} | |",
        "",
        "Fact accuracy after training, by fact type: "
        + ", ".join(f"{t} {v:.2f}" for t, v in s["fact_accuracy_by_type_after"].items()) + ".",
        "",
        "BM25 recall@k over the knowledge base's pages, held-out questions: "
        + ", ".join(f"k={k} {v:.2f}" for k, v in s["retrieval_recall_at_k"].items()) + ".",
        "",
        "| condition | fact accuracy | Markdown rate |",
        "|---|---|---|",
        *(f"| {name} | {m['fact_accuracy']:.2f} | {m['markdown_rate']:.2f} |" for name, m in s["conditions"].items()),
        "",
        "![loss](loss.png)",
        "",
        "## Answers (first 6 held-out questions)",
        "",
    ]
    for item, a, b in list(zip(items, before, after))[:6]:
        lines += [f"**Q:** {item.question}  (expected: {item.expected})", "",
                  "*before:*", "", _quote(a), "", "*after:*", "", _quote(b), ""]
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in (text or "(empty)").splitlines())
