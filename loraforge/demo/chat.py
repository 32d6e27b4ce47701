"""`loraforge chat`: talk to a model (and adapter) in the terminal, tokens printed as they come.

The conversation is kept and sent whole each turn; `/reset` forgets it, `/quit` (or end of input)
leaves. With `--kb FILE.json` (the demo's knowledge-base schema) every question goes out with the
BM25 top-k university pages in front of it, in the layout `loraforge demo` trains on; the history
keeps the bare questions, so old pages do not crowd the context of the next turn.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from loraforge.core.models import default_device
from loraforge.demo.kb_file import kb_to_json, load_kb
from loraforge.training.data import render_chat
from loraforge.training.retrieval import BM25, kb_pages, with_pages

SYSTEM = "You are a study-abroad advisor."  # the demo's system prompt, which its adapters are trained with


class Chat:
    """One conversation: `reply(text)` streams the answer to `stream` and returns it."""

    def __init__(self, model, tokenizer, system: str | None = SYSTEM, pages: list[str] | None = None,
                 top_k: int = 2, max_new_tokens: int = 256, stream: TextIO = sys.stdout):
        self.model, self.tokenizer, self.system, self.top_k = model, tokenizer, system, top_k
        self.max_new_tokens, self.stream = max_new_tokens, stream
        self.pages = pages
        self.retriever = BM25(pages) if pages else None
        self.history: list[dict[str, str]] = []

    def reset(self) -> None:
        self.history = []

    def messages(self, text: str) -> list[dict[str, str]]:
        """What the model is sent for `text`: system prompt, history, then `text` behind its pages."""
        content = text
        if self.retriever is not None:
            content = with_pages(text, [self.pages[i] for i in self.retriever.search(text, self.top_k)])
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history + [{"role": "user", "content": content}]

    def reply(self, text: str) -> str:
        import torch

        prompt = render_chat(self.messages(text), self.tokenizer, add_generation_prompt=True)
        enc = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(next(self.model.parameters()).device)
        streamer = _streamer(self.tokenizer, self.stream)
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False, streamer=streamer,
                                      pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
        answer = self.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return answer


def _streamer(tokenizer: Any, stream: TextIO):
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            stream.write(text + ("\n" if stream_end else ""))
            stream.flush()

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def run_chat(chat: Chat, read=input, write: TextIO = sys.stdout) -> None:
    write.write("loraforge chat: /reset forgets the conversation, /quit leaves\n")
    while True:
        try:
            text = read("you> ").strip()
        except EOFError:
            write.write("\n")
            return
        if text == "/quit":
            return
        if text == "/reset":
            chat.reset()
            write.write("(conversation reset)\n")
        elif text:
            write.write("advisor> ")
            write.flush()
            chat.reply(text)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="an interactive chat in the terminal, streamed, with retrieval over --kb")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--adapter", help="adapter folder (e.g. runs/demo/adapter)")
    p.add_argument("--kb", help="knowledge base JSON (loraforge demo --kb schema): put the top-k pages in each prompt")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--system", default=SYSTEM, help="system prompt ('' for none)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.set_defaults(run=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> int:
    from loraforge.adapters.io import load_pretrained

    pages = kb_pages(kb_to_json(load_kb(args.kb))) if args.kb else None  # refused before the model loads
    model, tokenizer = load_pretrained(args.model, args.adapter)
    model.to(default_device())
    run_chat(Chat(model, tokenizer, system=args.system or None, pages=pages, top_k=args.top_k,
                  max_new_tokens=args.max_new_tokens))
    return 0

