"""Procedural task families: the tasks an adapter zoo is trained on, each with a description in words.

    offset  the user message is a whole number 0-999 in decimal, nothing else; the answer is that number
            plus k (the task's value), nothing else. "Add k to the number." Nothing in a prompt names k,
            so the base model cannot do it, and neighbouring k lie between one another: a generator
            can interpolate along k.
    labels  an SST-2 sentence (the user message, nothing else); the answer is one of a pair of label
            words, "POS/NEG" (the task's value): "good/bad", "yes/no", ... The pair is named nowhere
            in the prompt either. Read from the shared data folder (`--data DIR` or $LORAFORGE_DATA,
            holding sst2/train.tsv).

Rows are chat JSONL (`{"messages": [user, assistant]}`, no system prompt of ours), rendered by the
model's own chat template at training time. Each task draws its rows from its own seeded RNG, so a
zoo rebuilt with the same values has the same data; train and test never share a prompt.
"""

from __future__ import annotations

import csv
import os
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from loraforge.core.errors import LoraforgeError

# The standard offset zoo, and the values `bench generate` holds out (never trained on).
OFFSET_ZOO = (1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 15, 16, 18, 20, 24, 28, 30)
OFFSET_HELD_OUT = (7, 13, 22)
# Label-word pairs "POS/NEG": 12 to train on, 4 held out. In each pair the words differ in their first
# letter, so their first tokens differ and a two-way score over first tokens is well defined.
LABEL_PAIRS = ("good/bad", "yes/no", "positive/negative", "happy/sad", "great/awful", "like/hate",
               "up/down", "true/false", "love/dislike", "win/lose", "light/dark", "hot/cold")
LABEL_PAIRS_HELD_OUT = ("blue/red", "pass/fail", "sun/rain", "one/zero")
DATA_ENV = "LORAFORGE_DATA"


@dataclass(frozen=True)
class Task:
    family: str
    value: str

    @property
    def id(self) -> str:
        return f"{self.family}-{self.value.replace('/', '-')}"

    @property
    def description(self) -> str:
        return FAMILIES[self.family].describe(self.value)

    def rows(self, n_train: int, n_test: int, data: str | None = None) -> tuple[list[dict], list[dict]]:
        """(train rows, test rows) of chat JSONL, disjoint in their prompts."""
        rng = random.Random(zlib.crc32(self.id.encode()))  # stable across runs and machines, unlike hash()
        return FAMILIES[self.family].rows(self.value, n_train, n_test, rng, data)


@dataclass(frozen=True)
class Family:
    describe: Callable[[str], str]
    rows: Callable[[str, int, int, random.Random, str | None], tuple[list[dict], list[dict]]]
    check: Callable[[str], None]


def chat(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def _offset_check(value: str) -> None:
    if not value.lstrip("-").isdigit():
        raise LoraforgeError(f"offset family: value {value!r} is not a whole number")


def _offset_rows(value: str, n_train: int, n_test: int, rng: random.Random, data: str | None):
    if n_train + n_test > 1000:
        raise LoraforgeError(f"offset family: {n_train} + {n_test} rows need more than the 1000 numbers 0-999")
    k = int(value)
    numbers = rng.sample(range(1000), n_train + n_test)
    rows = [chat(str(n), str(n + k)) for n in numbers]
    return rows[:n_train], rows[n_train:]


def _labels_check(value: str) -> None:
    words = value.split("/")
    if len(words) != 2 or not all(w.isalpha() for w in words) or words[0][0] == words[1][0]:
        raise LoraforgeError(f"labels family: value {value!r} must be two words POS/NEG that differ in their first "
                             f"letter, e.g. good/bad")


def sst2_path(data: str | None) -> Path:
    """sst2/train.tsv under `data`, else under $LORAFORGE_DATA."""
    root = data or os.environ.get(DATA_ENV)
    if not root:
        raise LoraforgeError(f"the labels family reads SST-2: pass --data DIR (the folder holding sst2/train.tsv) "
                             f"or set {DATA_ENV}")
    path = Path(root) / "sst2" / "train.tsv"
    if not path.is_file():
        raise LoraforgeError(f"{path}: not found (--data / {DATA_ENV} must name the folder holding sst2/train.tsv)")
    return path


def read_sst2(data: str | None) -> list[tuple[str, int]]:
    path = sst2_path(data)
    with path.open(newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        rows = [(r["sentence"].strip(), int(r["label"])) for r in reader]
    return [(s, y) for s, y in rows if s]


def _labels_rows(value: str, n_train: int, n_test: int, rng: random.Random, data: str | None):
    pos, neg = value.split("/")
    # Every task sees the same sentence pool, split the same way; only the words (and the draw) differ,
    # so a held-out pair's test sentences were never a training sentence of any pair.
    sentences = read_sst2(data)
    split = random.Random(0).sample(range(len(sentences)), len(sentences))
    cut = len(split) * 9 // 10
    train_pool, test_pool = split[:cut], split[cut:]
    if n_train > len(train_pool) or n_test > len(test_pool):
        raise LoraforgeError(f"labels family: {n_train} train / {n_test} test rows asked for, SST-2 has "
                             f"{len(train_pool)} / {len(test_pool)}")

    def rows(pool: list[int], n: int) -> list[dict]:
        return [chat(sentences[i][0], pos if sentences[i][1] == 1 else neg) for i in rng.sample(pool, n)]

    return rows(train_pool, n_train), rows(test_pool, n_test)


FAMILIES = {
    "offset": Family(describe=lambda v: f"Add {int(v)} to the number.", rows=_offset_rows, check=_offset_check),
    "labels": Family(describe=lambda v: "Answer '{}' if the sentence is positive and '{}' if it is negative.".format(
        *v.split("/")), rows=_labels_rows, check=_labels_check),
}


def make_task(family: str, value: str) -> Task:
    if family not in FAMILIES:
        raise LoraforgeError(f"unknown task family {family!r}: choose one of {', '.join(FAMILIES)}")
    FAMILIES[family].check(value)
    return Task(family, value)
