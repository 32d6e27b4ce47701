"""Retrieval for the demo (`loraforge demo --rag`): the knowledge base's university pages, BM25 over
them, and training rows whose questions carry the top-k retrieved pages.

The right page is among the top k for every held-out question (recall@1 is 1.0 on the generated
bases), so the other k-1 pages are distractors: training shuffles the order of the pages, so the
adapter learns to read the page of the university asked about rather than copy the first one.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from loraforge.demo.advising import KnowledgeBase
from loraforge.demo.kb_file import kb_to_json
from loraforge.training.retrieval import BM25, kb_pages, with_pages


class PageIndex:
    """BM25 over one knowledge base's pages; `ground(question)` is the user message to send."""

    def __init__(self, kb: KnowledgeBase, k: int = 2):
        self.pages = kb_pages(kb_to_json(kb))
        self.bm25, self.k = BM25(self.pages), k

    def ground(self, question: str, rng: random.Random | None = None) -> str:
        found = [self.pages[i] for i in self.bm25.search(question, self.k)]
        if rng is not None:
            rng.shuffle(found)
        return with_pages(question, found)


def ground_file(src: Path, dst: Path, index: PageIndex, seed: int = 0) -> Path:
    """Copy a chat JSONL file with every user turn behind its retrieved pages, in shuffled order."""
    rng = random.Random(f"loraforge-advising-rag:{seed}")
    with src.open(encoding="utf-8") as f, dst.open("w", encoding="utf-8") as out:
        for line in f:
            record = json.loads(line)
            record["messages"] = [dict(m, content=index.ground(m["content"], rng)) if m["role"] == "user" else m
                                  for m in record["messages"]]
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    return dst
