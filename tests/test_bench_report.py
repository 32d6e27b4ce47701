"""Where `loraforge bench` writes and reads: a report only where --report says, data only from --data or
$LORAFORGE_DATA. `bench methods` with its training runs faked is the cheapest benchmark to drive end to end."""

import dataclasses
import json
import re

import pytest

import loraforge as lf
from loraforge.bench.methods import BenchRun, load_rows
from loraforge.cli import main
from loraforge.training.data import data_path

RESULT = {"method": "lora", "init": "default", "rule": "adamw", "lr": 2e-3, "trainable_params": 1234, "step_s": 0.1,
          "peak_rss_mb": 10.0, "init_s": 0.01, "first_loss": 0.7, "final_loss": 0.5, "dev_loss": 0.6,
          "dev_accuracy": 0.75, "losses": [0.7, 0.6, 0.5], "selection": None}


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A working directory with a small SST-2-like table, no data folder in the environment, and each
    `bench methods` run (a process of its own) answering RESULT at once."""
    from loraforge.bench import methods

    monkeypatch.chdir(tmp_path)
    for name in ("LORAFORGE_DATA", "LORAFORGE_SHARED_DATA"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"line {i}\t{i % 2}\n" for i in range(8)))
    done = type("Done", (), {"returncode": 0, "stdout": json.dumps(RESULT) + "\n"})()
    monkeypatch.setattr(methods.subprocess, "run", lambda *args, **kw: done)
    return tmp_path


def bench_methods(*flags: str) -> int:
    return main(["bench", "methods", "--methods", "lora", "--steps", "3", "--out", "runs", *flags])


def test_without_report_the_table_is_printed_and_no_file_written(project, capsys):
    assert bench_methods("--data", "sst2/train.tsv") == 0
    assert "| lora | default | adamw |" in capsys.readouterr().out
    assert not (project / "docs").exists() and not list(project.glob("*.png"))


def test_report_appends_a_section_with_its_figure_beside_it(project):
    report = project / "docs" / "benchmarks.md"
    report.parent.mkdir()
    report.write_text("# Benchmarks\n\nEvery table below comes from the command shown above it.\n\n## old (2026)\n\nkept\n")
    assert bench_methods("--data", "sst2/train.tsv", "--report", str(report)) == 0
    assert bench_methods("--data", "sst2/train.tsv", "--report") == 0  # alone: docs/benchmarks.md of this project
    text = report.read_text()
    assert text.startswith("# Benchmarks\n\nEvery table below comes from the command shown above it.\n\n## old (2026)\n\nkept\n")
    sections = text.split("\n## bench methods: minilm-l6 on train (")[1:]
    assert len(sections) == 2
    for section in sections:
        assert "\n\nMachine: " in section and "\n```\nloraforge " in section
        assert "| lora | default | adamw | 0.002 | 1,234 |" in section
    figures = {section.split("Training loss (mean of every 1 steps): ![](")[1].split(")")[0] for section in sections}
    assert len(figures) == 2 and all((report.parent / figure).is_file() for figure in figures)


def test_a_data_name_needs_data_or_LORAFORGE_DATA(project, capsys):
    assert bench_methods() == 2  # --data sst2 is the default
    assert "pass --data PATH or set LORAFORGE_DATA" in capsys.readouterr().err
    with pytest.raises(lf.LoraforgeError, match="pass --forget-data PATH or set LORAFORGE_DATA"):
        data_path("gsm8k", "--forget-data")
    with pytest.raises(lf.LoraforgeError, match="--data: nowhere.tsv is not a file"):
        data_path("nowhere.tsv")


@pytest.mark.parametrize("variable", ["LORAFORGE_DATA", "LORAFORGE_SHARED_DATA"])  # the second: the old name
def test_LORAFORGE_DATA_resolves_a_data_name(project, monkeypatch, variable):
    monkeypatch.setenv(variable, str(project))
    task, train, dev = load_rows(BenchRun(data="sst2", dev_size=2))
    assert task == "classification" and len(train) == 6 and dev[-1] == {"text": "line 7", "label": 1}
    assert bench_methods() == 0
    with pytest.raises(lf.LoraforgeError, match="gsm8k/test.jsonl is not a file"):
        data_path("gsm8k")


def test_every_bench_takes_its_settings_fields_as_flags_with_their_help(capsys):
    """`bench NAME --help` lists each settings field with its help text, through core.configs (no
    hand-made argparse): a field added to a settings dataclass is a flag with no edit of the CLI."""
    from loraforge.bench.cli import BENCHES

    for name, spec in BENCHES.items():
        with pytest.raises(SystemExit) as exited:
            main(["bench", name, "--help"])
        assert exited.value.code == 0
        shown = capsys.readouterr().out
        for config in spec.settings():
            for field in dataclasses.fields(config):
                flag = "--" + field.name.replace("_", "-")
                listed = re.search(re.escape(flag) + r"[ ,]", shown) is not None
                assert listed == (field.name not in spec.drop), (name, flag)
                assert field.name in spec.drop or field.metadata["help"].split()[0] in shown, (name, flag)


def test_bench_refuses_an_unknown_flag_and_a_bad_value_with_exit_2(project, capsys):
    for flags in (["--stepz", "3"], ["--steps", "three"]):
        with pytest.raises(SystemExit) as exited:
            bench_methods(*flags)
        assert exited.value.code == 2
        assert "--stepz" in capsys.readouterr().err or flags[0] == "--steps"
    with pytest.raises(SystemExit, match="--pairs names the combinations itself"):
        bench_methods("--data", "sst2/train.tsv", "--pairs", "lora/adamw")


def test_bench_parity_loads_both_ways_and_randlora_into_peft(tmp_path):
    from loraforge.bench.parity import parity
    from loraforge.testing import tiny_llama, tiny_tokenizer

    tiny_llama().save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    results = parity(str(tmp_path / "model"), rank=4)
    assert set(results) == {"loraforge -> PEFT", "PEFT -> loraforge", "RandLoRA: loraforge -> PEFT"}
    assert all(value < 1e-4 for value in results.values()), results
