"""A CLIP tokenizer whose vocabulary is the caption words: standard vocab.json / merges.txt files.

A real CLIP vocabulary has 49,408 tokens; a small text tower trained on a few hundred caption
words would spend most of its parameters on embeddings it never sees (the issue's first try: 70% of
a 5.5M model). This one keeps CLIP's layout and algorithm, so `CLIPTokenizer` reads it unchanged:

    256 byte characters, the same 256 with "</w>" (any text still tokenizes, letter by letter),
    the merges byte-pair encoding learns on the captions until every caption word is one token,
    <|startoftext|>, <|endoftext|>
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def write_vocab(texts: Iterable[str], folder: str | Path) -> tuple[Path, Path]:
    """Learn merges on `texts` (lower-cased words) and write CLIP's vocab.json and merges.txt."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = sorted({w for text in texts for w in text.lower().split()})
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    # A vocabulary larger than any possible merge count: training stops when every word is whole.
    trainer = trainers.BpeTrainer(vocab_size=1_000_000, min_frequency=1, end_of_word_suffix="</w>", show_progress=False)
    bpe.train_from_iterator([" ".join(words)], trainer)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in json.loads(bpe.to_str())["model"]["merges"]]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
    merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vocab_file, merges_file


def caption_tokenizer(texts: Iterable[str], folder: str | Path, max_length: int) -> CLIPTokenizer:
    """A CLIPTokenizer over the caption words (files written to `folder`), padding with <|endoftext|>."""
    write_vocab(texts, folder)
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length, pad_token=EOS)
