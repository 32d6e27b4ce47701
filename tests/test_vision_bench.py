"""The vision benchmark driver on a tiny testbed: the issue's JSON keys and systems, the table."""

import json

import pytest
from vision_helpers import TINY_PRESET

from loraforge.core.errors import LoraforgeError
from loraforge.vision.bench import VisionBench, bench_vision, summary_table
from loraforge.vision.testbed import build_testbed


def test_bench_vision_rows_and_testbed_figures(tmp_path):
    build_testbed(tmp_path / "tb", TINY_PRESET, log=lambda line: None)
    out = tmp_path / "bench.json"
    result = bench_vision(VisionBench(quick=True, testbed=str(tmp_path / "tb"), json=str(out), shots="1", seeds=1,
                                      steps_per_shot=1, images_per_class=1, unet_steps=1, sample_steps=1,
                                      out=str(tmp_path / "runs")), log=lambda line: None)
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


def test_bench_vision_names_the_missing_testbed(tmp_path):
    with pytest.raises(LoraforgeError, match="testbed build glyphs --quick"):
        bench_vision(VisionBench(quick=True, testbed=str(tmp_path / "none")))
