"""`serve --kb`: the last user message of a chat request goes to the model behind its retrieved pages."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from loraforge.core.errors import LoraforgeError  # noqa: E402
from loraforge.demo.advising import build_knowledge_base  # noqa: E402
from loraforge.demo.kb_file import write_kb  # noqa: E402
from loraforge.serve import Engine  # noqa: E402
from loraforge.serve.grounding import Grounding, load_pages  # noqa: E402
from loraforge.serve.server import create_app  # noqa: E402
from loraforge.testing import tiny_llama, tiny_tokenizer  # noqa: E402

KB = build_knowledge_base(0, n_universities=4)


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    return load_pages(write_kb(KB, tmp_path_factory.mktemp("kb") / "kb.json"))


def echo_app() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    @app.post("/v1/completions")
    async def echo(request: Request) -> dict:
        return {"received": json.loads(await request.body())}

    return app


def test_last_user_message_is_grounded_and_the_rest_untouched(pages):
    client = TestClient(Grounding(echo_app(), pages, top_k=1))
    question = f"What does {KB.universities[3].name} charge?"
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": question}]
    got = client.post("/v1/chat/completions", json={"model": "m", "messages": messages}).json()["received"]
    assert got["messages"][:3] == messages[:3]
    assert got["messages"][3]["content"] == f"Knowledge base:\n\n{pages[3]}\n\nQuestion: {question}"
    plain = {"model": "m", "prompt": question}
    assert client.post("/v1/completions", json=plain).json()["received"] == plain


def test_grounded_chat_completion_on_the_real_server():
    # Short pages: the tiny model's context is too small for a whole university page.
    short = ["## Alba College\n- Tuition: €9,800 per year", "## Brin Academy\n- Tuition: €5,100 per year"]
    request = {"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": "Alba tuition?"}]}
    engine = Engine(tiny_llama(), tiny_tokenizer(), max_loaded=1, block_size=4, model_name="tiny")
    with TestClient(create_app(engine)) as client:
        bare = client.post("/v1/chat/completions", json=request).json()["usage"]["prompt_tokens"]
    engine = Engine(tiny_llama(), tiny_tokenizer(), max_loaded=1, block_size=4, model_name="tiny")
    with TestClient(Grounding(create_app(engine), short, top_k=1)) as client:
        reply = client.post("/v1/chat/completions", json=request)
        assert reply.status_code == 200 and reply.json()["usage"]["prompt_tokens"] > bare + 10  # the page went in
        assert client.post("/v1/chat/completions", content=b"{not json").status_code in (400, 422)


def test_a_file_not_in_the_schema_is_refused(tmp_path):
    (tmp_path / "kb.json").write_text(json.dumps({"universities": []}))
    with pytest.raises(LoraforgeError, match="not a knowledge base.*KeyError: 'countries'"):
        load_pages(tmp_path / "kb.json")
