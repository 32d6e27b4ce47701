"""`loraforge demo`: turn SmolLM2-135M-Instruct into a study-abroad advisor, offline, on a CPU.

An embedded re-enactment of the seed's first study (LoRA fine-tuning of an instruction model into
a study-abroad advisor, in two phases, answers in Markdown), on an invented knowledge base that
the base model cannot know (`loraforge.demo.advising`), grown into something an office could run:
retrieval puts the knowledge base's pages in the prompt (`loraforge.demo.rag`), so facts can change
after training, and the advisor says "I don't know" about what no page holds.

    1. ask the held-out questions (phrasings no training row uses) to the base model, without and
       with the retrieved pages (conditions base, base+rag)
    2. phase 1: LoRA on rows of several questions behind their retrieved pages (`--no-rag`: the
       broad single-question set without pages)
    3. phase 2 (by default only without retrieval): the same adapter, on the multi-turn advising
       dialogues; OUT/adapter is the last phase's adapter
    4. ask again (lora, lora+rag); write report.md, results.json, answers.jsonl, loss.png

Four kinds of held-out question, graded under each condition:

* fact: every fact type of every trained university (`fact_accuracy`, `markdown_rate`);
* updated: after training a quarter of the knowledge base's values are edited (no retraining); the
  questions on them are graded against the new values (`updated_fact_accuracy`), and stating the
  old one counts as stale (`stale_rate`);
* new: universities from another seed of the generator, added after training
  (`new_university_accuracy`);
* unknown: universities the knowledge base does not hold (names never in training) and facts no
  page holds, to be answered "I don't know" with no value (`unknown_refusal_rate`).

Every record carries one short system prompt, so the model knows its role and the sequences stay
short (SmolLM2's template would otherwise insert its own, longer one).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from loraforge.adapters.inject import merge
from loraforge.core.errors import LoraforgeError
from loraforge.core.files import atomic_dir, atomic_write_text, write_jsonl
from loraforge.core.models import load_model
from loraforge.demo.advising import (
    EvalItem,
    KnowledgeBase,
    add_universities,
    build_knowledge_base,
    edit_values,
    grade,
    heldout_questions,
    is_markdown,
    is_stale,
    refusal_examples,
    unknown_questions,
    unknown_universities,
    updated_questions,
    write_datasets,
)
from loraforge.demo.kb_file import load_kb, write_kb
from loraforge.demo.rag import PageIndex, ground_rows, packed_rows
from loraforge.training.config import TrainConfig
from loraforge.training.data import load_dataset
from loraforge.training.evaluate import generate
from loraforge.training.loop import TrainResult, train
from loraforge.training.metrics import plot_loss
from loraforge.training.retrieval import recall_at_k

SYSTEM = "You are a study-abroad advisor."
CONDITIONS = ("base", "base+rag", "lora", "lora+rag")


@dataclasses.dataclass
class DemoSettings:
    model: str = "smollm2-135m"
    universities: int = 19  # x 7 fact types = 133 held-out fact questions
    per_fact: int = 8  # --no-rag: training phrasings per fact
    rank: int = 16
    alpha: float = 32.0
    targets: str = "all-linear"
    batch_size: int = 8
    # None: the mode's own default. With retrieval a row carries two pages (about 200 tokens) and
    # five answers; the adapter learns to read the page, not to hold every value, so one pass over
    # 288 such rows does what 270 steps of one-answer rows did without pages (docs/benchmarks.md).
    phase1_steps: int | None = None  # rag: 36; no rag: 270 (4.5 passes over phase 1)
    phase1_lr: float = 2e-3
    # rag: 0, no phase 2. Its dialogues hold comparisons of two or three bullets, and after them the
    # adapter went on after its answer with more bullets holding other universities' values: on the
    # same 48 fact and 24 "I don't know" questions, phase 1 alone scored 1.00 and 0.75, and 0.88 and
    # 0.42 after 6 steps of dialogues; with half of phase 2's rows replaying phase 1, whole runs
    # still scored 0.80-0.93 and 0.71-0.79, against 0.94 and 0.88 without phase 2
    # (docs/benchmarks.md). Phase 1's rows are conversations already: five questions on the pages.
    phase2_steps: int | None = None  # rag: 0 (--phase2-steps N: dialogues and replayed phase-1 rows); no rag: 12
    phase2_lr: float = 5e-4
    # Phase 2 starts a fresh AdamW on an adapter that already holds the facts: its first steps move
    # every weight by about lr whatever the gradient, so it warms up over a quarter of its steps.
    phase2_warmup: float = 0.25
    max_new_tokens: int = 40  # the longest graded answer (lora+rag, visa) is 35 tokens; the base rambles to the cap
    eval_batch_size: int = 48
    rag: bool = True  # False (--no-rag): no pages, conditions base and lora only
    rag_k: int = 2
    facts_per_row: int = 5  # questions per packed phase-1 row (rag)
    unknown_share: float = 0.2  # of packed rows' questions, about universities the knowledge base lacks
    topic_share: float = 0.15  # of their follow-ups, about facts no page holds
    edit_fraction: float = 0.25  # of the trained facts, edited after training
    # Generated universities that offer no scholarship (one in eight: 2 of 19). Edits withdraw some
    # scholarships after training, and their pages then read "Scholarship: none offered"; training
    # rows never hold a withdrawn one, so without these the adapter would meet that line first at
    # test time and might copy "none" into the trained "**name**: **amount**" answer. These are
    # trained on like any other fact (and graded in fact_accuracy); edits never touch them.
    no_scholarship_share: float = 0.125
    new_universities: int = 4  # added after training, from another seed of the generator
    unknown_universities: int = 16  # held-out "I don't know" questions about names not in the KB
    unknown_topics: int = 8  # ... and about facts no page holds
    train_unknown: int = 160  # other unknown names, for the refusals training carries (many: see packed_rows)

    def steps(self) -> tuple[int, int]:
        steps1 = self.phase1_steps if self.phase1_steps is not None else 36 if self.rag else 270
        steps2 = self.phase2_steps if self.phase2_steps is not None else 0 if self.rag else 12
        if steps1 < 1 or steps2 < 0:
            raise LoraforgeError(f"--phase1-steps must be at least 1 and --phase2-steps at least 0 (0: no phase 2), "
                                 f"got {steps1} and {steps2}")
        return steps1, steps2


@dataclasses.dataclass
class Scenario:
    """What the demo trains on and what it asks afterwards (see the module docstring)."""

    kb: KnowledgeBase  # trained on
    after: KnowledgeBase  # kb with a quarter of its values edited, plus the new universities
    edits: list[tuple[str, str]]
    train_unknown: list[dict[str, str]]  # names of training's refusals: never those of `unknown`
    facts: list[EvalItem]
    updated: list[EvalItem]
    new: list[EvalItem]
    unknown: list[EvalItem]


def build_scenario(kb: KnowledgeBase, settings: DemoSettings, seed: int = 0) -> Scenario:
    trained = tuple(u.name for u in kb.universities)
    extended = add_universities(kb, settings.new_universities, seed)
    after, edits = edit_values(extended, settings.edit_fraction, seed, among=trained)
    test_names = unknown_universities(extended, settings.unknown_universities, seed)
    train_names = unknown_universities(extended, settings.train_unknown, seed + 10_000,
                                       avoid=tuple(f["uni"] for f in test_names), own_prefix=False)
    facts = heldout_questions(kb, seed)
    new_names = tuple(u.name for u in after.universities[len(trained):])
    return Scenario(kb=kb, after=after, edits=edits, train_unknown=train_names, facts=facts,
                    updated=updated_questions(facts, kb, after, edits),
                    new=heldout_questions(after, seed + 1, new_names, kind="new"),
                    unknown=unknown_questions(after, test_names, seed, settings.unknown_topics))


def answer(model, tokenizer, questions: list[str], settings: DemoSettings, index: PageIndex | None = None) -> list[str]:
    """Greedy answers to `questions`, each behind its retrieved pages when `index` is given."""
    conversations = [[{"role": "system", "content": SYSTEM},
                      {"role": "user", "content": index.ground(q) if index else q}] for q in questions]
    return generate(model, tokenizer, conversations, max_new_tokens=settings.max_new_tokens,
                    batch_size=settings.eval_batch_size, progress=True, precision="auto")


def fact_metrics(answers: list[str], items: list[EvalItem]) -> dict[str, Any]:
    correct = [grade(a, item) for a, item in zip(answers, items)]
    by_type: dict[str, list[bool]] = {}
    for item, ok in zip(items, correct):
        by_type.setdefault(item.fact_type, []).append(ok)
    return {"fact_accuracy": sum(correct) / len(items),
            "markdown_rate": sum(is_markdown(a) for a in answers) / len(items),
            "fact_accuracy_by_type": {t: sum(v) / len(v) for t, v in by_type.items()}}


def ask(model, tokenizer, items, settings: DemoSettings, index: PageIndex | None = None) -> tuple[list[str], dict[str, Any]]:
    """Answers and grades; with `index`, each question goes behind its retrieved pages."""
    answers = answer(model, tokenizer, [item.question for item in items], settings, index)
    return answers, fact_metrics(answers, items)


def _share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def grade_condition(answers: dict[str, list[str]], scenario: Scenario) -> dict[str, Any]:
    """One condition's measures from its answers by kind ("fact", "updated", "new", "unknown")."""
    s = scenario
    return {**fact_metrics(answers["fact"], s.facts),
            "updated_fact_accuracy": _share([grade(a, i) for a, i in zip(answers["updated"], s.updated)]),
            "stale_rate": _share([is_stale(a, i) for a, i in zip(answers["updated"], s.updated)]),
            "new_university_accuracy": _share([grade(a, i) for a, i in zip(answers["new"], s.new)]),
            "unknown_refusal_rate": _share([grade(a, i) for a, i in zip(answers["unknown"], s.unknown)])}


