"""`loraforge bench intruders` on a tiny model: every variant measured, the sweep monotone, the
forgetting probes zero on the base, the paper's claims checked from the table."""

import json

import pytest
import torch

import loraforge as lf
from loraforge.analysis.report import EPSILONS
from loraforge.bench.intruders import ForgettingProbe, IntruderBench, findings, reproduce, spearman, write_section
from loraforge.testing import tiny_bert, tiny_llama, tiny_tokenizer

TOK = tiny_tokenizer()
QUESTIONS = [{"question": f"How many apples are {i} and {i + 1}?", "answer": f"{i} + {i + 1} = {2 * i + 1}\n#### {2 * i + 1}"}
             for i in range(12)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-intruders")
    tiny_llama().save_pretrained(root / "model")
    TOK.save_pretrained(root / "model")
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} + {i} = {2 * i}"}]} for i in range(48)]
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in QUESTIONS))
    return root


def bench(ws, **kw) -> IntruderBench:
    settings = dict(models=str(ws / "model"), data=str(ws / "chat.jsonl"), ranks="1,4", steps=3, batch_size=4,
                    lr=5e-3, full_lr=1e-3, dev_size=8, forget_data=str(ws / "gsm8k.jsonl"), out=str(ws / "runs"))
    return IntruderBench(**(settings | kw))


def test_every_variant_is_trained_analysed_and_mitigated(workspace):
    result = reproduce(bench(workspace), str(workspace / "model"))
    rows = {r["label"]: r for r in result["rows"]}
    assert list(rows) == ["base", "LoRA r=1", "LoRA r=4", "rsLoRA r=4", "full FT"]  # r = 1: one scale, one run
    assert rows["base"]["forgetting"] == 0.0
    assert rows["full FT"]["params"] == sum(p.numel() for p in tiny_llama().parameters())
    assert rows["LoRA r=4"]["params"] == 4 * rows["LoRA r=1"]["params"]
    for label, row in rows.items():
        if label == "base":
            continue
        counts = row["counts_by_epsilon"]
        assert counts == sorted(counts) and row["intruders"] == counts[EPSILONS.index(0.5)]
        assert ("mitigated_score" in row) == (row["method"] == "lora")
    body = write_section(bench(workspace), [result], "cmd", plot_dir=workspace)
    assert "| full FT |" in body and "Against the paper:" in body and list(workspace.glob("bench-intruders-*.png"))


def test_forgetting_probes_are_zero_on_the_base_and_move_with_the_weights():
    for model, task in ((tiny_llama(), "causal-lm"), (tiny_bert(), "classification")):
        probe = ForgettingProbe(model, TOK, task, QUESTIONS)
        assert probe(model) == 0.0
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        assert probe(model) != 0.0


def test_findings_say_held_or_not_from_the_rows():
    def row(label, method, rank, rslora, intruders, forgetting, score=0.8, mitigated=None):
        r = {"label": label, "method": method, "rank": rank, "rslora": rslora, "intruders": intruders,
             "forgetting": forgetting, "score": score}
        if method == "lora":
            r.update(mitigated_score=score - 0.01, mitigated_forgetting=mitigated)
        return r

    result = {"task": "classification", "metric": "dev accuracy", "rows": [
        {"label": "base", "method": "none"},
        row("LoRA r=1", "lora", 1, False, 9, 0.3, mitigated=0.2),
        row("rsLoRA r=8", "lora", 8, True, 4, 0.2, mitigated=0.1), row("rsLoRA r=64", "lora", 64, True, 1, 0.1, mitigated=0.05),
        row("full FT", "full", 1, False, 0, 0.05)]}
    lines = findings(result)
    assert all(line.endswith("held.") or "held (rho" in line for line in lines), lines
    assert "9 -> 4 -> 1" in lines[1]
    result["rows"][-1]["intruders"] = 20  # full FT with the most intruders: the first claim fails
    assert findings(result)[0].endswith("did not hold.")


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) == 0.0


@pytest.mark.parametrize("change, message", [
    (dict(ranks="0,4"), "--ranks must be positive"),
    (dict(ranks="a"), "comma-separated integers"),
    (dict(data=None), "no task for"),
])
def test_bad_settings_are_refused(workspace, change, message):
    with pytest.raises(lf.LoraforgeError, match=message):
        reproduce(bench(workspace, **change), str(workspace / "model"))


def test_forget_data_without_questions_is_refused(workspace, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(lf.LoraforgeError, match="'question' and 'answer'"):
        reproduce(bench(workspace, forget_data=str(tmp_path / "bad.jsonl")), str(workspace / "model"))


def test_the_default_forget_data_is_read_from_LORAFORGE_DATA(workspace, monkeypatch):
    for name in ("LORAFORGE_DATA", "LORAFORGE_SHARED_DATA"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(lf.LoraforgeError, match="pass --forget-data PATH or set LORAFORGE_DATA"):
        reproduce(bench(workspace, forget_data="gsm8k"), str(workspace / "model"))
    monkeypatch.setenv("LORAFORGE_DATA", str(workspace))  # no gsm8k/test.jsonl there
    with pytest.raises(lf.LoraforgeError, match="--forget-data: .*gsm8k/test.jsonl is not a file"):
        reproduce(bench(workspace, forget_data="gsm8k"), str(workspace / "model"))
