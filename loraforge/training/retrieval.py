"""Retrieval over a knowledge base's pages: BM25 (Robertson and Zaragoza, 2009), no model needed.

One page per university of a knowledge-base JSON file (the schema of `loraforge.demo.kb_file`),
rendered here, below the stages, so that the demo, which trains on prompts carrying pages, and the
server and chat, which put pages in front of a user's question, show the model the same text.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

MONTHS = ("January", "February", "March", "April", "May", "June",
          "July", "August", "September", "October", "November", "December")


def _tokens(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


class BM25:
    """Okapi BM25 over `documents`; `search` returns document indices, best first."""

    def __init__(self, documents: list[str], k1: float = 1.5, b: float = 0.75):
        self.documents = documents
        self.k1, self.b = k1, b
        self.counts = [Counter(_tokens(d)) for d in documents]
        self.lengths = [sum(c.values()) for c in self.counts]
        self.mean_length = sum(self.lengths) / max(len(documents), 1)
        frequency = Counter(term for c in self.counts for term in c)
        n = len(documents)
        # The "+1" form of the inverse document frequency: never negative, so a term in most pages
        # (a university's "University") still counts a little instead of pushing its page down.
        self.idf = {term: math.log(1 + (n - f + 0.5) / (f + 0.5)) for term, f in frequency.items()}

    def scores(self, query: str) -> list[float]:
        terms = _tokens(query)
        out = []
        for counts, length in zip(self.counts, self.lengths):
            norm = self.k1 * (1 - self.b + self.b * length / self.mean_length)
            out.append(sum(self.idf.get(t, 0.0) * counts[t] * (self.k1 + 1) / (counts[t] + norm)
                           for t in terms if counts[t]))
        return out

    def search(self, query: str, k: int) -> list[int]:
        scores = self.scores(query)
        return sorted(range(len(scores)), key=lambda i: -scores[i])[:k]


def recall_at_k(retriever: BM25, queries: list[str], relevant: list[int], k: int) -> float:
    """The share of queries whose relevant document is among the top k."""
    return sum(r in retriever.search(q, k) for q, r in zip(queries, relevant)) / len(queries)


def kb_pages(data: dict[str, Any]) -> list[str]:
    """One Markdown page per university of a knowledge base in the `--kb` JSON schema, in file order."""
    countries = {c["name"]: c for c in data["countries"]}
    pages = []
    for u in data["universities"]:
        country, language, scholarship = countries[u["country"]], u["language"], u["scholarship"]
        requirement = (f"{language['test']} {language['level']}" if language["test"] in ("IELTS", "TOEFL")
                       else f"{language['level']} {language['test']}")
        pages.append("\n".join([
            f"## {u['name']}",
            f"- Location: {u['city']}, {u['country']}",
            f"- Programmes: {' and '.join(u['programmes'])}",
            f"- Application deadline: {u['deadline']['day']} {MONTHS[u['deadline']['month'] - 1]}",
            f"- Tuition: €{u['tuition']:,} per year",
            f"- Language requirement: {requirement}",
            # null: no scholarship (none, or withdrawn since training): said plainly, with no name or amount
            f"- Scholarship: {scholarship['name']} (€{scholarship['amount']:,}) a year" if scholarship
            else "- Scholarship: none offered",
            f"- Student visa: {country['visa_weeks']} weeks to process; "
            f"show €{country['visa_funds']:,} in a bank account",
        ]))
    return pages


def with_pages(question: str, pages: list[str]) -> str:
    """The user message that carries retrieved pages before the question: one layout for every
    caller (demo training, chat, server), since an adapter learns to read the layout it was trained on."""
    return "Knowledge base:\n\n" + "\n\n".join(pages) + f"\n\nQuestion: {question}"
