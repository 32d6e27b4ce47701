"""`loraforge chat`: streamed replies, history, /reset, /quit, retrieval over --kb; driven in a pseudo-terminal."""

import io
import os
import pty
import select
import subprocess
import sys
import time

import pytest

from loraforge.demo.advising import build_knowledge_base
from loraforge.demo.chat import Chat
from loraforge.demo.kb_file import kb_to_json, write_kb
from loraforge.testing import tiny_llama, tiny_tokenizer
from loraforge.training.retrieval import kb_pages


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    tiny_llama().save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    write_kb(build_knowledge_base(0, n_universities=4), root / "kb.json")
    return root


def test_reply_streams_what_it_returns_and_keeps_the_bare_question():
    kb = build_knowledge_base(0, n_universities=4)
    pages = kb_pages(kb_to_json(kb))
    stream = io.StringIO()
    chat = Chat(tiny_llama(), tiny_tokenizer(), pages=pages, top_k=1, max_new_tokens=6, stream=stream)
    question = f"When is the deadline of {kb.universities[2].name}?"
    assert chat.messages(question)[-1]["content"].startswith("Knowledge base:\n\n" + pages[2])
    answer = chat.reply(question)
    assert stream.getvalue().strip() == answer
    assert chat.history == [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    assert [m["role"] for m in chat.messages("and its fees?")] == ["system", "user", "assistant", "user"]
    chat.reset()
    assert chat.history == []


def read_until(fd: int, marker: str, seen: list[str], timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while marker not in "".join(seen):
        assert time.monotonic() < deadline, f"no {marker!r} in {''.join(seen)!r}"
        if select.select([fd], [], [], 1.0)[0]:
            seen.append(os.read(fd, 4096).decode(errors="replace"))
    text = "".join(seen)
    seen[:] = [text[text.index(marker) + len(marker):]]
    return text


def test_chat_in_a_pseudo_terminal(workspace):
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "loraforge.cli", "chat", "--model", str(workspace / "model"),
                             "--kb", str(workspace / "kb.json"), "--max-new-tokens", "4"],
                            stdin=follower, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    seen: list[str] = []
    try:
        read_until(leader, "you> ", seen)
        os.write(leader, b"What is the tuition at the first university?\n")
        assert "advisor> " in read_until(leader, "you> ", seen)
        os.write(leader, b"/reset\n")
        assert "(conversation reset)" in read_until(leader, "you> ", seen)
        os.write(leader, b"/quit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(leader)
