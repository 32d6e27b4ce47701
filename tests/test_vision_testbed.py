"""The glyph data, the caption tokenizer and the testbed build, on tiny configs."""

import json

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import AutoImageProcessor, CLIPModel, CLIPTextModel, CLIPTokenizer
from vision_helpers import TINY_PRESET

from loraforge.cli import main
from loraforge.vision.clip_testbed import vocabulary_texts
from loraforge.vision.glyphs import (
    CHARACTERS,
    COLOURS,
    HELDOUT_FONT,
    build_glyphs,
    caption,
    digits,
    load_glyphs,
    make_split,
)
from loraforge.vision.judge import cnn_judge
from loraforge.vision.testbed import GUIDANCES, PRESETS, build_testbed
from loraforge.vision.unet_testbed import UNetSize, denoising_loss, min_snr_weights, new_unet
from loraforge.vision.vocab import caption_tokenizer


def test_glyphs_are_deterministic_and_hold_out_a_font(tmp_path):
    a, b = make_split(30, ("sans", "mono"), seed=3), make_split(30, ("sans", "mono"), seed=3)
    assert torch.equal(a.images, b.images) and a.attributes == b.attributes
    assert not torch.equal(a.images, make_split(30, ("sans", "mono"), seed=4).images)
    assert a.images.shape == (30, 16, 16, 3) and a.images.dtype == torch.uint8
    splits = build_glyphs(tmp_path / "g", n_train=60, n_test=20, n_heldout=30, seed=0)
    assert HELDOUT_FONT not in {x["font"] for x in splits["train"].attributes + splits["test"].attributes}
    assert {x["font"] for x in splits["heldout_font"].attributes} == {HELDOUT_FONT}
    back = load_glyphs(tmp_path / "g", "heldout_font")
    assert torch.equal(back.images, splits["heldout_font"].images) and torch.equal(back.labels, splits["heldout_font"].labels)
    assert back.classes[:10] == [f"digit {d}" for d in range(10)] and len(back.classes) == len(CHARACTERS) == 20
    # glyphs differ: an image is not its background alone
    assert (a.images.float().flatten(1).std(1) > 5).all()


def test_caption_reads_like_the_issue():
    attrs = {"char": "K", "colour": "red", "weight": "bold", "background": "grey"}
    assert caption(attrs) == "a red bold letter K on a grey background"
    assert caption(attrs, {"colour": False, "background": False, "weight": False}) == "a letter K"
    assert caption(attrs, {"char": False, "background": False, "weight": False}) == "a red character"


def test_digits_in_glyph_style():
    data = digits()
    assert data.images.shape == (1797, 16, 16, 3) and sorted(data.labels.unique().tolist()) == list(range(10))
    assert (data.images[:, 0, 0] == torch.tensor([110, 110, 110], dtype=torch.uint8)).all()  # grey corner


def test_caption_tokenizer_is_a_standard_clip_one_with_whole_words(tmp_path):
    tokenizer = caption_tokenizer(vocabulary_texts(), tmp_path, max_length=16)
    reread = CLIPTokenizer.from_pretrained(str(tmp_path))  # vocab.json + merges.txt only
    for word in {w for t in vocabulary_texts() for w in t.lower().split()}:
        assert len(reread(word, add_special_tokens=False)["input_ids"]) == 1, word
    ids = tokenizer("a red bold letter K on a grey background")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id and len(ids) == 11
    assert tokenizer.unk_token_id not in tokenizer("zebra quartz")["input_ids"][1:-1]  # spelt letter by letter
    assert len(tokenizer) < 700


def test_build_testbed_writes_standard_folders(tmp_path):
    report = build_testbed(tmp_path / "tb", TINY_PRESET, log=lambda line: None)
    out = tmp_path / "tb"
    clip = CLIPModel.from_pretrained(str(out / "clip"))
    assert AutoImageProcessor.from_pretrained(str(out / "clip")).crop_size["height"] == 16
    assert (out / "clip" / "vocab.json").is_file() and (out / "clip" / "merges.txt").is_file()
    unet = UNet2DConditionModel.from_pretrained(str(out / "diffusion"), subfolder="unet")
    assert unet.config.cross_attention_dim == clip.config.text_config.hidden_size
    DDPMScheduler.from_pretrained(str(out / "diffusion"), subfolder="scheduler")
    text = CLIPTextModel.from_pretrained(str(out / "diffusion"), subfolder="text_encoder")
    torch.testing.assert_close(text.embeddings.token_embedding.weight, clip.text_model.embeddings.token_embedding.weight)
    saved = json.loads((out / "testbed.json").read_text())
    assert saved["clip_zero_shot"] == report["clip_zero_shot"]
    assert set(saved["clip_zero_shot"]) == {"character", "colour", "digits", "heldout_font"}
    assert set(saved["diffusion_clip_agreement"]) == {str(g) for g in GUIDANCES}
    assert all(set(by_judge) == {"clip", "cnn"} for by_judge in saved["diffusion_clip_agreement"].values())
    assert set(saved["cnn_judge_accuracy"]) == {"character", "colour"}
    assert saved["clip_curve"] and saved["clip_curve"][0]["step"] == 0