def ask_condition(model, tokenizer, scenario: Scenario, settings: DemoSettings, rag: bool) -> dict[str, list[str]]:
    """Every held-out question of the scenario, by kind. Without pages an updated fact's question is
    its fact question word for word, so it gets the same answer; with pages, the fact questions go
    behind the trained knowledge base's pages and the others behind the edited one's."""
    s = scenario
    before = PageIndex(s.kb, settings.rag_k) if rag else None
    after = PageIndex(s.after, settings.rag_k) if rag else None
    out = {"fact": answer(model, tokenizer, [i.question for i in s.facts], settings, before)}
    if rag:
        out["updated"] = answer(model, tokenizer, [i.question for i in s.updated], settings, after)
    else:
        by_question = dict(zip((i.question for i in s.facts), out["fact"]))
        out["updated"] = [by_question[i.question] for i in s.updated]
    rest = answer(model, tokenizer, [i.question for i in s.new + s.unknown], settings, after)
    out["new"], out["unknown"] = rest[:len(s.new)], rest[len(s.new):]
    return out


def retrieval_recall(kb: KnowledgeBase, items: list[EvalItem], ks=(1, 2, 3)) -> dict[str, float]:
    """BM25's recall@k over the knowledge base's pages for the held-out questions, by k: whether
    retrieval can find the page a question is about (`loraforge.training.retrieval`)."""
    names = [u.name for u in kb.universities]
    bm25 = PageIndex(kb).bm25
    questions, relevant = [i.question for i in items], [names.index(i.university) for i in items]
    return {str(k): recall_at_k(bm25, questions, relevant, k) for k in ks}


