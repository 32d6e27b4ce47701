"""The vision benchmark driver on a tiny testbed: the issue's JSON keys and systems, the table."""

import json
import re

import pytest
from vision_helpers import TINY_PRESET

from loraforge.cli import main
from loraforge.core.errors import LoraforgeError
from loraforge.vision.bench import VisionBench, bench_vision, summary_table
from loraforge.vision.testbed import build_testbed

TINY_RUN = dict(shots="1", seeds=1, steps_per_shot=1, images_per_class=1, unet_steps=1, sample_steps=1)


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vision") / "tb"
    build_testbed(folder, TINY_PRESET, log=lambda line: None)
    return folder


def test_bench_vision_rows_and_testbed_figures(tmp_path, testbed):
    out = tmp_path / "bench.json"
    result = bench_vision(VisionBench(quick=True, testbed=str(testbed), json=str(out), out=str(tmp_path / "runs"), **TINY_RUN),
                          log=lambda line: None)
    assert json.loads(out.read_text())["rows"] == result["rows"]
    systems = {"zero-shot", "linear-probe", "lora", "block-lora", "comp-lora", "lora-glad", "datadream",
               "datadream-unadapted"}
    assert {(r["data"], r["system"]) for r in result["rows"]} == {(d, s) for d in ("digits", "glyphs:font") for s in systems}
    for row in result["rows"]:
        assert set(row) == {"data", "shots", "system", "accuracy", "params", "seconds"} and 0 <= row["accuracy"] <= 1
    params = {r["system"]: r["params"] for r in result["rows"]}
    assert params["block-lora"] < params["lora"] == params["comp-lora"] == params["lora-glad"]
    assert set(result["testbed"]) == {"clip_zero_shot", "diffusion_clip_agreement"}
    table = summary_table(result)
    assert table.count("\n") == 2 + 2 + 1 and "| glyphs:font | 1 |" in table
    assert (tmp_path / "runs" / "datadream-digits-1" / "contact_sheet.png").is_file()


def test_bench_vision_report_shows_the_table_the_plot_and_the_contact_sheet(tmp_path, testbed):
    report = tmp_path / "docs" / "benchmarks.md"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_RUN.items()]
    assert main(["bench", "vision", "--quick", "--testbed", str(testbed), "--out", str(tmp_path / "runs"), *flags,
                 "--report", str(report)]) == 0
    text = report.read_text()
    assert "## bench vision --quick: CLIP few-shot and DataDream on the testbed" in text and "| digits | 1 |" in text
    pictures = re.findall(r"!\[\]\(([^)]+)\)", text)
    assert [p.split("-2")[0] for p in pictures] == ["vision", "datadream-sheet"]
    assert all((report.parent / p).is_file() for p in pictures)


def test_bench_vision_names_the_missing_testbed(tmp_path):
    with pytest.raises(LoraforgeError, match="testbed build glyphs --quick"):
        bench_vision(VisionBench(quick=True, testbed=str(tmp_path / "none")))
