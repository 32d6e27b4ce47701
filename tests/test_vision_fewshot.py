"""`loraforge fewshot` on a tiny random CLIP: the shots are learnt, the base stays frozen, the JSON holds the rows."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from vision_helpers import tiny_clip_folder

from loraforge.cli import main
from loraforge.core.errors import LoraforgeError
from loraforge.vision.clip import load_clip, pixels, zero_shot_accuracy
from loraforge.vision.fewshot import FewShotSettings, draw_shots, load_split, train_adapter
from loraforge.vision.glyphs import digits


def test_draw_shots_takes_k_per_class_and_depends_on_the_seed():
    labels = torch.arange(5).repeat(10)
    index = draw_shots(labels, 3, seed=0)
    assert torch.bincount(labels[index]).tolist() == [3] * 5
    assert not torch.equal(index, draw_shots(labels, 3, seed=1))
    with pytest.raises(LoraforgeError, match="fewer than 11 shots"):
        draw_shots(labels, 11, seed=0)


@pytest.mark.parametrize("method,regularizer", [("lora", ""), ("block-lora", ""), ("comp-lora", ""), ("lora", "glad")])
def test_adapter_learns_the_shots_and_leaves_the_base(tmp_path, method, regularizer):
    model, processor, tokenizer = load_clip(tiny_clip_folder(tmp_path / "clip"))
    data = digits()
    index = draw_shots(data.labels, 4, seed=0)
    px, y = pixels(processor, data.images[index]), data.labels[index]
    prompts = [f"a {c}" for c in data.classes]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    zero_shot = zero_shot_accuracy(model, tokenizer, px, y, prompts)
    settings = FewShotSettings(method=method, regularizer=regularizer, lr=2e-2, steps_per_shot=40, dropout=0.0,
                               targets="q_proj,k_proj,v_proj,out_proj,fc1,fc2")
    train_adapter(model, tokenizer, prompts, px, y, settings, seed=0)
    assert zero_shot_accuracy(model, tokenizer, px, y, prompts) >= zero_shot + 0.3  # fits its 40 shots
    after = model.state_dict()
    for key, value in before.items():  # every base tensor bitwise unchanged (wrapped ones under base_layer)
        moved = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(value, after[key] if key in after else after[moved]), key


def test_png_folder_data_and_json(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("circle", "square"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "data" / name / f"{i}.png")
    split = load_split(str(tmp_path / "data"), None)
    assert split.pool.classes == ["circle", "square"] and len(split.pool) + len(split.test) == 12
    clip = tiny_clip_folder(tmp_path / "clip")
    out = tmp_path / "fs.json"
    assert main(["fewshot", "--clip", str(clip), "--data", str(tmp_path / "data"), "--shots", "1,2", "--seeds", "2",
                 "--steps-per-shot", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {(r["shots"], r["system"]) for r in result["rows"]} == {(s, n) for s in (1, 2) for n in ("lora", "linear-probe", "zero-shot")}
    lora = next(r for r in result["rows"] if r["system"] == "lora")
    assert lora["params"] > 0 and len(lora["per_seed"]) == 2 and 0 <= lora["accuracy"] <= 1
