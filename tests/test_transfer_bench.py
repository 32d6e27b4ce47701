"""`loraforge bench transfer` (loraforge/bench/transfer.py): the CLI wiring on tiny random models, the offset
task of the generate families and the advisor from a `loraforge demo`-shaped folder."""

import json
import shutil

import pytest

from loraforge.cli import main
from loraforge.demo import SYSTEM
from loraforge.demo.advising import write_datasets
from loraforge.testing import tiny_llama, tiny_tokenizer
from loraforge.training.config import TrainConfig
from loraforge.training.loop import train
from loraforge.transfer.bench import SYSTEMS

SMALL = ["--n-train", "30", "--n-test", "8", "--steps", "3", "--samples", "12", "--disc-steps", "3",
         "--targets", "all-linear", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-transfer")
    tok = tiny_tokenizer()
    for name, seed in (("source", 0), ("target", 1)):
        tiny_llama(seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def _bench(models, *flags):
    return main(["bench", "transfer", "--source-model", str(models / "source"), "--target-model",
                 str(models / "target"), *SMALL, *flags])


def test_quick_runs_offset_and_reports(models, tmp_path, capsys):
    report = tmp_path / "docs" / "benchmarks.md"
    assert _bench(models, "--quick", "--offset", "11", "--json", str(tmp_path / "r.json"), "--report", str(report),
                  "--work", str(tmp_path / "work"), "--disc-real", "20") == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert [t["task"] for t in result["tasks"]] == ["offset-11"]
    (task,) = result["tasks"]
    assert set(task["scores"]) == set(SYSTEMS) and task["metric"] == "exact_match"
    runs = tmp_path / "work" / "offset-11"  # --work keeps the runs; one candidate pool serves both transfers
    assert (runs / "kit" / "kit.json").is_file() and (runs / "filtered" / "candidates.jsonl").is_file()
    assert json.loads((runs / "kit" / "kit.json").read_text())["n_real"] == 20  # --disc-real reaches the kit
    assert (runs / "filtered" / "candidates.jsonl").read_text().replace("true", "?").replace("false", "?") == \
        (runs / "unfiltered" / "candidates.jsonl").read_text().replace("true", "?").replace("false", "?")
    assert "offset-11: Trans-LoRA" in capsys.readouterr().out
    text = report.read_text()
    assert "bench transfer --quick" in text and "| target + Trans-LoRA |" in text
    (png,) = (report.parent).glob("transfer-*.png")
    assert f"![]({png.name})" in text


def test_full_moves_the_demo_advisor(models, tmp_path):
    demo = tmp_path / "demo"
    paths = write_datasets(demo / "data", seed=0, n_universities=2, system=SYSTEM, per_fact=1)
    train(TrainConfig(model=str(models / "source"), data=str(paths["phase1"]), out=str(tmp_path / "run"), steps=3,
                      rank=4, lr=1e-2), progress=False)
    shutil.copytree(tmp_path / "run" / "adapter", demo / "adapter")
    recipe = {"rag": False, "rank": 2, "alpha": 4.0, "targets": "q_proj", "batch_size": 4}
    (demo / "results.json").write_text(json.dumps({"settings": recipe}))
    assert _bench(models, "--demo", str(demo), "--json", str(tmp_path / "r.json"), "--advisor-steps", "2",
                  "--advisor-samples", "10", "--advisor-seeds", "3", "--advisor-disc-real", "6", "--work", str(tmp_path / "work")) == 0
    offset, advisor = json.loads((tmp_path / "r.json").read_text())["tasks"]
    # the advisor's adapters take the demo's recipe and their own budget; offset keeps the bench's
    assert advisor["settings"] == {"steps": 2, "samples": 10, "seeds": 3, "seed_choice": "cover", "disc_real": 6, "rank": 2,
                                   "alpha": 4.0, "targets": "q_proj", "batch_size": 4} and offset["settings"] == {}
    upper = json.loads((tmp_path / "work" / "advisor" / "upper" / "adapter" / "adapter_config.json").read_text())
    assert json.loads((tmp_path / "work" / "advisor" / "kit" / "kit.json").read_text())["n_real"] == 6
    assert upper["r"] == 2 and all(m.endswith("q_proj") for m in upper["target_modules"])
    assert offset["task"] == "offset-9" and advisor["task"] == "advisor" and advisor["metric"] == "fact_accuracy"
    assert all(set(values) == {"fact_accuracy", "markdown_rate"} for values in advisor["details"].values())
    assert set(advisor["scores"]) == set(SYSTEMS)
    assert "train source" in offset["seconds"] and "train source" not in advisor["seconds"]  # the demo's adapter


def test_missing_demo_is_a_clear_error(models, tmp_path, capsys):
    assert _bench(models, "--demo", str(tmp_path / "nowhere")) == 2
    err = capsys.readouterr().err
    assert "adapter" in err and "loraforge demo --no-rag --out" in err


def test_unknown_tasks_are_refused(models, capsys):
    assert _bench(models, "--tasks", "offset,poetry") == 2
    assert "--tasks takes offset and advisor" in capsys.readouterr().err


def test_a_retrieval_demo_is_refused(models, tmp_path, capsys):
    demo = tmp_path / "demo"
    for name in ("adapter/adapter_config.json", "data/phase1.jsonl", "data/heldout.jsonl"):
        (demo / name).parent.mkdir(parents=True, exist_ok=True)
        (demo / name).write_text("{}\n")
    (demo / "results.json").write_text(json.dumps({"settings": {"rag": True}}))
    assert _bench(models, "--demo", str(demo)) == 2
    assert "is a retrieval run" in capsys.readouterr().err
