"""Trans-LoRA (loraforge/transfer): the spec's checks (../shared/methods/trans-lora.md) on tiny random
models: a Llama source with a LoRA trained on an offset task, a GPT-2 target (another family)."""

import dataclasses
import json
import os
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch

from loraforge.adapters.io import load_pretrained
from loraforge.cli import main
from loraforge.core.models import load_model
from loraforge.testing import tiny_bert, tiny_gpt2, tiny_llama, tiny_tokenizer
from loraforge.training.config import TrainConfig
from loraforge.training.data import from_records
from loraforge.training.evaluate import evaluate_dataset
from loraforge.training.loop import train
from loraforge.transfer.discriminator import accept, p_real
from loraforge.transfer.kit import DISCRIMINATOR, KIT_JSON, read_kit
from loraforge.transfer.pipeline import PrepareConfig, TransferConfig, label, prepare, transfer

QUICK = {"samples": 32, "steps": 20, "lr": 1e-2}  # a transfer run of ~1 s


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Models on disk, the real data (offset: n -> n + 9), a source adapter trained on it, and a kit."""
    root = tmp_path_factory.mktemp("transfer")
    tok = tiny_tokenizer()
    for name, model in (("source", tiny_llama(0)), ("target", tiny_gpt2(1)), ("encoder", tiny_bert(2))):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    numbers = random.Random(0).sample(range(1000), 40)
    real = root / "real.jsonl"
    real.write_text("".join(json.dumps({"messages": [{"role": "user", "content": str(n)},
                                                     {"role": "assistant", "content": str(n + 9)}]}) + "\n"
                            for n in numbers))
    train(TrainConfig(model=str(root / "source"), data=str(real), out=str(root / "source_run"), steps=30, lr=1e-2,
                      rank=4), progress=False)
    kit = prepare(PrepareConfig(adapter=str(root / "source_run" / "adapter"), data=str(real), out=str(root / "kit"),
                                model=str(root / "source"), disc_steps=30, lr=1e-2), progress=False)
    return {"root": root, "real": real, "kit": root / "kit", "kit_info": kit, "source": str(root / "source"),
            "target": str(root / "target"), "encoder": str(root / "encoder")}


def _run(setup, out, **settings):
    settings = {"target_model": setup["target"], **QUICK, **settings}
    return transfer(TransferConfig(kit=str(setup["kit"]), out=str(out), **settings), progress=False)


def _rows(out):
    return [json.loads(line) for line in (Path(out) / "synthetic.jsonl").read_text().splitlines()]


def test_kit_holds_seeds_discriminator_and_teacher(setup):
    kit, seeds = read_kit(setup["kit"])
    assert kit == setup["kit_info"] and len(seeds) == 5 and kit.source_model == setup["source"]
    real_inputs = {json.loads(line)["messages"][0]["content"] for line in setup["real"].read_text().splitlines()}
    assert {user for user, _ in seeds} <= real_inputs
    assert sorted(os.listdir(setup["kit"])) == ["discriminator", KIT_JSON, "seeds.jsonl", "source_adapter"]
    assert kit.n_real == 40 and kit.input_lines == 1


def test_discriminator_beats_chance_on_held_out(setup):
    # Spec check 3: real numbers vs the random source's synthetic strings are an easy separation.
    assert setup["kit_info"].discriminator_accuracy >= 0.7


def test_run_writes_adapter_synthetic_set_and_report(setup, tmp_path):
    report = _run(setup, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temp folder left beside it
    out = tmp_path / "out"
    assert {"adapter", "synthetic.jsonl", "candidates.jsonl", "report.json"} <= set(os.listdir(out))
    assert "checkpoint" not in os.listdir(out)
    assert json.loads((out / "report.json").read_text()) == report
    assert report["generated"] == 32 and 0 < report["accepted"] <= report["distinct"] <= 32
    assert report["acceptance_rate"] == report["accepted"] / report["generated"]
    assert report["discriminator_accuracy"] == setup["kit_info"].discriminator_accuracy
    assert report["seconds"] > 0 and set(report["stage_seconds"]) == {"synthesise", "score", "label", "train"}
    rows = _rows(out)
    assert len(rows) == report["labelled"] and all(row["p_real"] >= 0.5 for row in rows)
    candidates = [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]
    assert len(candidates) == report["distinct"] and sum(c["kept"] for c in candidates) == report["accepted"]
    assert all(c["kept"] == (c["p_real"] >= 0.5) for c in candidates)
    assert all([m["role"] for m in row["messages"]] == ["user", "assistant"] for row in rows)


def test_target_adapter_loads_in_peft(setup, tmp_path):
    from peft import PeftModel

    _run(setup, tmp_path / "out", target_method="lora")
    ours, tok = load_pretrained(setup["target"], tmp_path / "out" / "adapter")
    base, _ = load_model(setup["target"])
    theirs = PeftModel.from_pretrained(base, tmp_path / "out" / "adapter").eval()
    batch = tok(["123", "45"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch).logits, ours(**batch).logits, atol=1e-5, rtol=1e-5)


def test_any_target_method(setup, tmp_path):
    _run(setup, tmp_path / "out", target_method="dora")
    saved = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert saved["use_dora"] is True and saved["base_model_name_or_path"] == setup["target"]


def test_filter_is_monotone(setup, tmp_path):
    # Spec check 2 on a fixed pool: the scores of real seeds and synthetic strings alike.
    discriminator, tok = load_pretrained(setup["source"], setup["kit"] / DISCRIMINATOR)
    pool = [str(n) for n in range(0, 1000, 37)] + ["x!q", "%%", "a b c", "9z9", "..."]
    scores = p_real(discriminator, tok, pool)
    thresholds = [0.05, 0.2, 0.4, 0.5, 0.6, 0.8, 0.95]
    kept = [{text for text, keep in zip(pool, accept(scores, p)) if keep} for p in thresholds]
    assert all(high <= low for low, high in zip(kept, kept[1:])) and kept[0] != kept[-1]
    assert all(score >= p for p, texts in zip(thresholds, kept) for text, score in zip(pool, scores) if text in texts)
    # The whole pipeline: with one seed the candidate pool is the same, so a higher P keeps a subset.
    low, high = _run(setup, tmp_path / "low", threshold=0.3), _run(setup, tmp_path / "high", threshold=0.7)
    assert high["accepted"] <= low["accepted"]
    assert {r["messages"][0]["content"] for r in _rows(tmp_path / "high")} <= \
        {r["messages"][0]["content"] for r in _rows(tmp_path / "low")}


def test_no_filter_keeps_every_distinct_candidate(setup, tmp_path):
    report = _run(setup, tmp_path / "out", filter=False)
    assert report["accepted"] == report["distinct"]


def test_a_pool_is_reused_not_synthesised_again(setup, tmp_path, monkeypatch):
    import loraforge.transfer.pipeline as pipeline

    config = TransferConfig(kit=str(setup["kit"]), out=str(tmp_path / "filtered"), target_model=setup["target"], **QUICK)
    target, tok = load_model(setup["target"], task="causal-lm")
    pool = pipeline.candidate_pool(config, target, tok, progress=False)
    assert pool.generated == QUICK["samples"] and len(pool.texts) == len(pool.p_real) > 0
    monkeypatch.setattr(pipeline, "synthesize_inputs", lambda *a, **k: pytest.fail("the pool was synthesised again"))
    labelled, teacher = [], pipeline.label
    monkeypatch.setattr(pipeline, "label", lambda kit, kit_dir, inputs: labelled.append(inputs) or teacher(kit, kit_dir, inputs))
    filtered = transfer(config, progress=False, pool=pool)
    unfiltered = transfer(dataclasses.replace(config, out=str(tmp_path / "all"), filter=False),
                          progress=False, pool=pool)
    assert filtered["pool_reused"] and filtered["accepted"] == sum(p >= 0.5 for p in pool.p_real)
    assert unfiltered["accepted"] == len(pool.texts) and "synthesise" not in unfiltered["stage_seconds"]
    # the teacher labels each candidate once: the unfiltered run asks only for those the filter dropped
    kept = [text for text, p in zip(pool.texts, pool.p_real) if p >= 0.5]
    assert sorted(sum(labelled, [])) == sorted(pool.texts) and labelled[0] == kept
    answers = {row["messages"][-2]["content"]: row["messages"][-1]["content"] for row in _rows(tmp_path / "all")}
    assert all(answers[row["messages"][-2]["content"]] == row["messages"][-1]["content"]
               for row in _rows(tmp_path / "filtered"))


def test_teacher_labels_are_deterministic(setup):
    # Spec check 5: greedy decoding, identical answers on reruns.
    kit, _ = read_kit(setup["kit"])
    inputs = ["12", "345", "7", "abc"]
    first = label(kit, setup["kit"], inputs)
    assert first == label(kit, setup["kit"], inputs) and any(first)


def test_distillation_sanity(setup, tmp_path):
    # Spec check 1: with M_t = M_s, the student's loss on the synthetic set approaches the teacher's NLL. The
    # labels are the teacher's greedy decodes, its mode, so the student may go below that NLL: a one-sided bound.
    _run(setup, tmp_path / "out", target_model=setup["source"], filter=False, steps=60)
    rows = [{"messages": row["messages"]} for row in _rows(tmp_path / "out")]
    teacher, tok = load_pretrained(setup["source"], setup["kit"] / "source_adapter")
    student, _ = load_pretrained(setup["source"], tmp_path / "out" / "adapter")
    base, _ = load_model(setup["source"])
    data = from_records(rows, tok)
    teacher_nll, student_loss, base_loss = (evaluate_dataset(m, data, pad_id=tok.pad_token_id)["loss"]
                                            for m in (teacher, student, base))
    assert teacher_nll < base_loss
    assert student_loss - teacher_nll < 0.25 * (base_loss - teacher_nll), (teacher_nll, student_loss, base_loss)


def test_run_reads_no_data_but_the_kit(setup, tmp_path):
    # Spec check 4: every data-like file `transfer run` opens lies in the kit, the models or OUT's folder.
    opened: list[str] = []
    watching = [False]

    def hook(event, args):
        if watching[0] and event == "open" and isinstance(args[0], (str, os.PathLike)):
            opened.append(os.path.realpath(args[0]))

    sys.addaudithook(hook)  # hooks cannot be removed: this one records only while `watching`
    watching[0] = True
    try:
        _run(setup, tmp_path / "run" / "out")
    finally:
        watching[0] = False
    allowed = [os.path.realpath(p) for p in (setup["kit"], tmp_path / "run", setup["target"], setup["source"],
                                             sys.prefix, sys.base_prefix)]
    data_like = [p for p in opened if Path(p).suffix in (".jsonl", ".json", ".tsv", ".csv", ".txt", ".parquet")]
    assert any(p.startswith(os.path.realpath(setup["kit"])) for p in data_like)  # the hook does see opens
    assert os.path.realpath(setup["real"]) not in opened
    assert [p for p in data_like if not any(p.startswith(root + os.sep) for root in allowed)] == []


# Bad input: a clear error, exit 2, and nothing of OUT touched.

@pytest.fixture
def old_out(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous run")
    return out


def _fails(setup, out, *flags):
    """`loraforge transfer run` on the kit with `flags`; its exit status."""
    return main(["transfer", "run", "--kit", str(setup["kit"]), "--out", str(out), "--target-model", setup["target"],
                 "--samples", "8", "--steps", "2", *flags])


@pytest.mark.parametrize("threshold", ["0", "1", "1.5", "-0.1", "nan"])
def test_threshold_outside_the_unit_interval(setup, old_out, capsys, threshold):
    assert _fails(setup, old_out, "--threshold", threshold) == 2
    assert "--threshold is a probability in (0, 1)" in capsys.readouterr().err
    assert os.listdir(old_out.parent) == ["out"] and os.listdir(old_out) == ["keep.txt"]


def test_kit_for_another_task_form(setup, old_out, capsys, tmp_path):
    kit = tmp_path / "kit"
    shutil.copytree(setup["kit"], kit)
    meta = json.loads((kit / KIT_JSON).read_text())
    (kit / KIT_JSON).write_text(json.dumps({**meta, "form": "multi-turn"}))
    assert main(["transfer", "run", "--kit", str(kit), "--out", str(old_out), "--target-model", setup["target"]]) == 2
    assert "a kit for the task form 'multi-turn'" in capsys.readouterr().err
    (kit / KIT_JSON).write_text(json.dumps(meta))
    (kit / "seeds.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": "1"}, {"role": "assistant", "content": "10"},
        {"role": "user", "content": "2"}, {"role": "assistant", "content": "11"}]}) + "\n")
    assert main(["transfer", "run", "--kit", str(kit), "--out", str(old_out), "--target-model", setup["target"]]) == 2
    assert "single-turn" in capsys.readouterr().err
    assert os.listdir(old_out) == ["keep.txt"]


def test_target_that_cannot_generate(setup, old_out, capsys):
    assert _fails(setup, old_out, "--target-model", setup["encoder"]) == 2
    assert f"--target-model {setup['encoder']} cannot generate text" in capsys.readouterr().err
    assert os.listdir(old_out) == ["keep.txt"]


def test_empty_accepted_set(setup, old_out, capsys):
    assert _fails(setup, old_out, "--threshold", "0.999999") == 2
    assert "no candidate passed the filter" in capsys.readouterr().err
    assert os.listdir(old_out.parent) == ["out"] and os.listdir(old_out) == ["keep.txt"]


def test_prepare_refuses_multi_turn_data(setup, tmp_path, capsys):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"},
                                             {"role": "user", "content": "3"}, {"role": "assistant", "content": "4"}]}))
    code = main(["transfer", "prepare", "--model", setup["source"], "--adapter",
                 str(setup["root"] / "source_run" / "adapter"), "--data", str(data), "--out", str(tmp_path / "kit")])
    assert code == 2 and f"{data}:1: turns user/assistant/user/assistant" in capsys.readouterr().err
    assert not (tmp_path / "kit").exists()


def test_bench_transfer_reports_every_system(setup, tmp_path):
    from loraforge.transfer.bench import SYSTEMS, BenchTask, TransferBench, bench_transfer, plot, table

    rows = [json.loads(line) for line in setup["real"].read_text().splitlines()]
    settings = TransferBench(source_model=setup["source"], target_model=setup["target"], n_train=30, n_test=10,
                             steps=5, targets="all-linear", samples=16, disc_steps=5, json=str(tmp_path / "r.json"))
    result = bench_transfer(settings, [BenchTask("offset", rows[:30], rows[30:])])
    assert json.loads((tmp_path / "r.json").read_text()) == result
    (task,) = result["tasks"]
    assert task["task"] == "offset" and task["metric"] == "exact_match" and set(task["scores"]) == set(SYSTEMS)
    assert all(0 <= score <= 1 for score in task["scores"].values())
    assert task["generated"] == 16 and task["accepted"]["target + Trans-LoRA, no filter"] >= task["accepted"][
        "target + Trans-LoRA"]
    assert table(result).count("\n") == len(SYSTEMS) + 3
    plot(result, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_prepare_then_run(setup, tmp_path, capsys):
    # `loraforge transfer prepare | run` end to end: the kit, then OUT from it, each command's summary on stdout.
    adapter = str(setup["root"] / "source_run" / "adapter")
    assert main(["transfer", "prepare", "--model", setup["source"], "--adapter", adapter, "--data", str(setup["real"]),
                 "--seeds", "4", "--disc-steps", "10", "--out", str(tmp_path / "kit")]) == 0
    made = json.loads(capsys.readouterr().out)
    kit, seeds = read_kit(tmp_path / "kit")
    assert len(seeds) == 4 and made["discriminator_accuracy"] == kit.discriminator_accuracy
    assert main(["transfer", "run", "--kit", str(tmp_path / "kit"), "--target-model", setup["target"], "--out",
                 str(tmp_path / "out"), "--samples", "16", "--steps", "5", "--threshold", "0.3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary) == {"generated", "accepted", "acceptance_rate", "discriminator_accuracy", "seconds"}
    assert summary["generated"] == 16 and summary == {k: json.loads((tmp_path / "out" / "report.json").read_text())[k]
                                                      for k in summary}
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_continuation_gives_its_complete_items():
    from loraforge.transfer.synth import cut_candidates

    assert cut_candidates("12\nInput: 34\nInput: 5", 1, 4) == ["12", "34"]  # "5" may be cut short
    assert cut_candidates("12\nInput: 34\nInput: 56\nInput: 7", 1, 2) == ["12", "34"]
    assert cut_candidates(" 12 ", 1, 4) == ["12"]  # the first item, complete or not
    assert cut_candidates("a\nb\nc\nInput: d\nInput:", 2, 4) == ["a\nb", "d"]


def test_synthesis_runs_rounds_of_prompts_until_it_has_n(monkeypatch):
    from loraforge.transfer import synth

    calls = []

    def fake_complete(model, tokenizer, prompts, max_new_tokens, temperature, seed, progress=True):
        calls.append((len(prompts), seed))
        return ["1\nInput: 2\nInput: 3"] * len(prompts)  # two complete items a prompt

    class Chars:
        def encode(self, text, add_special_tokens=False):
            return list(text)

    monkeypatch.setattr(synth, "complete", fake_complete)
    got = synth.synthesize_inputs(None, Chars(), ["10", "20"], 10, 1, seed=3, per_prompt=4)
    assert got == ["1", "2"] * 5
    assert calls == [(3, 3), (3, 4)]  # 6 candidates at 2 a prompt; then 1.1 x 4 / 2 prompts; each round its own draws
    assert synth.token_budget(Chars(), ["10", "200"], 4) == 2 * 3 + 8 + 3 * (3 + 4)


def test_covering_seeds_add_the_most_new_words_each():
    """--seed-choice cover: each seed adds the most words the earlier ones lack, ties to the earlier row,
    so that a few seeds name every entity of the task; a bad choice is refused."""
    from loraforge.core.errors import LoraforgeError
    from loraforge.transfer.pipeline import covering

    pairs = [("Where is Alba College?", "In Rom."), ("Where is Alba College now?", "In Rom."),
             ("When does Bex Institute close?", "On 1 May."), ("Where is Alba College?", "Still in Rom.")]
    assert covering(pairs, 2) == [pairs[2], pairs[1]]  # 8 new words, then 7 (the earlier of two rows with 7)
    assert covering(pairs, 3)[2] == pairs[3]  # "still": the one word left
    with pytest.raises(LoraforgeError, match="--seed-choice is random or cover"):
        prepare(PrepareConfig(adapter="unused", data="unused", out="unused", seed_choice="all"))
