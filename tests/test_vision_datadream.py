"""`loraforge datadream` on a tiny testbed: adapters in PEFT's format, the contact sheet, the report."""

import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from PIL import Image
from vision_helpers import TINY_PRESET

from loraforge.cli import main
from loraforge.vision.datadream import contact_sheet, load_diffusion
from loraforge.vision.testbed import build_testbed


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    out = tmp_path_factory.mktemp("tb") / "tb"
    build_testbed(out, TINY_PRESET, log=lambda line: None)
    return out


def run(testbed, out, *extra):
    return main(["datadream", "--diffusion", str(testbed / "diffusion"), "--clip", str(testbed / "clip"),
                 "--data", "digits", "--shots", "1", "--images-per-class", "2", "--unet-steps", "2",
                 "--sample-steps", "2", "--clip-steps-per-shot", "1", "--out", str(out), *extra])


def test_datadream_writes_adapters_sheet_and_report(testbed, tmp_path):
    assert run(testbed, tmp_path / "dd") == 0
    report = json.loads((tmp_path / "dd" / "report.json").read_text())
    assert set(report) >= {"accuracy", "real_only_accuracy", "zero_shot", "diffusion_adapter_params"}
    assert 0 <= report["accuracy"] <= 1 and report["diffusion_adapter_params"]["all"] > 0
    sheet = Image.open(tmp_path / "dd" / "contact_sheet.png")
    assert sheet.size == ((1 + 1 + 2) * 16 * 4, 10 * 16 * 4)  # 1 shot, a gap, 2 generated; 10 digit rows
    unet = load_diffusion(testbed / "diffusion")[0]
    peft_unet = PeftModel.from_pretrained(unet, str(tmp_path / "dd" / "adapters" / "all" / "unet"))
    assert any("lora_A" in name for name, _ in peft_unet.named_parameters())


def test_datadream_per_class_and_unadapted(testbed, tmp_path):
    assert run(testbed, tmp_path / "cls", "--per-class") == 0
    assert sorted(p.name for p in (tmp_path / "cls" / "adapters").iterdir()) == sorted(f"class-{c}" for c in range(10))
    assert run(testbed, tmp_path / "plain", "--unadapted") == 0
    assert not (tmp_path / "plain" / "adapters").exists()
    assert json.loads((tmp_path / "plain" / "report.json").read_text())["diffusion_adapter_params"] == {}


def test_contact_sheet_places_real_then_generated():
    real = [torch.full((1, 2, 2, 3), 10, dtype=torch.uint8)]
    made = [torch.full((3, 2, 2, 3), 200, dtype=torch.uint8)]
    sheet = torch.from_numpy(np.array(contact_sheet(real, made, columns=2, scale=1)))
    assert sheet.shape == (2, 2 * 4, 3)
    assert (sheet[:, :2] == 10).all() and (sheet[:, 2:4] == 255).all() and (sheet[:, 4:] == 200).all()
