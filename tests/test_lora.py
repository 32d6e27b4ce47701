"""LoRA core: the checks of shared/methods/lora.md, PEFT parity both ways, and bad input."""

import dataclasses
import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import loraforge as lf
from loraforge.adapters.io import read_adapter
from loraforge.methods.lora import LoRALinear
from loraforge.testing import TINY_MODELS, tiny_bert, tiny_llama

MODEL_NAMES = list(TINY_MODELS)


def inputs(seed: int = 0, batch: int = 2, length: int = 9) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(seed)).logits


def random_adapter(model, **kw) -> nn.Module:
    cfg = lf.AdapterConfig(rank=4, alpha=8, init="random", seed=1, **kw)
    return lf.attach(model, cfg)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_zero_init_leaves_outputs_unchanged(name):
    model = TINY_MODELS[name]()
    before = logits(model)
    lf.attach(model, lf.AdapterConfig(rank=4, alpha=8, seed=0))
    assert torch.equal(logits(model), before)  # exactly: B = 0


def test_trainable_parameter_count_matches_formula():
    lora = lf.get_method("lora")
    assert lora.trainable_params(64, 64, lf.AdapterConfig(rank=4)) == 512
    assert lora.trainable_params(128, 64, lf.AdapterConfig(rank=8)) == 1536
    model = tiny_llama()
    lf.attach(model, lf.AdapterConfig(rank=4, target_modules=["q_proj", "v_proj"]))
    # 2 layers x (q: 4*(32+32) + v: 4*(32+16))
    assert lf.trainable_parameters(model) == 2 * (4 * 64 + 4 * 48)


def test_scaling_lora_and_rslora():
    base = nn.Linear(8, 8)
    assert LoRALinear(base, lf.AdapterConfig(rank=16, alpha=16), "x").scaling == 1.0
    assert LoRALinear(base, lf.AdapterConfig(rank=16, alpha=16, use_rslora=True), "x").scaling == 4.0
    assert LoRALinear(base, lf.AdapterConfig(rank=4, alpha=8, use_rslora=True), "x").scaling == 8 / math.sqrt(4)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_merge_equals_unmerged_and_unmerge_restores(name):
    model = TINY_MODELS[name]()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    random_adapter(model)
    unmerged = logits(model)
    lf.merge(model)
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=0)
    lf.unmerge(model)
    lf.detach(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, weights[n], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_merge_and_unload_gives_plain_model(name):
    model = random_adapter(TINY_MODELS[name]())
    expected = logits(model)
    plain = lf.merge_and_unload(model)
    assert not lf.adapter_layers(plain)
    torch.testing.assert_close(logits(plain), expected, atol=1e-5, rtol=0)


def test_gradient_at_init_matches_closed_form():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 5), lf.AdapterConfig(rank=3, alpha=6), "x")
    x = torch.randn(4, 6)
    h = layer(x)
    upstream = torch.randn_like(h)
    (h * upstream).sum().backward()
    assert torch.count_nonzero(layer.lora_A.weight.grad) == 0
    expected = layer.scaling * upstream.T @ (x @ layer.lora_A.weight.T)  # s * dL/dh^T (A x)
    torch.testing.assert_close(layer.lora_B.weight.grad, expected, atol=1e-6, rtol=1e-6)


def test_gradient_matches_finite_difference():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(5, 4).double(), lf.AdapterConfig(rank=2, alpha=4, init="random"), "x").double()
    x = torch.randn(3, 5, dtype=torch.double)
    assert torch.autograd.gradcheck(lambda a, b: torch.nn.functional.linear(x, layer.base_layer.weight)
                                    + layer.scaling * x @ a.T @ b.T, (layer.lora_A.weight, layer.lora_B.weight))
    loss = layer(x).pow(2).sum()
    loss.backward()
    a, b = layer.lora_A.weight.detach().clone().requires_grad_(), layer.lora_B.weight.detach().clone().requires_grad_()
    ref = (layer.base_layer(x) + layer.scaling * x @ a.T @ b.T).pow(2).sum()
    ref.backward()
    torch.testing.assert_close(layer.lora_A.weight.grad, a.grad)
    torch.testing.assert_close(layer.lora_B.weight.grad, b.grad)


def test_dropout_in_eval_mode_equals_no_dropout():
    base = tiny_llama()
    with_dropout = random_adapter(tiny_llama(), dropout=0.5)
    without = random_adapter(base, dropout=0.0)
    with_dropout.eval()
    torch.testing.assert_close(logits(with_dropout), logits(without), atol=0, rtol=0)
    with_dropout.train()
    assert not torch.allclose(logits(with_dropout), logits(without))


def test_forward_never_builds_the_full_update(monkeypatch):
    model = random_adapter(tiny_llama())

    def forbidden(self):
        raise AssertionError("delta_weight() called in the training forward")

    monkeypatch.setattr(LoRALinear, "delta_weight", forbidden)
    model.train()
    model(**inputs(), labels=inputs()["input_ids"]).loss.backward()


