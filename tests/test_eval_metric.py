"""`loraforge eval --metric`: the metric is chosen by the flag or the task, never by the file's content;
exact match compares whole stripped answers, numbers after '####' (issue 19, item 5)."""

import json

import pytest

from loraforge.cli import main
from loraforge.core.errors import LoraforgeError
from loraforge.demo.advising import write_datasets
from loraforge.testing import tiny_llama, tiny_tokenizer
from loraforge.training import evaluate
from loraforge.training.evaluate import check_metric, default_metric, exact_match, same_answer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalmetric")
    tiny_llama().save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    pc = [{"prompt": f"Capital number {i}?", "completion": f" City {i} "} for i in range(3)]
    (root / "pc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pc))
    gsm = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(3)]
    (root / "gsm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gsm))
    write_datasets(root / "demo", n_universities=2, per_fact=1)
    return root


def test_same_answer_whole_string_and_gsm_number():
    assert same_answer("  Paris \n", "Paris")
    assert not same_answer("Paris, France", "Paris")  # whole answer, not a substring
    assert not same_answer("paris", "Paris")
    assert same_answer("so the total is 1,200.", "600 + 600 = 1200\n#### 1200")
    assert not same_answer("1201", "#### 1200")


def test_exact_match_counts_prompt_completion_and_chat(folder, monkeypatch):
    # Replace generation by fixed answers so the score is known: 2 of 3 equal after stripping.
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: ["City 0", "City 1 ", "City 3"])
    assert exact_match(None, None, folder / "pc.jsonl") == {"exact_match": 2 / 3, "exact_match_n": 3}
    chat = folder / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": a}]} for a in ("x", "y", "z")]
    chat.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: ["x", "no", "z"])
    assert exact_match(None, None, chat)["exact_match"] == 2 / 3


def test_default_is_per_task_and_impossible_metrics_refused():
    assert default_metric("classification") == "accuracy" and default_metric("causal-lm") == "loss"
    for metric, task in (("accuracy", "causal-lm"), ("exact-match", "classification"), ("facts", "classification"),
                         ("bleu", "causal-lm")):
        with pytest.raises(LoraforgeError, match="metric"):
            check_metric(metric, task)


def _eval(folder, data, *flags):
    out = folder / "m.json"
    code = main(["eval", "--model", str(folder / "model"), "--data", str(data), "--max-new-tokens", "3",
                 "--json", str(out), *flags])
    return code, json.loads(out.read_text()) if code == 0 else None


def test_cli_metric_flag(folder, capsys):
    code, metrics = _eval(folder, folder / "gsm.jsonl")  # '####' in the file no longer switches exact match on
    assert code == 0 and set(metrics) == {"loss", "perplexity"} and metrics["perplexity"] > 1
    code, metrics = _eval(folder, folder / "pc.jsonl", "--metric", "exact-match")
    assert code == 0 and metrics["exact_match_n"] == 3 and 0 <= metrics["exact_match"] <= 1
    code, metrics = _eval(folder, folder / "demo" / "heldout.jsonl", "--metric", "facts", "--limit", "2")
    assert code == 0 and 0 <= metrics["fact_accuracy"] <= 1 and "loss" not in metrics
    assert _eval(folder, folder / "pc.jsonl", "--metric", "accuracy")[0] == 2
    assert _eval(folder, folder / "pc.jsonl", "--metric", "facts")[0] == 2  # not held-out questions: named error
    assert "Traceback" not in capsys.readouterr().err
