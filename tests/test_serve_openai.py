"""`loraforge serve` driven by the official `openai` Python client over HTTP, as users drive it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

import loraforge as lf  # noqa: E402
from loraforge.testing import tiny_llama, tiny_tokenizer  # noqa: E402

KEY = "sk-openai-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real command in its own process, on a free loopback port; stopped by its own pid."""
    root = tmp_path_factory.mktemp("openai")
    tiny_llama().save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    for name, seed in (("alpha", 1), ("beta", 2)):
        lf.save_adapter(lf.attach(tiny_llama(), lf.AdapterConfig(rank=4, init="random", seed=seed)), root / "adapters" / name)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "loraforge", "serve", "--model", str(root / "model"),
                             "--adapters", str(root / "adapters"), "--port", str(port), "--api-key", KEY],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    base_url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while True:
        try:
            openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=2).models.list()
            break
        except openai.APIConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"loraforge serve did not start: {proc.communicate()[1][-2000:]}")
            time.sleep(0.5)
    yield base_url
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0, timeout=60)


def test_models_lists_the_base_and_every_adapter(client, server):
    ids = [m.id for m in client.models.list()]
    assert ids[0].endswith("model") and set(ids[1:]) == {"alpha", "beta"}


def test_completions_and_their_stream_agree(client):
    kw = {"model": "alpha", "prompt": "Hello", "max_tokens": 8, "temperature": 0}
    full = client.completions.create(**kw)
    assert full.object == "text_completion" and full.usage.prompt_tokens == 5
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    other = client.completions.create(**{**kw, "model": "beta"})
    assert other.choices[0].text != full.choices[0].text  # the adapter named is the adapter used


def test_chat_and_its_stream_agree(client):
    kw = {"model": "beta", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0}
    full = client.chat.completions.create(**kw)
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content


def test_unknown_adapter_is_404_and_wrong_key_401(client, server):
    with pytest.raises(openai.NotFoundError, match="unknown adapter 'nope'"):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    wrong = openai.OpenAI(base_url=server, api_key="sk-wrong", max_retries=0, timeout=10)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}])