def run_demo(out: str | Path = "runs/demo", seed: int = 0, settings: DemoSettings | None = None,
             kb: str | Path | None = None) -> dict[str, Any]:
    """`kb`: a knowledge-base JSON file (schema in `loraforge.demo.kb_file`) to train and grade on
    instead of the generated one of `settings.universities`; it is read before the model loads."""
    settings = settings or DemoSettings()
    out = Path(out)
    knowledge = load_kb(kb, seed) if kb is not None else build_knowledge_base(
        seed, n_universities=settings.universities, no_scholarship=int(settings.no_scholarship_share * settings.universities))
    scenario = build_scenario(knowledge, settings, seed)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    torch.manual_seed(seed)
    steps1, steps2 = settings.steps()

    model, tokenizer = load_model(settings.model)
    # The data go through files, as `loraforge train --data out/data/phase1.jsonl` would read them.
    data = out / "data"
    paths = write_datasets(data, seed=seed, system=SYSTEM, per_fact=settings.per_fact, kb=knowledge)
    write_kb(knowledge, data / "kb.json")  # the same schema --kb reads: edit it and run again
    write_kb(scenario.after, data / "kb_after.json")  # edited, with the new universities: what is asked after
    write_jsonl(data / "heldout_all.jsonl", [dataclasses.asdict(i) for i in
                                              scenario.facts + scenario.updated + scenario.new + scenario.unknown])
    system = [{"role": "system", "content": SYSTEM}]
    if settings.rag:
        index = PageIndex(knowledge, k=settings.rag_k)
        rows = packed_rows(index, steps1 * settings.batch_size, seed, settings.facts_per_row, scenario.train_unknown,
                           settings.unknown_share, settings.topic_share)
        paths["phase1"] = write_jsonl(data / "phase1_rag.jsonl", [{"messages": system + r["messages"]} for r in rows])
        if steps2:
            dialogues = [json.loads(line) for line in paths["phase2"].read_text(encoding="utf-8").splitlines()]
            # Replay: as many fresh phase-1 rows as dialogues, or phase 2 undoes what phase 1
            # taught (see DemoSettings.phase2_steps)
            replay = packed_rows(index, len(dialogues), seed + 1, settings.facts_per_row, scenario.train_unknown,
                                 settings.unknown_share, settings.topic_share)
            paths["phase2"] = write_jsonl(data / "phase2_rag.jsonl", ground_rows(dialogues, index, seed, first_only=True)
                                          + [{"messages": system + r["messages"]} for r in replay])
        max_length = 1024
    else:
        rows = [json.loads(line) for line in paths["phase1"].read_text(encoding="utf-8").splitlines()]
        rows += [{"messages": system + r["messages"]} for r in refusal_examples(knowledge, scenario.train_unknown, seed)]
        paths["phase1"] = write_jsonl(data / "phase1_refusals.jsonl", rows)
        max_length = 256
    phase1 = load_dataset(paths["phase1"], tokenizer, max_length=max_length)
    phase2 = load_dataset(paths["phase2"], tokenizer, max_length=max_length) if steps2 else []
    counts = {"fact": len(scenario.facts), "updated": len(scenario.updated), "new": len(scenario.new),
              "unknown": len(scenario.unknown)}

    seconds: dict[str, float] = {}
    answers: dict[str, dict[str, list[str]]] = {}
    tick = time.perf_counter()
    print(f"[1/4] asking the base model {counts}")
    for name, rag in (("base", False), ("base+rag", True)):
        if rag and not settings.rag:
            continue
        answers[name] = ask_condition(model, tokenizer, scenario, settings, rag)
    seconds["ask_before"], tick = time.perf_counter() - tick, time.perf_counter()

    results: list[TrainResult] = []
    for phase, rows, steps, lr, warmup in (
            ("phase1", phase1, steps1, settings.phase1_lr, TrainConfig.warmup),
            ("phase2", phase2, steps2, settings.phase2_lr, settings.phase2_warmup)):
        if not steps:
            continue
        print(f"[{2 + len(results)}/4] {phase}: {len(rows)} rows, {steps} steps")
        config = TrainConfig(model=settings.model, out=str(out / phase), rank=settings.rank, alpha=settings.alpha,
                             targets=settings.targets, steps=steps, lr=lr, warmup=warmup, batch_size=settings.batch_size,
                             max_length=max_length, seed=seed,
                             # phase 2 mixes dialogues with replayed rows: grouped by length they would
                             # fall into batches of one kind each, and its few steps see batches of both
                             length_grouped=phase == "phase1")
        results.append(train(config, model=model, tokenizer=tokenizer, train_data=rows))
    # OUT/adapter: the advisor, whichever phase came last (`loraforge chat --adapter OUT/adapter`)
    with atomic_dir(out / "adapter") as tmp:
        shutil.copytree(results[-1].out / "adapter", tmp, dirs_exist_ok=True)
    seconds["train"], tick = time.perf_counter() - tick, time.perf_counter()

    print("[4/4] asking the held-out questions again")
    merge(model)  # the adapters are saved: fold the delta in, so decoding costs what the base model's does
    for name, rag in (("lora", False), ("lora+rag", True)):
        if rag and not settings.rag:
            continue
        answers[name] = ask_condition(model, tokenizer, scenario, settings, rag)
    seconds["ask_after"] = time.perf_counter() - tick

    conditions = {name: grade_condition(a, scenario) for name, a in answers.items()}
    default = "lora+rag" if settings.rag else "lora"  # the results' "after" keys
    before, after = conditions["base"], conditions[default]
    history = results[0].history + [dict(r, step=r["step"] + steps1) for r in (results[1].history if steps2 else [])]
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
        "loss_reduction_phase2": results[1].loss_reduction if steps2 else None,
        "samples_per_s": samples / train_seconds,
        "seconds": time.perf_counter() - start,
        "facts": len(scenario.facts),
        "retrieval_recall_at_k": retrieval_recall(knowledge, scenario.facts),
        "facts_graded": len(scenario.facts),
        "questions": counts,
        "default_condition": default,
        "conditions": conditions,
        "stage_seconds": seconds,
        "train_rows": {"phase1": len(phase1), "phase2": len(phase2)},
        "settings": dict(dataclasses.asdict(settings), phase1_steps=steps1, phase2_steps=steps2),
    }
    plot_loss(history, out / "loss.png", title="advising demo: phase 1 then phase 2" if steps2 else "advising demo")
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2) + "\n")
    rows_out = []
    for kind, items in (("fact", scenario.facts), ("updated", scenario.updated), ("new", scenario.new),
                        ("unknown", scenario.unknown)):
        for n, item in enumerate(items):
            got = {name: a[kind][n] for name, a in answers.items()}
            correct = {name: grade(a, item) for name, a in got.items()}
            rows_out.append({"kind": kind, "question": item.question, "university": item.university,
                             "fact_type": item.fact_type, "expected": item.expected,
                             "before": got["base"], "after": got[default], "correct_after": correct[default],
                             "answers": got, "correct": correct,
                             **({"stale": {name: is_stale(a, item) for name, a in got.items()}} if kind == "updated" else {})})
    write_jsonl(out / "answers.jsonl", rows_out)
    atomic_write_text(out / "report.md", render_report(summary, scenario, rows_out))
    return summary


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


