"""`loraforge serve --kb FILE.json`: retrieval on the server, so any OpenAI client gets the grounded
advisor. The last user message of each /v1/chat/completions request goes to the model behind the
BM25 top-k pages of the knowledge base, in the layout `loraforge demo` trains on and `loraforge
chat` sends (`training.retrieval.with_pages`).

It wraps the app as ASGI middleware that rewrites the request body, so the server itself does not
change: requests it refuses (bad JSON, too large, no messages) pass through untouched and are
refused as before.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loraforge.core.errors import LoraforgeError
from loraforge.training.retrieval import BM25, kb_pages, with_pages

CHAT_PATH = "/v1/chat/completions"


def load_pages(path: str | Path) -> list[str]:
    """The university pages of a knowledge base in the `loraforge demo --kb` schema."""
    try:
        return kb_pages(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise LoraforgeError(f"{path}: not a knowledge base in the `loraforge demo --kb` schema "
                             f"(loraforge/demo/kb_file.py): {type(e).__name__}: {e}") from None


def ground(messages: list[dict[str, Any]], retriever: BM25, pages: list[str], top_k: int) -> list[dict[str, Any]]:
    """`messages` with the last user message behind the pages it retrieves; the rest untouched."""
    last = max((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"
                and isinstance(m.get("content"), str)), default=None)
    if last is None:
        return messages
    question = messages[last]["content"]
    grounded = dict(messages[last], content=with_pages(question, [pages[i] for i in retriever.search(question, top_k)]))
    return messages[:last] + [grounded] + messages[last + 1:]


class Grounding:
    """ASGI middleware: rewrites POST /v1/chat/completions bodies through `ground`."""

    def __init__(self, app: Any, pages: list[str], top_k: int = 2):
        self.app, self.pages, self.top_k = app, pages, top_k
        self.retriever = BM25(pages)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != CHAT_PATH:
            return await self.app(scope, receive, send)
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        body = b"".join(chunks)
        try:
            data = json.loads(body)
            if isinstance(data, dict) and isinstance(data.get("messages"), list):
                data["messages"] = ground(data["messages"], self.retriever, self.pages, self.top_k)
                body = json.dumps(data).encode()
        except ValueError:
            pass  # the server answers malformed JSON with its own error
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        scope = dict(scope, headers=headers + [(b"content-length", str(len(body)).encode())])
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)