def test_seeded_init_is_reproducible_and_equals_peft():
    ours = lf.attach(tiny_llama(), lf.AdapterConfig(rank=4, alpha=8, seed=7, target_modules=["q_proj", "v_proj"]))
    again = lf.attach(tiny_llama(), lf.AdapterConfig(rank=4, alpha=8, seed=7, target_modules=["q_proj", "v_proj"]))
    for (k, v), (_, w) in zip(lf.adapter_state_dict(ours).items(), lf.adapter_state_dict(again).items()):
        assert torch.equal(v, w), k
    base = tiny_llama()
    torch.manual_seed(7)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    peft_state = {k.replace(".default", ""): v for k, v in peft_model.named_parameters() if "lora_" in k}
    for key, value in lf.adapter_state_dict(ours).items():
        torch.testing.assert_close(peft_state["base_model.model." + key], value, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_peft_loads_loraforge_adapter(name, tmp_path):
    model = random_adapter(TINY_MODELS[name](), target_modules="all-linear")
    if name == "bert":
        with torch.no_grad():
            model.classifier.weight.add_(0.5)  # a trained head must travel with the adapter
    expected = logits(model)
    lf.save_adapter(model, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(TINY_MODELS[name](), tmp_path / "adapter").eval()
    got = logits(peft_model)
    assert (got - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_loraforge_loads_peft_adapter(name, tmp_path):
    task = "SEQ_CLS" if name == "bert" else "CAUSAL_LM"
    peft_model = get_peft_model(
        TINY_MODELS[name](), LoraConfig(task_type=task, r=4, lora_alpha=16, target_modules="all-linear",
                                        init_lora_weights=False, use_rslora=True))
    peft_model.eval()
    expected = logits(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    model = lf.load_adapter(TINY_MODELS[name](), tmp_path / "peft")
    assert model.loraforge_config.use_rslora and model.loraforge_config.rank == 4
    assert (logits(model) - expected).abs().max() <= 1e-4


def test_config_round_trip_is_identical(tmp_path):
    cfg = lf.AdapterConfig(rank=4, alpha=16, dropout=0.1, target_modules=r".*\.(q|v)_proj", use_rslora=True,
                           seed=3, rank_pattern={"q_proj": 8}, provenance={"note": "kept"})
    model = lf.attach(tiny_llama(), cfg)
    lf.save_adapter(model, tmp_path / "a")
    loaded, targets, _ = read_adapter(tmp_path / "a")
    assert loaded == model.loraforge_config
    assert dataclasses.replace(loaded, task_type=None) == cfg
    assert lf.AdapterConfig.from_peft_dict(json.loads((tmp_path / "a" / "adapter_config.json").read_text())).rank == 4
    assert sorted(targets) == sorted(model.loraforge_targets)
    reloaded = lf.load_adapter(tiny_llama(), tmp_path / "a")
    assert reloaded.model.layers[0].self_attn.q_proj.rank == 8  # rank_pattern honoured on reload
    for (k, v), (k2, w) in zip(sorted(lf.adapter_state_dict(model).items()),
                               sorted(lf.adapter_state_dict(reloaded).items())):
        assert k == k2 and torch.equal(v, w)


def test_classification_head_is_trainable_and_saved(tmp_path):
    model = lf.attach(tiny_bert(), lf.AdapterConfig(rank=4))
    assert model.loraforge_config.modules_to_save == ["classifier"]
    assert model.classifier.weight.requires_grad
    assert not model.bert.embeddings.word_embeddings.weight.requires_grad
    assert "classifier.weight" in lf.adapter_state_dict(model)


# ---- bad input ---------------------------------------------------------------------------------

def test_target_that_matches_nothing_names_the_layers():
    with pytest.raises(lf.AdapterError, match="matches no Linear layer.*q_proj"):
        lf.attach(tiny_llama(), lf.AdapterConfig(target_modules=["query"]))


def test_target_that_is_not_linear():
    with pytest.raises(lf.AdapterError, match="only Linear/Conv1D"):
        lf.attach(tiny_llama(), lf.AdapterConfig(target_modules=["mlp"]))


@pytest.mark.parametrize("kw", [{"rank": 0}, {"alpha": -1.0}, {"dropout": 1.0}, {"init": "xavier"},
                                {"target_modules": "([bad"}, {"target_modules": []}])
def test_invalid_config_values(kw):
    with pytest.raises(lf.AdapterError):
        lf.AdapterConfig(**kw)


def test_double_attach_refused():
    model = lf.attach(tiny_llama(), lf.AdapterConfig())
    with pytest.raises(lf.AdapterError, match="already carries an adapter"):
        lf.attach(model, lf.AdapterConfig())


def test_adapter_for_another_shape_names_the_key(tmp_path):
    lf.save_adapter(lf.attach(tiny_llama(), lf.AdapterConfig(rank=4)), tmp_path / "a")
    other = tiny_llama()
    other.model.layers[0].self_attn.q_proj = nn.Linear(32, 40, bias=False)  # a different base model
    with pytest.raises(lf.AdapterError, match=r"q_proj\.lora_B\.weight.*shape"):
        lf.load_adapter(other, tmp_path / "a")
    assert not lf.adapter_layers(other)  # nothing half-attached stays behind


def test_non_finite_adapter_refused(tmp_path):
    model = random_adapter(tiny_llama())
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.lora_A.weight[0, 0] = float("nan")
    lf.save_adapter(model, tmp_path / "a")
    with pytest.raises(lf.AdapterError, match="up_proj.lora_A.weight.*NaN"):
        lf.load_adapter(tiny_llama(), tmp_path / "a")


def test_missing_files_and_bad_json(tmp_path):
    with pytest.raises(lf.AdapterError, match="no adapter_config.json"):
        lf.load_adapter(tiny_llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(lf.AdapterError, match="not valid JSON"):
        lf.load_adapter(tiny_llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    with pytest.raises(lf.AdapterError, match="safetensors"):
        lf.load_adapter(tiny_llama(), tmp_path)


def test_failed_save_keeps_the_previous_adapter(tmp_path, monkeypatch):
    model = random_adapter(tiny_llama())
    lf.save_adapter(model, tmp_path / "a")
    before = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("loraforge.adapters.io.save_file", crash)
    with pytest.raises(lf.LoraforgeError, match=r"could not write .*a: disk full; the previous a is unchanged"):
        lf.save_adapter(model, tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temp folders left
