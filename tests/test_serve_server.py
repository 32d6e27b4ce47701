"""The OpenAI-compatible server: endpoints, API key, and bad input that must not touch other requests."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import loraforge as lf  # noqa: E402
from loraforge.serve import Engine, SamplingParams  # noqa: E402
from loraforge.serve.server import create_app  # noqa: E402
from loraforge.testing import tiny_llama, tiny_tokenizer  # noqa: E402

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    for name, rank, seed in [("alpha", 4, 1), ("beta", 8, 2)]:
        model = tiny_llama()
        lf.attach(model, lf.AdapterConfig(rank=rank, init="random", seed=seed))
        lf.save_adapter(model, root / name)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    lf.attach(other, lf.AdapterConfig(rank=4, init="random", seed=3))
    lf.save_adapter(other, root / "other-base")
    lf.save_adapter(lf.attach(tiny_llama(), lf.AdapterConfig(method="full")), root / "full")
    return root


@pytest.fixture(scope="module")
def served(adapters_dir):
    engine = Engine(tiny_llama(), tiny_tokenizer(), adapters_dir=adapters_dir, max_loaded=2, block_size=4,
                    model_name="tiny")
    with TestClient(create_app(engine, api_key=KEY, max_body_bytes=16384)) as client:
        yield engine, client


def post(client, path, body, **kw):
    return client.post(path, json=body, headers=AUTH, **kw)


def test_models_lists_base_and_adapters(served):
    _, client = served
    ids = [m["id"] for m in client.get("/v1/models", headers=AUTH).json()["data"]]
    assert ids[0] == "tiny" and {"alpha", "beta", "full", "other-base"} <= set(ids)


def test_completion_stream_equals_completion_and_engine(served):
    engine, client = served
    body = {"model": "alpha", "prompt": "Hello", "max_tokens": 8, "temperature": 0}
    full = post(client, "/v1/completions", body).json()
    assert full["object"] == "text_completion" and full["usage"]["prompt_tokens"] == 5
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}, headers=AUTH) as resp:
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == full["choices"][0]["text"]
    assert chunks[-1]["finish_reason"] == full["choices"][0]["finish_reason"]
    chat = post(client, "/v1/chat/completions", {"model": "beta", "messages": [{"role": "user", "content": "hi"}],
                                                  "max_tokens": 4, "temperature": 0}).json()
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    assert post(client, "/v1/completions", {**body, "model": "tiny"}).status_code == 200  # the base itself


@pytest.mark.parametrize("path, body, status, needle", [
    ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "'nope'"),
    ("/v1/completions", {"model": "other-base", "prompt": "hi"}, 400, "model.layers.0.mlp.down_proj.lora_B.weight"),
    ("/v1/completions", {"model": "full", "prompt": "hi"}, 400, "retrains the base itself"),
    ("/v1/completions", {"model": "alpha", "prompt": "x" * 300}, 400, "context holds 256"),
    ("/v1/completions", {"model": "alpha", "prompt": "hi", "top_p": 2}, 400, "top_p"),
    ("/v1/completions", {"model": "alpha"}, 422, "prompt"),
    ("/v1/completions", {"model": "alpha", "prompt": "x" * 20000}, 413, "larger than 16384"),
    ("/v1/load_lora_adapter", {"lora_name": "up", "lora_path": "../elsewhere"}, 400, "outside the adapters folder"),
    ("/v1/load_lora_adapter", {"lora_name": "up", "lora_path": "/etc"}, 400, "outside the adapters folder"),
    ("/v1/load_lora_adapter", {"lora_name": "../x", "lora_path": "alpha"}, 400, "bad adapter name"),
    ("/v1/load_lora_adapter", {"lora_name": "ob", "lora_path": "other-base"}, 400, "down_proj.lora_B.weight"),
    ("/v1/unload_lora_adapter", {"lora_name": "nope"}, 404, "'nope'"),
])
def test_bad_input_gets_a_clear_error(served, path, body, status, needle):
    engine, client = served
    resp = post(client, path, body)
    assert resp.status_code == status and needle in resp.json()["error"]["message"], resp.text
    assert client.get("/health", headers=AUTH).status_code == 200


def test_malformed_json_and_api_key(served):
    _, client = served
    resp = client.post("/v1/completions", content=b"{not json", headers={**AUTH, "Content-Type": "application/json"})
    assert resp.status_code == 400 and "not valid JSON" in resp.json()["error"]["message"]
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_load_and_unload_an_adapter(served):
    _, client = served
    assert post(client, "/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": "beta"}).status_code == 200
    assert post(client, "/v1/completions", {"model": "gamma", "prompt": "hi", "max_tokens": 2}).status_code == 200
    assert post(client, "/v1/unload_lora_adapter", {"lora_name": "gamma"}).status_code == 200
    assert post(client, "/v1/completions", {"model": "gamma", "prompt": "hi"}).status_code == 404
    metrics = client.get("/metrics", headers=AUTH).text
    assert "loraforge_pool_misses_total" in metrics and "loraforge_running_batch_size 0" in metrics


def test_client_disconnect_mid_stream_frees_slot_and_blocks(served):
    engine, client = served
    app = client.app
    body = json.dumps({"model": "alpha", "prompt": "Hello", "max_tokens": 250, "stream": True,
                       "temperature": 0, "ignore_eos": True}).encode()
    sent, aborted = [], []
    real_abort = engine.abort
    engine.abort = lambda req: aborted.append(req) or real_abort(req)

    async def talk() -> None:
        first_chunk = asyncio.Event()
        messages = iter([{"type": "http.request", "body": body, "more_body": False}])

        async def receive() -> dict:
            message = next(messages, None)
            if message is not None:
                return message
            await first_chunk.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and message.get("body"):
                first_chunk.set()

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
                 "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
                 "headers": [(b"content-type", b"application/json"), (b"authorization", AUTH["Authorization"].encode()),
                             (b"content-length", str(len(body)).encode())]}
        await asyncio.wait_for(app(scope, receive, send), timeout=30)

    asyncio.run(talk())
    engine.abort = real_abort
    deadline = time.monotonic() + 10
    while engine.has_work() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sent[0]["status"] == 200 and aborted and aborted[0].finish_reason == "abort"
    assert len(aborted[0].output_ids) < 250
    assert not engine.running and engine.kv.free_blocks == engine.kv.num_blocks
    assert not any(engine.pool.refs.values())


def _idle(engine, timeout: float = 10.0) -> bool:
    """The engine drained: no request, every KV block free, no adapter reference held."""
    deadline = time.monotonic() + timeout
    while engine.has_work() and time.monotonic() < deadline:
        time.sleep(0.01)
    return (not engine.has_work() and engine.kv.free_blocks == engine.kv.num_blocks
            and not any(engine.pool.refs.values()))


@pytest.mark.parametrize("path, raw, status, needle", [
    ("/v1/completions", b"[" * 3000 + b"]" * 3000, 400, "nested too deeply"),
    ("/v1/completions", b'{"model": "alpha", "prompt": "hi", "x": ' + b"[" * 1800 + b"]" * 1800 + b"}", 400,
     "nested too deeply"),
    ("/v1/completions", b'{"model": "alpha", "prompt": "\xff\xfe hi"}', 400, "not valid UTF-8"),
    ("/v1/completions", b'{"model": "alpha", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", 400,
     "not valid JSON"),
    ("/v1/completions", b'{"model": "alpha", "prompt": "\\ud800 hi"}', 400, "lone surrogate"),
    ("/v1/chat/completions", b'{"model": "alpha", "messages": [{"role": "user", "content": "\\udfff"}]}', 400,
     "lone surrogate"),
    ("/v1/completions", b'{"model": "alpha", "prompt": "hi", "seed": 1e400}', 422, "seed"),
    ("/v1/completions", b'{"model": "alpha", "prompt": "hi", "seed": 100000000000000000000000000}', 400, "seed must"),
    ("/v1/completions", b'{"model": "alpha", "prompt": "hi", "max_tokens": -3}', 400, "max_tokens"),
    ("/v1/completions", b'{"model": "alpha", "prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ("/v1/completions", b'{"model": "alpha", "prompt": "hi", "stream": [1]}', 422, "body.stream"),
    ("/v1/completions", b'{"model": ["alpha"], "prompt": "hi"}', 422, "body.model"),
    ("/v1/completions", b"[]", 422, "dictionary"),
    ("/v1/load_lora_adapter", b'{"lora_name": "x", "lora_path": "alpha\\u0000"}', 400, "null byte"),
    ("/v1/load_lora_adapter", b'{"lora_name": "x", "lora_path": "' + b"a" * 3000 + b'"}', 400, "cannot be read"),
    ("/v1/load_lora_adapter", b'{"lora_name": "x", "lora_path": "alpha/../../.."}', 400, "outside the adapters"),
    ("/v1/nowhere", b"{}", 404, "Not Found"),
])
def test_hostile_body_gets_a_4xx_and_leaves_the_engine_idle(served, path, raw, status, needle):
    engine, client = served
    resp = client.post(path, content=raw, headers={**AUTH, "Content-Type": "application/json"})
    assert resp.status_code == status and needle in resp.json()["error"]["message"], resp.text
    assert _idle(engine)


def test_huge_max_tokens_is_refused_and_the_context_is_still_usable(served):
    engine, client = served
    body = {"model": "alpha", "prompt": "Hello", "max_tokens": 10 ** 30, "ignore_eos": True, "temperature": 0}
    resp = post(client, "/v1/completions", body)
    assert resp.status_code == 400 and "exceed the context of 256" in resp.json()["error"]["message"]
    full = post(client, "/v1/completions", {**body, "max_tokens": 251}).json()  # 5 prompt tokens: the whole context
    assert full["choices"][0]["finish_reason"] == "length" and full["usage"]["total_tokens"] == 256
    assert _idle(engine)


def test_unload_while_a_request_runs_on_the_adapter_is_a_conflict(served):
    engine, client = served
    assert post(client, "/v1/load_lora_adapter", {"lora_name": "busy", "lora_path": "alpha"}).status_code == 200
    params = SamplingParams(max_tokens=250, temperature=0, ignore_eos=True)
    req = engine.add_request("Hello", "busy", params)
    deadline = time.monotonic() + 10
    while req not in engine.running and time.monotonic() < deadline:
        time.sleep(0.005)
    for path, body in [("/v1/unload_lora_adapter", {"lora_name": "busy"}),
                       ("/v1/load_lora_adapter", {"lora_name": "busy", "lora_path": "beta"})]:
        resp = post(client, path, body)
        assert resp.status_code == 409 and "in use" in resp.json()["error"]["message"]
    engine.abort(req)
    assert req.done.wait(10) and _idle(engine)
    assert post(client, "/v1/unload_lora_adapter", {"lora_name": "busy"}).status_code == 200
    assert post(client, "/v1/completions", {"model": "busy", "prompt": "hi"}).status_code == 404
