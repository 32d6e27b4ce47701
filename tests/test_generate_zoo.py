"""The adapter zoo: procedural families, index.json's schema, PEFT-format checkpoints, the loader's refusals."""

import dataclasses
import json
import shutil

import pytest

from loraforge.cli import main
from loraforge.core.errors import LoraforgeError
from loraforge.generate.families import LABEL_PAIRS, LABEL_PAIRS_HELD_OUT, make_task
from loraforge.generate.zoo import ZooConfig, build_zoo, load_zoo
from loraforge.testing import tiny_llama, tiny_tokenizer


@pytest.fixture
def tiny_model(tmp_path):
    folder = tmp_path / "tiny"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture
def sst2(tmp_path):
    folder = tmp_path / "data" / "sst2"
    folder.mkdir(parents=True)
    lines = ["sentence\tlabel"] + [f"sentence number {i} is {'fine' if i % 2 else 'dull'} \t{i % 2}" for i in range(60)]
    (folder / "train.tsv").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "data")


def test_offset_rows_are_the_issue_chat_form_and_train_test_disjoint():
    task = make_task("offset", "11")
    train, test = task.rows(50, 20)
    assert task.description == "Add 11 to the number."
    for row in train + test:
        user, answer = row["messages"]
        assert user["role"] == "user" and answer["role"] == "assistant" and len(row["messages"]) == 2
        assert user["content"].isdigit() and 0 <= int(user["content"]) <= 999
        assert answer["content"] == str(int(user["content"]) + 11)
    assert not {r["messages"][0]["content"] for r in train} & {r["messages"][0]["content"] for r in test}
    assert task.rows(50, 20) == (train, test)  # seeded by the task


def test_labels_rows_answer_with_the_pair_and_hold_out_sentences(sst2):
    assert len(LABEL_PAIRS) >= 12 and len(LABEL_PAIRS_HELD_OUT) >= 4
    assert not set(LABEL_PAIRS) & set(LABEL_PAIRS_HELD_OUT)
    train, test = make_task("labels", "yes/no").rows(20, 5, data=sst2)
    for row in train + test:
        sentence, word = (m["content"] for m in row["messages"])
        assert word == ("yes" if "fine" in sentence else "no")
    other_train, other_test = make_task("labels", "blue/red").rows(20, 5, data=sst2)
    test_sentences = {r["messages"][0]["content"] for r in test + other_test}
    assert not test_sentences & {r["messages"][0]["content"] for r in train + other_train}


def test_labels_needs_a_data_folder(monkeypatch):
    monkeypatch.delenv("LORAFORGE_DATA", raising=False)
    with pytest.raises(LoraforgeError, match="--data"):
        make_task("labels", "good/bad").rows(4, 2)
    with pytest.raises(LoraforgeError, match="first letter"):
        make_task("labels", "yes/yeah")


def test_zoo_build_writes_the_index_and_peft_checkpoints(tiny_model, tmp_path):
    config = ZooConfig(family="offset", values=["1", "3"], model=tiny_model, out=str(tmp_path / "zoo"), steps=2,
                       checkpoints=2, restart_steps=1, rank=2, batch_size=4, n_train=16, n_test=4)
    root = build_zoo(config, progress=False)
    index = json.loads((root / "index.json").read_text())
    assert index["model"] == tiny_model
    assert [t["id"] for t in index["tasks"]] == ["offset-1", "offset-3"]
    entry = index["tasks"][1]
    assert set(entry) == {"id", "family", "value", "description", "train", "test", "adapters", "final"}
    assert entry["description"] == "Add 3 to the number." and entry["final"] == entry["adapters"][-1]
    assert len(entry["adapters"]) == 2 and (root / entry["test"]).is_file()

    from peft import PeftModel  # the checkpoints are ordinary PEFT LoRA folders

    peft_model = PeftModel.from_pretrained(tiny_llama(), root / entry["adapters"][0])
    assert peft_model.peft_config["default"].r == 2
    zoo = load_zoo(root)
    assert zoo.rank == 2 and len(zoo.family("offset")) == 2
    assert [t.rsplit(".", 1)[1] for t in zoo.targets] == ["q_proj", "v_proj"] * 2  # resolved module paths
    # The restart moved the adapter: two different samples of the task.
    from safetensors.torch import load_file

    first, last = (load_file(str(root / a / "adapter_model.safetensors")) for a in entry["adapters"])
    assert any(not (first[k] == last[k]).all() for k in first)

    # A built task is kept: building again trains nothing and changes nothing.
    before = (root / "index.json").read_text()
    build_zoo(config, progress=False)
    assert (root / "index.json").read_text() == before

    # Growing the zoo with another recipe is refused, naming the field; nothing is trained or written.
    with pytest.raises(LoraforgeError, match=r"trained with steps=2, this build asks for steps=3"):
        build_zoo(dataclasses.replace(config, values=["5"], steps=3), progress=False)
    assert (root / "index.json").read_text() == before and not (root / "offset-5").exists()

    # An adapter of another rank is refused, by name, through the CLI with exit 2.
    other = tmp_path / "other"
    build_zoo(ZooConfig(family="offset", values=["5"], model=tiny_model, out=str(other), steps=1, checkpoints=1,
                        rank=4, batch_size=4, n_train=8, n_test=2), progress=False)
    bad = json.loads((other / "index.json").read_text())["tasks"][0]
    shutil.copytree(other / "offset-5", root / "offset-5")
    index["tasks"].append(bad)
    (root / "index.json").write_text(json.dumps(index))
    with pytest.raises(LoraforgeError, match=r"offset-5/ckpt-0/run/adapter has ranks"):
        load_zoo(root)


def test_zoo_build_cli(tiny_model, tmp_path, capsys):
    out = tmp_path / "zoo"
    assert main(["zoo", "build", "--family", "offset", "--values", "2", "--model", tiny_model, "--out", str(out),
                 "--steps", "1", "--checkpoints", "1", "--rank", "2", "--batch-size", "2", "--n-train", "4",
                 "--n-test", "2"]) == 0
    assert "1 tasks" in capsys.readouterr().out
    assert main(["zoo", "build", "--family", "offset", "--values", "x", "--out", str(out)]) == 2