MEASURES = ("fact_accuracy", "markdown_rate", "updated_fact_accuracy", "stale_rate", "new_university_accuracy",
            "unknown_refusal_rate")


def render_report(summary: dict[str, Any], scenario: Scenario, rows: list[dict]) -> str:
    s, names = summary, list(summary["conditions"])
    st, q = s["settings"], s["questions"]
    lines = [
        "# loraforge demo: a study-abroad advisor from SmolLM2-135M-Instruct",
        "",
        f"LoRA r={st['rank']}, alpha={st['alpha']}, {st['targets']}; "
        f"phase 1: {s['train_rows']['phase1']} rows, {st['phase1_steps']} steps; "
        + (f"phase 2: {s['train_rows']['phase2']} rows, {st['phase2_steps']} steps; " if st["phase2_steps"] else "no phase 2; ")
        + f"batch {st['batch_size']}; retrieval {'BM25 top-' + str(st['rag_k']) if st['rag'] else 'off'}. "
        f"Whole run: {s['seconds']:.0f} s.",
        "",
        f"Held-out questions: {q['fact']} facts ({len(scenario.kb.universities)} universities x 7 fact types), "
        f"{q['updated']} on facts edited after training, {q['new']} on {st['new_universities']} universities "
        f"added after training, {q['unknown']} to be answered \"I don't know\".",
        "",
        "| measure | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
        *(f"| {m.replace('_', ' ')} | " + " | ".join(_fmt(s["conditions"][n][m]) for n in names) + " |"
          for m in MEASURES),
        "",
        "Fact accuracy by fact type:",
        "",
        "| fact type | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
        *(f"| {t} | " + " | ".join(_fmt(s["conditions"][n]["fact_accuracy_by_type"][t]) for n in names) + " |"
          for t in s["conditions"][names[0]]["fact_accuracy_by_type"]),
        "",
        f"Training-loss reduction (phase 1): {s['loss_reduction']:.2f}; throughput {s['samples_per_s']:.2f} "
        "samples/s. BM25 recall@k over the knowledge base's pages, held-out fact questions: "
        + ", ".join(f"k={k} {v:.2f}" for k, v in s["retrieval_recall_at_k"].items()) + ".",
        "",
        "![loss](loss.png)",
        "",
        "## Sample answers",
        "",
    ]
    for kind in ("fact", "updated", "new", "unknown"):
        picked = [r for r in rows if r["kind"] == kind]
        picked = [r for r in picked if not r["correct_after"]][:1] + [r for r in picked if r["correct_after"]][:1]
        for r in picked:
            lines += [f"**{kind}: {r['question']}**  (expected: {r['expected']})", ""]
            for name, text in r["answers"].items():
                mark = "right" if r["correct"][name] else "wrong"
                lines += [f"*{name}* ({mark}):", "", _quote(text), ""]
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in (text or "(empty)").splitlines())
