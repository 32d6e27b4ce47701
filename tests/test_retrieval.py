"""BM25 over knowledge-base pages: ranking, recall@k, and pages that state every fact as the demo does."""

import pytest

from loraforge.demo.advising import build_knowledge_base, heldout_questions
from loraforge.demo.kb_file import kb_to_json
from loraforge.training.retrieval import BM25, kb_pages, recall_at_k


def test_bm25_ranks_by_rare_terms_and_normalises_length():
    docs = ["the cat sat on the mat", "the dog chased the cat", "a glacier moves slowly",
            "glacier " + "filler " * 40]
    bm25 = BM25(docs)
    assert bm25.search("which glacier?", 2) == [2, 3]  # the short page with the term beats the long one
    assert bm25.search("dog and cat", 1) == [1]
    assert bm25.scores("zebra") == [0.0] * 4
    assert recall_at_k(bm25, ["glacier", "the dog"], [2, 0], 1) == 0.5


def test_pages_state_every_fact_of_their_university():
    kb = build_knowledge_base(0, n_universities=12)
    pages = kb_pages(kb_to_json(kb))
    for uni, page in zip(kb.universities, pages):
        for fact in ("deadline", "tuition", "language", "scholarship", "programme", "location", "visa"):
            assert uni.fact(fact) in page, (uni.name, fact)


@pytest.mark.parametrize("n", [12, 20])
def test_bm25_finds_the_asked_universitys_page_first(n):
    kb = build_knowledge_base(0, n_universities=n)
    items = heldout_questions(kb, 0)
    names = [u.name for u in kb.universities]
    bm25 = BM25(kb_pages(kb_to_json(kb)))
    assert recall_at_k(bm25, [i.question for i in items], [names.index(i.university) for i in items], 1) == 1.0
