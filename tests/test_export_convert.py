"""`loraforge convert --to lora`: any method's adapter as a plain PEFT LoRA (truncated SVD per layer)."""

import json

import pytest
import torch
from peft import PeftModel

import loraforge as lf
from loraforge.adapters.convert import REPORT_NAME, convert_to_lora, truncated_lora
from loraforge.cli import main
from loraforge.testing import tiny_bert, tiny_llama, tiny_tokenizer

IDS = torch.tensor([[5, 17, 33, 60, 71, 9, 44, 12]])


def saved(tmp_path, method: str, rank: int = 4, **config) -> str:
    init = "default" if method == "loldu" else "random"  # loldu starts from W0's LU factors: its own update
    model = lf.attach(tiny_llama(), lf.AdapterConfig(method=method, rank=rank, alpha=8, init=init, seed=1, **config))
    with torch.no_grad():
        for layer in lf.adapter_layers(model).values():
            if method == "loldu":
                layer.loldu_z.normal_()
            if method == "dora":  # m = ||W0 + s B A|| at the start: dW = s B A until the magnitude moves
                layer.lora_magnitude_vector.mul_(1 + 0.3 * torch.randn_like(layer.lora_magnitude_vector))
    folder = tmp_path / method
    lf.save_adapter(model, folder)
    return str(folder)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_truncated_svd_is_the_best_rank_r_approximation():
    torch.manual_seed(0)
    delta = torch.randn(24, 3) @ torch.randn(3, 40) + 1e-2 * torch.randn(24, 40)  # rank 3 plus a small tail
    s = torch.linalg.svdvals(delta)
    for rank in (1, 3, 10):
        a, b, delta_rank, error = truncated_lora(delta, rank)
        assert a.shape == (rank, 40) and b.shape == (24, rank) and delta_rank == 24
        assert error == pytest.approx(((delta - b @ a).norm() / delta.norm()).item(), rel=1e-4)
        assert error == pytest.approx((s[rank:].square().sum() / s.square().sum()).sqrt().item(), rel=1e-4)
    exact = torch.randn(24, 3) @ torch.randn(3, 40)
    a, b, delta_rank, error = truncated_lora(exact, 5)
    assert delta_rank == 3 and error < 1e-5
    torch.testing.assert_close(b @ a, exact, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["lora", "lora-xs", "loldu", "bone", "block-lora", "comp-lora", "full"])
def test_low_rank_methods_convert_exactly_and_peft_loads_the_lora(tmp_path, method):
    """Every update of rank <= R comes back to rounding; PEFT's LoRA then gives the adapter's logits."""
    if method == "full":  # a full fine-tune: its weights, whose update from the base is of rank <= 4 here
        tuned = lf.attach(tiny_llama(), lf.AdapterConfig(method="full"))
        with torch.no_grad():
            for name in lf.find_targets(tuned, lf.AdapterConfig()):
                weight = tuned.get_submodule(name).weight
                weight += torch.randn(weight.shape[0], 2) @ torch.randn(2, weight.shape[1]) * 0.1
        lf.save_adapter(tuned, tmp_path / "full")
        adapter = str(tmp_path / "full")
    else:
        adapter = saved(tmp_path, method, rank=4)
    want = logits(lf.load_adapter(tiny_llama(), adapter))
    base = tiny_llama()
    report = convert_to_lora(base, tiny_tokenizer(), adapter, rank=4, out=tmp_path / "lora")
    assert report["exact_layers"] == report["layers"] > 0, report["per_layer"]
    assert report["max_layer_relative_error"] < 1e-5
    # The layers come back to fp32 rounding (above); the logits carry that rounding through every layer, of
    # two factorisations multiplied in different orders: loldu's measured 1.03e-5 on one CPU, under 1e-5 on another.
    assert report["logits_relative_error"] < 3e-5 and report["top1_agreement"] == 1.0
    assert json.loads((tmp_path / "lora" / REPORT_NAME).read_text())["per_layer"] == report["per_layer"]
    peft = PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora").eval()
    torch.testing.assert_close(logits(peft), want, atol=1e-4, rtol=1e-4)
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"


@pytest.mark.parametrize("method", ["dora", "bone-bat"])
def test_full_rank_updates_lose_only_their_tail(tmp_path, method):
    """A full-rank update: the error shrinks as R grows, is the SVD tail's, and vanishes at full rank."""
    adapter = saved(tmp_path, method, rank=4)
    reports = [convert_to_lora(tiny_llama(), tiny_tokenizer(), adapter, rank=r, out=tmp_path / f"r{r}") for r in (1, 4, 32)]
    errors = [r["mean_layer_relative_error"] for r in reports]
    assert errors[0] > errors[1] > 1e-3 and errors[2] < 1e-5
    assert reports[0]["exact_layers"] < reports[0]["layers"] and reports[2]["exact_layers"] == reports[2]["layers"]
    assert reports[0]["logits_relative_error"] > reports[2]["logits_relative_error"]
    assert reports[2]["logits_relative_error"] < 1e-5
    peft = PeftModel.from_pretrained(tiny_llama(), tmp_path / "r32").eval()
    torch.testing.assert_close(logits(peft), logits(lf.load_adapter(tiny_llama(), adapter)), atol=1e-4, rtol=1e-4)


def test_mixture_of_experts_is_refused(tmp_path):
    adapter = saved(tmp_path, "mixlora")
    with pytest.raises(lf.AdapterError, match="depends on the input"):
        convert_to_lora(tiny_llama(), tiny_tokenizer(), adapter, rank=4, out=tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_cli_converts_and_reports(tmp_path, capsys):
    tiny_llama().save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    adapter = saved(tmp_path, "dora", rank=2)
    argv = ["convert", "--to", "lora", "--rank", "2", adapter, "--out", str(tmp_path / "lora"),
            "--model", str(tmp_path / "model")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{"):out.rindex("}") + 1])  # past any library's own log line
    assert summary["method"] == "dora" and summary["rank"] == 2 and "per_layer" not in summary
    assert main(argv[:4] + ["0"] + argv[5:]) == 2
    assert "--rank must be a positive integer" in capsys.readouterr().err


def test_a_classifier_converts_with_its_head(tmp_path, capsys):
    """A sequence classifier: the head (modules_to_save) travels unchanged, the logits compared are the labels'."""
    tiny_bert(num_labels=3).save_pretrained(tmp_path / "bert")
    tiny_tokenizer().save_pretrained(tmp_path / "bert")
    model = lf.attach(tiny_bert(num_labels=3), lf.AdapterConfig(method="lora-xs", rank=4, seed=0))
    with torch.no_grad():
        for layer in lf.adapter_layers(model).values():
            layer.lora_R.normal_(std=0.1)
        model.classifier.weight.normal_()
    lf.save_adapter(model, tmp_path / "cls")
    want = logits(lf.load_adapter(tiny_bert(num_labels=3), tmp_path / "cls"))
    assert main(["convert", "--to", "lora", "--rank", "4", str(tmp_path / "cls"), "--out", str(tmp_path / "lora"),
                 "--model", str(tmp_path / "bert")]) == 0
    report = json.loads((tmp_path / "lora" / REPORT_NAME).read_text())
    assert report["positions"] == 4 and report["exact_layers"] == report["layers"] and report["logits_relative_error"] < 1e-5
    converted = lf.load_adapter(tiny_bert(num_labels=3), tmp_path / "lora")
    assert converted.loraforge_config.modules_to_save == ["classifier"]
    torch.testing.assert_close(logits(converted), want, atol=1e-5, rtol=1e-5)
