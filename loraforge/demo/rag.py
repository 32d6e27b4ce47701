"""Retrieval for the demo: the knowledge base's university pages, BM25 over them, and the training
rows whose questions carry the top-k retrieved pages.

The right page is among the top k for every held-out question (recall@1 is 1.0 on the generated
bases), so the other k-1 pages are distractors: training shuffles the order of the pages, so the
adapter learns to read the page of the university asked about rather than copy the first one.

Phase 1 packs several questions into one row (:func:`packed_rows`): the pages retrieved for the
first question, then that question and its answer, then more questions about the universities on
those pages, about universities no page holds and about facts no page holds, each with its answer.
The pages, which make up most of a row's tokens, are read once for `per_row` answers instead of
once per answer: about 2.5 times the answers per trained token at 4 questions a row.
"""

from __future__ import annotations

import random

from loraforge.demo.advising import (
    EVALUATED_FACTS,
    TRAIN_QUESTIONS,
    TRAIN_UNKNOWN_TOPICS,
    KnowledgeBase,
    _ask,
    _chat,
    _cycle,
    fact_answer,
    unknown_topic_answer,
    unknown_university_answer,
)
from loraforge.demo.kb_file import kb_to_json
from loraforge.training.retrieval import BM25, kb_pages, with_pages


class PageIndex:
    """BM25 over one knowledge base's pages; `ground(question)` is the user message to send."""

    def __init__(self, kb: KnowledgeBase, k: int = 2):
        self.kb = kb
        self.pages = kb_pages(kb_to_json(kb))
        self.bm25, self.k = BM25(self.pages), k

    def search(self, question: str, rng: random.Random | None = None, k: int | None = None) -> list[int]:
        """The top-k pages' indices (`k` defaults to the index's; in shuffled order with `rng`)."""
        found = self.bm25.search(question, k or self.k)
        if rng is not None:
            rng.shuffle(found)
        return found

    def ground(self, question: str, rng: random.Random | None = None) -> str:
        return with_pages(question, [self.pages[i] for i in self.search(question, rng)])


def packed_rows(index: PageIndex, n_rows: int, seed: int = 0, per_row: int = 4,
                unknown: list[dict[str, str]] | None = None, unknown_share: float = 0.125,
                topic_share: float = 0.1) -> list[dict]:
    """`n_rows` conversations of `per_row` questions behind the pages retrieved for the first one:
    between one and the index's k pages (a row with fewer pages is shorter, and as instructive).

    The first questions go round every (university, fact type) in shuffled order, except that a
    share `unknown_share` of them ask about one of the `unknown` universities instead (pages of
    other universities come back: the answer is "I don't know"). A follow-up asks about an unknown
    university (share `unknown_share`), about a fact no page holds (TRAIN_UNKNOWN_TOPICS) of a
    university on the pages (share `topic_share`), or else about a fact of a university on the
    pages that the row has not asked yet: a repeated fact could be copied from the earlier answer
    instead of read. Draw `unknown` from many names, each seldom asked: a few names asked often
    are learnt as names to refuse, and the adapter does not learn to look for the name on the pages.
    """
    rng = random.Random(f"loraforge-advising-rag-phase1:{seed}")
    kb = index.kb
    pairs = [(u, f) for u in kb.universities for f in EVALUATED_FACTS]
    # An absent value (no scholarship) is the rarest answer: one university in eight has one, and
    # edits withdraw more after training. Drawn as often as any other fact, the adapter met it a
    # few times and answered all four such questions with an amount from the page (tuition, or
    # the other page's scholarship). So an absence is a first question twice as often, and a row
    # whose pages show one asks it before any other follow-up.
    firsts = _cycle(rng, pairs + [(u, f) for u, f in pairs if _absent(u, f)], n_rows)
    rows = []
    for uni, fact_type in firsts:
        if unknown and rng.random() < unknown_share:
            fields = rng.choice(unknown)
            question = rng.choice(TRAIN_QUESTIONS[fact_type]).format(**fields)
            answer = unknown_university_answer(fields, rng)
        else:
            question, answer = _ask(rng.choice(TRAIN_QUESTIONS[fact_type]), uni), fact_answer(uni, fact_type, rng)
        found = index.search(question, rng, rng.randint(1, index.k))
        turns = [with_pages(question, [index.pages[i] for i in found]), answer]
        shown = [kb.universities[i] for i in found]
        unasked = [(u, f) for u in shown for f in EVALUATED_FACTS if (u, f) != (uni, fact_type)]
        rng.shuffle(unasked)
        unasked.sort(key=lambda pair: _absent(*pair))  # pop() takes from the end: absences first
        for _ in range(per_row - 1):
            draw = rng.random()
            if unknown and draw < unknown_share:
                fields = rng.choice(unknown)
                turns += [rng.choice(TRAIN_QUESTIONS[rng.choice(EVALUATED_FACTS)]).format(**fields),
                          unknown_university_answer(fields, rng)]
            elif draw < unknown_share + topic_share or not unasked:
                other = rng.choice(shown)
                topic, template = rng.choice(TRAIN_UNKNOWN_TOPICS)
                turns += [_ask(template, other), unknown_topic_answer(other, topic, rng)]
            else:
                other, follow = unasked.pop()
                turns += [_ask(rng.choice(TRAIN_QUESTIONS[follow]), other), fact_answer(other, follow, rng)]
        rows.append(_chat(*turns))
    return rows


def _absent(uni, fact_type: str) -> bool:
    return fact_type == "scholarship" and uni.scholarship is None


def ground_rows(records: list[dict], index: PageIndex, seed: int = 0, first_only: bool = False) -> list[dict]:
    """Chat records with their user turns (only the first with `first_only`) behind their retrieved
    pages, in shuffled order."""
    rng = random.Random(f"loraforge-advising-rag:{seed}")
    out = []
    for record in records:
        first = next(i for i, m in enumerate(record["messages"]) if m["role"] == "user")
        out.append({**record, "messages": [dict(m, content=index.ground(m["content"], rng))
                                           if m["role"] == "user" and (i == first or not first_only) else m
                                           for i, m in enumerate(record["messages"])]})
    return out
