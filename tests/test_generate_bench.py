"""`bench generate` end to end on a tiny model: every system scored on every held-out task, the JSON's keys."""

import dataclasses
import json

from loraforge.generate.bench import GENERATORS, GenerateBench, bench_generate, plot, summary_table
from loraforge.testing import tiny_llama, tiny_tokenizer

SYSTEMS = {"base", "oracle", "nearest", "zoo-average", "icm-lora", "sg-lora", "hypernet", "abmll", "multitask-lora",
           "few-shot", "sg-lora:random", "hypernet:random"}


def test_bench_generate_scores_every_system(tmp_path):
    data = tmp_path / "data" / "sst2"
    data.mkdir(parents=True)
    lines = ["sentence\tlabel"] + [f"it was {'nice' if i % 2 else 'poor'} {i}\t{i % 2}" for i in range(80)]
    (data / "train.tsv").write_text("\n".join(lines) + "\n")
    model = tmp_path / "tiny"
    tiny_llama().save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    bench = GenerateBench(model=str(model), out=str(tmp_path / "out"), json=str(tmp_path / "out.json"),
                          data=str(tmp_path / "data"),
                          offset_values="1,3", offset_held_out="2", label_pairs="good/bad,yes/no",
                          label_held_out="up/down", steps=1, checkpoints=1, rank=2, n_train=16, n_test=4, cvae_steps=2,
                          channels="4,4,4,4,4,4,4,4,4,4,4,4", hypernet_steps=2, meta_steps=1, examples=4, few_shot=2)
    result = bench_generate(bench, progress=False)
    assert json.loads((tmp_path / "out.json").read_text()) == json.loads(json.dumps(result))
    assert [(t["family"], t["value"]) for t in result["tasks"]] == [("offset", "2"), ("labels", "up/down")]
    offset, labels = result["tasks"]
    assert set(offset["scores"]) == set(labels["scores"]) == SYSTEMS
    assert all(set(s) == {"exact_match"} and 0 <= s["exact_match"] <= 1 for s in offset["scores"].values())
    assert all(set(s) == {"accuracy", "ece"} for s in labels["scores"].values())
    assert offset["cosine_to_oracle"]["nearest"] > -1.0001
    assert {*GENERATORS, "abmll", "zoo_bytes"} <= set(result["generators"])
    assert all((tmp_path / "out" / "generators" / kind / "generator.json").is_file() for kind in GENERATORS)
    table = summary_table(result)
    assert "| offset 2 |" in table and "| labels up/down |" in table and "| hypernet |" in table
    fig = plot(result)  # a row per system; offset's panel shows its task, the cosine panel both
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == list(offset["scores"])
    assert [len(ax.collections) for ax in fig.axes] == [1, 1, 1, 2]
    # A second run (a killed run resumed) reuses the zoo, the oracles, the multi-task LoRAs, the generators
    # and the prior, and reports their recorded seconds; a changed setting retrains that stage alone.
    index = (tmp_path / "out" / "zoo" / "index.json").read_text()
    records = {kind: (tmp_path / "out" / "generators" / kind / "generator.json").read_text() for kind in GENERATORS}
    again = bench_generate(bench, progress=False)
    assert (tmp_path / "out" / "zoo" / "index.json").read_text() == index
    assert again["generators"] == result["generators"]
    assert again["adapt_seconds"]["oracle"] == result["adapt_seconds"]["oracle"] > 0
    changed = bench_generate(dataclasses.replace(bench, hypernet_steps=3), progress=False)
    assert (tmp_path / "out" / "generators" / "hypernet" / "generator.json").read_text() != records["hypernet"]
    assert all((tmp_path / "out" / "generators" / kind / "generator.json").read_text() == records[kind]
               for kind in ("icm-lora", "sg-lora"))
    assert changed["generators"]["abmll"] == result["generators"]["abmll"]


def test_quick_caps_the_budget_and_keeps_what_was_asked_for():
    from loraforge.generate.bench import QUICK_CHANNELS

    quick = GenerateBench(quick=True).resolved()
    assert (quick.steps, quick.checkpoints, quick.cvae_steps, quick.cvae_batch) == (40, 2, 120, 8)
    assert (quick.hypernet_steps, quick.meta_steps) == (60, 12)
    assert quick.channels == ",".join(map(str, QUICK_CHANNELS))  # the reference's widths are too slow for --quick
    assert GenerateBench(quick=True, channels="4,4", cvae_steps=50).resolved().channels == "4,4"  # given: kept
    assert GenerateBench(quick=True, cvae_steps=50).resolved().cvae_steps == 50
    assert GenerateBench().resolved() == GenerateBench()  # the full run is not capped


def test_support_holds_each_answer_equally_and_distinct_answers_otherwise():
    import random

    from loraforge.generate.bench import _support

    def rows(answers):
        return [{"messages": [{"role": "user", "content": str(i)}, {"role": "assistant", "content": a}]}
                for i, a in enumerate(answers)]

    skewed = rows(["red"] * 30 + ["blue"] * 6)  # a random 8 of these would hold about 7 reds
    labels = [r["messages"][-1]["content"] for r in _support(skewed, 8, random.Random(0))]
    assert sorted(labels) == ["blue"] * 4 + ["red"] * 4
    scarce = rows(["red"] * 30 + ["blue"] * 2)  # too few blues: the rest are reds, still 8 rows
    assert sorted(r["messages"][-1]["content"] for r in _support(scarce, 8, random.Random(0))) == ["blue"] * 2 + ["red"] * 6
    offsets = _support(rows([str(i + 7) for i in range(50)]), 8, random.Random(1))
    assert len({r["messages"][-1]["content"] for r in offsets}) == 8
    assert len(_support(rows(["a", "b"]), 8, random.Random(0))) == 2  # fewer rows than asked: all of them
    assert _support(skewed, 8, random.Random(3)) == _support(skewed, 8, random.Random(3))  # seeded