def test_cli_refuses_fewshot_on_a_missing_clip(tmp_path, capsys):
    assert main(["fewshot", "--clip", str(tmp_path / "nope"), "--data", "digits"]) == 2
    assert "not a CLIP folder" in capsys.readouterr().err


def test_cli_builds_the_quick_testbed_with_overrides(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(PRESETS, "quick", TINY_PRESET)
    assert main(["testbed", "build", "glyphs", "--quick", "--out", str(tmp_path / "tb"), "--clip-minutes", "0.001"]) == 0
    out = capsys.readouterr().out
    printed = json.loads(out[out.index("{\n"):])  # after any library's warnings
    assert printed["out"] == str(tmp_path / "tb") and set(printed["clip_zero_shot"]) >= {"character", "colour"}
    saved = json.loads((tmp_path / "tb" / "testbed.json").read_text())
    assert saved["preset"]["clip_minutes"] == 0.001 and saved["preset"]["n_train"] == TINY_PRESET.n_train


def test_unet_cross_attention_from_a_level_on():
    unet, _ = new_unet(UNetSize(channels=(8, 16), attention_from=1), 16, 32)
    assert [type(b).__name__ for b in unet.down_blocks] == ["DownBlock2D", "CrossAttnDownBlock2D"]
    assert [type(b).__name__ for b in unet.up_blocks] == ["CrossAttnUpBlock2D", "UpBlock2D"]  # mirrored
    states = torch.randn(2, 5, 32)
    assert unet(torch.randn(2, 3, 16, 16), torch.tensor([3, 7]), encoder_hidden_states=states).sample.shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="attention_from must name one of the 2 levels, got 2"):
        new_unet(UNetSize(channels=(8, 16), attention_from=2), 16, 32)


def test_min_snr_weights_are_one_below_gamma_and_gamma_over_snr_above():
    _, scheduler = new_unet(UNetSize(channels=(8, 16)), 16, 32)
    t = torch.arange(0, 1000, 37)
    abar = scheduler.alphas_cumprod[t].double()
    snr = abar / (1 - abar)
    expected = torch.where(snr > 5.0, 5.0 / snr, torch.ones_like(snr))
    torch.testing.assert_close(min_snr_weights(scheduler, t, gamma=5.0).double(), expected, rtol=1e-5, atol=0)
    assert (snr > 5).any() and (snr < 5).any()  # both branches taken on this schedule


def test_cnn_judge_reads_colour_and_answers_per_image():
    train, test = make_split(300, ("sans",), seed=0), make_split(60, ("sans",), seed=1)
    judge, accuracy = cnn_judge(train, test, steps=150, batch=64)
    assert accuracy["colour"] > 0.9 and 0 <= accuracy["character"] <= 1
    verdicts = judge(test.images[:5])
    assert len(verdicts) == 5 and all(v["char"] in CHARACTERS and v["colour"] in COLOURS for v in verdicts)


def test_denoising_loss_is_the_min_snr_weighted_eps_error():
    torch.manual_seed(0)
    unet, scheduler = new_unet(UNetSize(channels=(8, 16)), 16, 32)
    x0, states = torch.rand(3, 3, 16, 16) * 2 - 1, torch.randn(3, 5, 32)
    loss = denoising_loss(unet, scheduler, x0, states, torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(7)
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.randint(0, 1000, (3,), generator=generator)
    abar = scheduler.alphas_cumprod[t][:, None, None, None]
    pred = unet(abar.sqrt() * x0 + (1 - abar).sqrt() * noise, t, encoder_hidden_states=states).sample
    expected = (min_snr_weights(scheduler, t) * (pred - noise).pow(2).mean((1, 2, 3))).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
