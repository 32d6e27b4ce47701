"""Personalisation (issue 24): the hypernetwork spec's five checks, the functional per-row LoRA, DECOR,
EasyRef and the commands, on tiny random CLIP / UNet models (never the testbed)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPTextModel
from vision_helpers import TINY_CLIP, tiny_clip_folder, tiny_unet

from loraforge.adapters.functional import RowLoRA, per_row_lora, stack_rows
from loraforge.adapters.inject import attach, detach, tensors_replaced
from loraforge.adapters.io import load_adapter
from loraforge.cli import main
from loraforge.core.config import AdapterConfig
from loraforge.core.errors import AdapterError, DataError, LoraforgeError
from loraforge.personalize.decor import project, unwanted_basis
from loraforge.personalize.easyref import EasyRefConfig, train_easyref
from loraforge.personalize.hypernet import HyperConfig, HyperNetwork, attention_shapes, fit, l2_penalty
from loraforge.personalize.references import glyph_subjects, load_images
from loraforge.personalize.sampling import Conditioning, generate, hm_cfg, parse_hm_cfg
from loraforge.vision.clip import load_clip
from loraforge.vision.clip_testbed import new_clip
from loraforge.vision.datadream import UNET_TARGETS, load_diffusion
from loraforge.vision.unet_testbed import UNetSize, new_unet, save_diffusion


def _diffusion_folder(folder, clip_folder, seed=0):
    torch.manual_seed(seed)
    clip = new_clip(folder / "tok", TINY_CLIP, 16)[0]
    text = CLIPTextModel(clip.config.text_config)
    text.load_state_dict(clip.text_model.state_dict())
    unet, scheduler = new_unet(UNetSize(channels=(8, 16)), 16, TINY_CLIP.hidden)
    save_diffusion(folder, unet, scheduler, text, AutoTokenizer.from_pretrained(str(clip_folder)))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("personalize")
    clip = tiny_clip_folder(root / "clip")
    return {"root": root, "clip": clip, "diffusion": _diffusion_folder(root / "diffusion", clip),
            "other": _diffusion_folder(root / "other", clip, seed=1),
            "subjects": root / "subjects", "heldout": root / "heldout",
            "train": glyph_subjects(root / "subjects", 4, 3, heldout=False, seed=0),
            "test": glyph_subjects(root / "heldout", 1, 3, heldout=True, seed=1)}


def _inputs(unet, rows=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 3, 16, 16, generator=g), torch.tensor([10] * rows),
            torch.randn(rows, 16, TINY_CLIP.hidden, generator=g))


def _random_factors(unet, rows, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: RowLoRA(torch.randn(rows, 2, d_in, generator=g) * 0.1, torch.randn(rows, d_out, 2, generator=g) * 0.1, 0.5)
            for n, (d_out, d_in) in attention_shapes(unet).items()}


# --- the spec's checks -------------------------------------------------------------------------------

def test_check1_zero_hypernetwork_is_the_base_model(tmp_path):
    unet = tiny_unet()
    hyper = HyperNetwork(16, attention_shapes(unet), rank=2, hidden=8)
    with torch.no_grad():
        for p in hyper.parameters():
            p.zero_()
    factors = hyper(torch.randn(2, 16))
    assert all((f.a == 0).all() and (f.b == 0).all() for f in factors.values())
    x, t, states = _inputs(unet)
    with torch.no_grad():
        base = unet(x, t, encoder_hidden_states=states).sample
        with per_row_lora(unet, factors):
            personal = unet(x, t, encoder_hidden_states=states).sample
    assert torch.equal(base, personal)


def test_check1_fresh_hypernetwork_starts_at_the_base_model():
    unet = tiny_unet()
    hyper = HyperNetwork(16, attention_shapes(unet), rank=2, hidden=8)
    factors = hyper(torch.randn(3, 16))
    assert all((f.b == 0).all() and f.a.abs().sum() > 0 for f in factors.values())  # B = 0, A non-zero: B learns


def test_check2_gradient_only_into_h(models):
    unet, scheduler, text, tokenizer = load_diffusion(models["diffusion"])
    clip, processor, _ = load_clip(models["clip"])
    before = {id(m): {k: v.clone() for k, v in m.state_dict().items()} for m in (unet, text, clip)}
    torch.manual_seed(0)
    hyper = HyperNetwork(clip.config.projection_dim, attention_shapes(unet), rank=2, hidden=8)
    h_before = {k: v.clone() for k, v in hyper.state_dict().items()}
    fit(hyper, unet, scheduler, text, tokenizer, clip, processor, models["train"],
        HyperConfig(rank=2, hidden=8, steps=3, subjects_per_step=2, targets_per_subject=2, lr=1e-2), log=lambda _: None)
    for m in (unet, text, clip):
        assert all(p.grad is None for p in m.parameters())
        assert all(torch.equal(v, before[id(m)][k]) for k, v in m.state_dict().items())
    assert any(not torch.equal(v, h_before[k]) for k, v in hyper.state_dict().items())


def test_check3_l2_is_the_sum_of_squared_predicted_tensors():
    unet = tiny_unet()
    hyper = HyperNetwork(16, attention_shapes(unet), rank=2, hidden=8)
    torch.nn.init.normal_(hyper.head.weight)
    features = torch.randn(2, 16)
    factors = hyper(features)
    for row in range(2):
        manual = sum(float((f.a[row].detach() ** 2).sum() + (f.b[row].detach() ** 2).sum()) for f in factors.values())
        assert l2_penalty(factors)[row].item() == pytest.approx(manual, rel=1e-5)
    assert l2_penalty(factors)[0] != l2_penalty(factors)[1]


def test_check4_hm_cfg_reductions():
    g = torch.Generator().manual_seed(0)
    u, c, p, pu = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(4))
    torch.testing.assert_close(hm_cfg(u, c, p, 3.0, 0.0), u + 3.0 * (c - u), rtol=0, atol=0)  # w_s = 0: base CFG
    torch.testing.assert_close(hm_cfg(u, c, c, 2.5, 1.7), u + 2.5 * (c - u), rtol=0, atol=1e-6)  # base = personalised
    # w_c = w_s with the personalised model's unconditional: the personalised model's CFG
    torch.testing.assert_close(hm_cfg(pu, c, p, 2.0, 2.0), pu + 2.0 * (p - pu), rtol=0, atol=1e-6)


def test_check5_two_subjects_in_one_batch_equal_single_runs():
    unet = tiny_unet()
    factors = [_random_factors(unet, 1, seed) for seed in (1, 2)]
    x, t, states = _inputs(unet)
    with torch.no_grad(), per_row_lora(unet, stack_rows(factors)):
        both = unet(x, t, encoder_hidden_states=states).sample
    for row in range(2):
        with torch.no_grad(), per_row_lora(unet, factors[row]):
            alone = unet(x[row:row + 1], t[:1], encoder_hidden_states=states[row:row + 1]).sample
        torch.testing.assert_close(both[row:row + 1], alone, rtol=0, atol=1e-5)
    assert not torch.allclose(both[0], both[1])


def test_per_row_lora_equals_an_attached_lora():
    unet = tiny_unet()
    factors = _random_factors(unet, 1, 3)
    x, t, states = _inputs(unet, rows=1)
    with torch.no_grad(), per_row_lora(unet, factors):
        functional = unet(x, t, encoder_hidden_states=states).sample
    attach(unet, AdapterConfig(rank=2, alpha=1.0, target_modules=UNET_TARGETS))  # s = alpha / r = 0.5
    state = {}
    for name, f in factors.items():
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = f.a[0], f.b[0]
    with torch.no_grad(), tensors_replaced(unet, state):
        attached = unet(x, t, encoder_hidden_states=states).sample
    detach(unet)
    torch.testing.assert_close(functional, attached, rtol=1e-5, atol=1e-5)


def test_per_row_lora_refuses_wrong_shapes_and_rows():
    unet = tiny_unet()
    name, f = next(iter(_random_factors(unet, 1, 0).items()))
    with pytest.raises(AdapterError, match="do not fit"), per_row_lora(unet, {name: RowLoRA(f.b, f.a, 1.0)}):
        pass
    x, t, states = _inputs(unet, rows=2)
    with pytest.raises(AdapterError, match="adapters for 1"), per_row_lora(unet, {name: f}):
        unet(x, t, encoder_hidden_states=states)


def test_hm_cfg_weights_parsed_and_refused():
    assert parse_hm_cfg("3,1.5") == (3.0, 1.5)
    for bad in ("3", "a,b", "-1,2", "3,31", "nan,1", "1,2,3"):
        with pytest.raises(LoraforgeError, match="hm-cfg"):
            parse_hm_cfg(bad)


def test_hm_cfg_sampling_with_zero_weight_on_the_subject_is_base_cfg(models):
    unet, scheduler, text, tokenizer = load_diffusion(models["diffusion"])
    adapter = _random_factors(unet, 1, 4)
    base = generate(unet, scheduler.config, text, tokenizer, "a red character", 2, guidance=2.0, steps=2)
    hm = generate(unet, scheduler.config, text, tokenizer, "a red character", 2,
                  Conditioning(adapter=adapter, hm=(2.0, 0.0)), steps=2)
    personal = generate(unet, scheduler.config, text, tokenizer, "a red character", 2, Conditioning(adapter=adapter),
                        guidance=2.0, steps=2)
    assert torch.equal(base, hm) and not torch.equal(base, personal)


# --- DECOR -------------------------------------------------------------------------------------------

def test_decor_identity_idempotent_and_removed_directions():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 16, 32, generator=g, dtype=torch.float64)
    unwanted = torch.randn(3, 32, generator=g, dtype=torch.float64)
    basis = unwanted_basis(torch.cat([unwanted, unwanted[:1] * 2]))  # a repeated direction adds nothing
    assert basis.shape == (32, 3)
    torch.testing.assert_close(basis.T @ basis, torch.eye(3, dtype=torch.float64))
    assert torch.equal(project(x, basis, 0.0), x)
    once = project(x, basis, 1.0)
    torch.testing.assert_close(project(once, basis, 1.0), once, rtol=0, atol=1e-12)
    torch.testing.assert_close(once @ unwanted.T, torch.zeros(5, 16, 3, dtype=torch.float64), rtol=0, atol=1e-10)
    half = project(x, basis, 0.5)
    torch.testing.assert_close(half @ basis, 0.5 * (x @ basis))
    with pytest.raises(LoraforgeError, match="decor-strength"):
        project(x, basis, 1.5)


# --- bad input ---------------------------------------------------------------------------------------

def test_images_converted_or_refused_by_name(tmp_path):
    Image.fromarray(np.full((40, 40, 4), 200, np.uint8), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.full((8, 8), 90, np.uint8), "L").save(tmp_path / "grey.png")
    Image.fromarray(np.zeros((16, 64, 3), np.uint8)).save(tmp_path / "wide.png")
    (tmp_path / "text.png").write_text("not an image")
    images = load_images([tmp_path / "rgba.png", tmp_path / "grey.png"], 16)
    assert images.shape == (2, 16, 16, 3) and images.dtype == torch.uint8
    assert int(images[1, 5, 5, 0]) == 90
    for name, match in (("wide.png", "too far from square"), ("text.png", "not an image"), ("none.png", "no such")):
        with pytest.raises(DataError, match=name):
            load_images([tmp_path / name], 16)


# --- the commands ------------------------------------------------------------------------------------

def test_hyper_train_personalize_sample(models, tmp_path):
    assert main(["hyper", "train", "--diffusion", str(models["diffusion"]), "--encoder", str(models["clip"]),
                 "--subjects", str(models["subjects"]), "--out", str(tmp_path / "H"), "--rank", "2", "--hidden", "8",
                 "--steps", "2"]) == 0
    record = json.loads((tmp_path / "H" / "hyper.json").read_text())
    assert record["history"][-1]["step"] == 2 and record["subjects"] == 4
    images = sorted(str(p) for p in (models["heldout"]).glob("*/*.png"))
    assert main(["hyper", "personalize", "--hyper", str(tmp_path / "H"), "--images", *images,
                 "--out", str(tmp_path / "A")]) == 0
    unet = load_diffusion(models["diffusion"])[0]
    layers = len(attention_shapes(unet))
    load_adapter(unet, tmp_path / "A")  # a plain LoRA folder loraforge loads
    from peft import PeftModel

    peft_unet = PeftModel.from_pretrained(load_diffusion(models["diffusion"])[0], str(tmp_path / "A"))
    assert sum("lora_A" in n for n, _ in peft_unet.named_parameters()) == layers
    assert main(["sample", "--diffusion", str(models["diffusion"]), "--adapter", str(tmp_path / "A"),
                 "--prompt", "a red character", "--hm-cfg", "3,2", "--n", "3", "--steps", "2",
                 "--out", str(tmp_path / "S")]) == 0
    assert sorted(p.name for p in (tmp_path / "S").glob("*.png")) == ["000.png", "001.png", "002.png", "contact_sheet.png"]
    assert Image.open(tmp_path / "S" / "contact_sheet.png").size == (3 * 16 * 4, 16 * 4)
    # a hypernetwork (and its adapter) for another diffusion model is refused
    assert main(["hyper", "personalize", "--hyper", str(tmp_path / "H"), "--images", *images,
                 "--out", str(tmp_path / "B"), "--diffusion", str(models["other"])]) == 2
    assert main(["sample", "--diffusion", str(models["other"]), "--adapter", str(tmp_path / "A"),
                 "--prompt", "a character", "--n", "1", "--steps", "1", "--out", str(tmp_path / "X")]) == 2
    assert main(["sample", "--diffusion", str(models["diffusion"]), "--adapter", str(tmp_path / "A"),
                 "--prompt", "a character", "--hm-cfg", "3,40", "--n", "1", "--out", str(tmp_path / "Y")]) == 2
    assert main(["sample", "--diffusion", str(models["diffusion"]), "--prompt", "a character", "--hm-cfg", "3,2",
                 "--n", "1", "--steps", "1", "--out", str(tmp_path / "Z")]) == 2  # HM-CFG without an adapter
    assert not any((tmp_path / d).exists() for d in ("B", "X", "Y", "Z"))


def test_sample_with_decor(models, tmp_path):
    common = ["sample", "--diffusion", str(models["diffusion"]), "--prompt", "a red character", "--n", "2",
              "--steps", "2"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--decor", "--decor-remove", "red", "--decor-strength", "0", "--out", str(tmp_path / "a0")]) == 0
    assert main([*common, "--decor", "--decor-remove", "red", "--out", str(tmp_path / "a1")]) == 0
    read = [np.asarray(Image.open(tmp_path / d / "000.png")) for d in ("plain", "a0", "a1")]
    assert np.array_equal(read[0], read[1]) and not np.array_equal(read[0], read[2])
    assert main([*common, "--decor", "--out", str(tmp_path / "bad")]) == 2  # --decor needs words


def test_easyref_progressive_training_and_sampling(models, tmp_path):
    config = EasyRefConfig(width=16, layers=1, heads=2, tokens=2, align_steps=2, adapter_steps=0, subjects_per_step=2,
                           targets_per_subject=2)
    record = train_easyref(models["diffusion"], models["clip"], models["subjects"], tmp_path / "align", config,
                           log=lambda _: None)
    assert [h["stage"] for h in record["history"]] == ["align"]
    from safetensors.torch import load_file

    unet = load_diffusion(models["diffusion"])[0]
    saved = load_file(str(tmp_path / "align" / "easyref.safetensors"))
    ip_keys = [k for k in saved if k.endswith("to_k_ip.weight")]
    assert ip_keys  # stage 1 leaves the adapter at its start: copies of the text projections
    for key in ip_keys:
        layer = key.removeprefix("adapter.").removesuffix(".to_k_ip.weight").replace("__", ".").removesuffix(".processor")
        assert torch.equal(saved[key], unet.get_submodule(layer).to_k.weight)
    assert main(["easyref", "train", "--diffusion", str(models["diffusion"]), "--encoder", str(models["clip"]),
                 "--subjects", str(models["subjects"]), "--out", str(tmp_path / "E"), "--align-steps", "1",
                 "--adapter-steps", "1"]) == 0
    assert main(["easyref", "train", "--diffusion", str(models["diffusion"]), "--encoder", str(models["clip"]),
                 "--subjects", str(models["subjects"]), "--out", str(tmp_path / "M"), "--encoder-kind", "mean",
                 "--align-steps", "1", "--adapter-steps", "1"]) == 0
    refs = sorted(str(p) for p in models["heldout"].glob("*/*.png"))
    for folder in ("E", "M"):
        assert main(["sample", "--diffusion", str(models["diffusion"]), "--easyref", str(tmp_path / folder),
                     "--references", *refs, "--prompt", "a character", "--n", "2", "--steps", "2",
                     "--out", str(tmp_path / f"s{folder}")]) == 0
        assert (tmp_path / f"s{folder}" / "contact_sheet.png").is_file()
    assert main(["sample", "--diffusion", str(models["other"]), "--easyref", str(tmp_path / "E"), "--references",
                 *refs, "--prompt", "a character", "--n", "1", "--out", str(tmp_path / "bad")]) == 2


def test_decoupled_attention_with_zero_tokens_is_the_base_unet(models):
    from loraforge.personalize.easyref import install_adapter

    unet = load_diffusion(models["diffusion"])[0]
    x, t, states = _inputs(unet, rows=2)
    with torch.no_grad():
        base = unet(x, t, encoder_hidden_states=states).sample
        install_adapter(unet, tokens=3, scale=1.0)
        with_zero = unet(x, t, encoder_hidden_states=torch.cat([states, torch.zeros(2, 3, states.shape[2])], 1)).sample
        with_tokens = unet(x, t, encoder_hidden_states=torch.cat([states, torch.randn(2, 3, states.shape[2])], 1)).sample
    torch.testing.assert_close(with_zero, base, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(with_tokens, base, atol=1e-4)


def test_subject_folders_and_prompts(models):
    train, test = models["train"], models["test"]
    assert len(train) == 4 and all(s.images.shape == (3, 16, 16, 3) for s in train)
    assert test[0].attributes["font"] == "stix" and all(s.attributes["font"] != "stix" for s in train)
    from loraforge.personalize.references import read_subjects

    again = read_subjects(models["subjects"], 16)
    assert [s.name for s in again] == [s.name for s in train] and torch.equal(again[0].images, train[0].images)


# --- the benchmark -----------------------------------------------------------------------------------

def test_bench_personalize_rows_json_and_report(models, tmp_path):
    import shutil

    from loraforge.personalize.bench import SYSTEMS

    testbed = tmp_path / "tb"
    shutil.copytree(models["diffusion"], testbed / "diffusion")
    shutil.copytree(models["clip"], testbed / "clip")
    report = tmp_path / "report.md"
    assert main(["bench", "personalize", "--testbed", str(testbed), "--json", str(tmp_path / "p.json"),
                 "--report", str(report), "--train-subjects", "3", "--heldout-subjects", "2",
                 "--images-per-subject", "3", "--references", "2", "--hyper-steps", "1", "--easyref-steps", "1",
                 "--lora-steps", "1", "--samples", "1", "--sample-steps", "1", "--cfg-sweep", "1,3",
                 "--hm-cfg-sweep", "3,2 2,1"]) == 0
    result = json.loads((tmp_path / "p.json").read_text())
    sweep = result["guidance_sweep"]  # the hypernet adapter's trade-off curves, one point per weight
    assert [(r["sampling"], r["weights"]) for r in sweep] == [("cfg", [1.0]), ("cfg", [3.0]), ("hm-cfg", [3.0, 2.0]),
                                                             ("hm-cfg", [2.0, 1.0])]
    hm = next(r for r in result["rows"] if r["system"] == "hypernet-hm-cfg")
    assert sweep[3]["subject_fidelity"] == hm["subject_fidelity"]  # 2,1 is the row's own --hm-cfg: same samples
    assert [r["system"] for r in result["rows"]] == list(SYSTEMS) == [
        "subject-lora", "hypernet", "hypernet-hm-cfg", "easyref", "embedding-mean", "group-lora", "subject-lora-decor"]
    for row in result["rows"]:
        assert set(row) == {"system", "subject_fidelity", "prompt_alignment", "leakage", "seconds"}
        assert -1 <= row["subject_fidelity"] <= 1 and -1 <= row["prompt_alignment"] <= 1 and 0 <= row["leakage"] <= 1
        assert row["seconds"] > 0
    assert set(result["targets"]) == {"hypernet_under_1s", "hypernet_fidelity_ratio", "hm_cfg_raises_alignment",
                                      "decor_lowers_leakage", "easyref_beats_mean"}
    text = report.read_text()
    assert "bench personalize" in text and "| hypernet-hm-cfg |" in text
    assert len(list(tmp_path.glob("personalize-sheet-*.png"))) == 1 and len(list(tmp_path.glob("personalize-2*.png"))) == 1
    assert main(["bench", "personalize", "--testbed", str(tmp_path / "none")]) == 2
    assert main(["bench", "personalize", "--testbed", str(testbed), "--hm-cfg-sweep", "3,99"]) == 2  # refused up front
