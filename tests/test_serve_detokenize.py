"""Incremental detokenization: the text grown token by token is the whole output decoded, on the
embedded SmolLM2's byte-level BPE (multi-byte characters split across tokens included)."""

from __future__ import annotations

import random

import pytest

import loraforge as lf
from loraforge.serve.engine import Request, SamplingParams, detokenize

TEXTS = ["Hello, world! It's 3.14 -- isn't it?", "Grüße aus Zürich: naïve café, façade.", "東京は日本の首都です。",
         "emoji 🤖🚀 and flags 🇫🇷 mixed", "  leading spaces\n\ttabs\n\nnew lines  ", "def f(x):\n    return x ** 2  # ok"]


@pytest.fixture(scope="module")
def tokenizer():
    return lf.load_model("smollm2-135m")[1]


def grow(tokenizer, ids: list[int]) -> list[str]:
    req = Request("r", [1], None, SamplingParams())
    texts = []
    for token in ids:
        req.output_ids.append(token)
        texts.append(detokenize(tokenizer, req))
    return texts


@pytest.mark.parametrize("text", TEXTS)
def test_grown_text_is_the_whole_decode_at_every_whole_character(tokenizer, text):
    ids = tokenizer.encode(text)
    for k, grown in enumerate(grow(tokenizer, ids), start=1):
        whole = tokenizer.decode(ids[:k], skip_special_tokens=True)
        assert whole.startswith(grown) and "\ufffd" not in grown  # never ahead, never half a character
        if not whole.endswith("\ufffd"):
            assert grown == whole, (k, grown, whole)
    assert grown == text


def test_random_tokens_and_special_ones_decode_as_the_whole(tokenizer):
    rng = random.Random(0)
    ids = [rng.randrange(len(tokenizer)) for _ in range(300)] + tokenizer.encode(" end.")
    ids[10:10] = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_start|>")]  # skipped when decoded
    assert grow(tokenizer, ids)[-1] == tokenizer.decode(ids, skip_special_tokens=True)
