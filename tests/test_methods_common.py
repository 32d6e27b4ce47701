"""The shared checks, run for every registered per-layer method on tiny LLaMA and GPT-2 (Conv1D).

A method gets these by registering; its own file tests its paper's equations and spec checks.
Methods with their own `attach` hook (block-level, or sharing tensors across layers) are left
out of the table; their test files call the `check_*` functions below directly.
"""

import json

import pytest
import torch
from torch import nn

import loraforge as lf
from loraforge.testing import tiny_gpt2, tiny_llama

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
PER_LAYER = [m.name for m in lf.methods() if m.attach is None]


def config(method: str, **kw) -> lf.AdapterConfig:
    return lf.AdapterConfig(**{"method": method, "rank": 4, "alpha": 8, "seed": 1, **kw})


def batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (2, 9), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch()).logits


def perturb(model: nn.Module, scale: float = 0.05, seed: int = 0) -> nn.Module:
    """Move every trainable tensor off its init (fixed seed), so that the update is not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def check_attach(cfg: lf.AdapterConfig, make) -> None:
    base = make()
    model = lf.attach(make(), cfg)
    assert lf.adapter_layers(model) and lf.trainable_parameters(model) > 0
    base_names = {n for n, _ in base.named_parameters()}
    for name, p in model.named_parameters():
        assert not (p.requires_grad and name.replace(".base_layer", "") in base_names), name
    assert logits(model).shape == logits(base).shape


def check_save_load(cfg: lf.AdapterConfig, make, tmp_path) -> None:
    model = perturb(lf.attach(make(), cfg))
    lf.save_adapter(model, tmp_path / "adapter")
    assert torch.equal(logits(lf.load_adapter(make(), tmp_path / "adapter")), logits(model))


def check_merge(cfg: lf.AdapterConfig, make) -> None:
    model = perturb(lf.attach(make(), cfg))
    unmerged = logits(model)
    lf.merge(model)
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=0)
    lf.unmerge(model)
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=0)
    lf.detach(model)
    for (name, p), (_, p0) in zip(model.named_parameters(), make().named_parameters()):
        torch.testing.assert_close(p, p0, atol=1e-5, rtol=0, msg=name)


def check_layer_merge(layer: nn.Module) -> None:
    """One layer: merging keeps its output and unmerging gives W0 back."""
    w0, x = layer.base_layer.weight.detach().clone(), torch.randn(4, layer.in_features)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=0)
        layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, atol=1e-6, rtol=0)


def check_gradient_matches_dense(layer: nn.Module, params: list[nn.Parameter], dense, x: torch.Tensor) -> None:
    """In float64: `dense(*params)`, the layer's output with its update formed explicitly, passes
    gradcheck, and the layer's gradients of a loss equal those autograd takes through `dense`."""
    copies = [p.detach().clone().requires_grad_() for p in params]
    assert torch.autograd.gradcheck(dense, tuple(copies))
    layer(x).pow(2).sum().backward()
    dense(*copies).pow(2).sum().backward()
    for param, copy in zip(params, copies):
        torch.testing.assert_close(param.grad, copy.grad)


def copy_into_peft(ours: nn.Module, theirs: nn.Module, marker: str) -> None:
    """Give PEFT's model (its tensors whose names hold `marker`) our adapter's values, key by key."""
    state = {k.replace(".default", "").removeprefix("base_model.model."): v
             for k, v in theirs.named_parameters() if marker in k}
    with torch.no_grad():
        for key, value in lf.adapter_state_dict(ours).items():
            state[key].copy_(value)


def check_param_count(cfg: lf.AdapterConfig) -> None:
    for d_in, d_out in [(32, 48), (48, 32)]:
        model = lf.attach(nn.Sequential(nn.Linear(d_in, d_out)), cfg)
        assert lf.get_method(cfg.method).trainable_params(d_in, d_out, cfg) == lf.trainable_parameters(model)


def check_loss_decreases(cfg: lf.AdapterConfig, make, lr: float = 1e-2) -> None:
    model = lf.attach(make(), cfg).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    data = batch()
    losses = []
    for _ in range(20):
        loss = model(**data, labels=data["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.01, losses


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", PER_LAYER)
def test_attach(method, model):
    check_attach(config(method), MODELS[model])


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", PER_LAYER)
def test_save_load_round_trip_on_fresh_model(method, model, tmp_path):
    check_save_load(config(method), MODELS[model], tmp_path)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", [m for m in PER_LAYER if lf.get_method(m).merges])
def test_merge_equals_unmerged_and_unmerge_restores(method, model):
    check_merge(config(method), MODELS[model])


@pytest.mark.parametrize("method", PER_LAYER)
def test_trainable_params_match_a_wrapped_linear(method):
    check_param_count(config(method))


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", PER_LAYER)
def test_loss_decreases_on_a_fixed_batch(method, model):
    check_loss_decreases(config(method), MODELS[model])


# ---- options and provenance, and the single `extras` dict of earlier files --------------------------

def test_an_old_config_with_extras_loads_options_and_provenance_apart(tmp_path):
    model = perturb(lf.attach(tiny_llama(), config("block-lora", options={"n_blocks": 4},
                                                   provenance={"selection": {"method": "flexora", "layers": [0, 1]}})))
    lf.save_adapter(model, tmp_path / "adapter")
    path = tmp_path / "adapter" / "loraforge_config.json"
    saved = json.loads(path.read_text())
    old = {k: v for k, v in saved.items() if k not in ("options", "provenance")}
    path.write_text(json.dumps(old | {"extras": {"n_blocks": 4, "selection": saved["provenance"]["selection"]}}))
    reloaded = lf.load_adapter(tiny_llama(), tmp_path / "adapter")
    assert reloaded.loraforge_config.options == {"n_blocks": 4}
    assert reloaded.loraforge_config.provenance == {"selection": {"method": "flexora", "layers": [0, 1]}}
    assert torch.equal(logits(reloaded), logits(model))


def test_extras_keys_map_to_provenance_or_options():
    old = {"method": "randlora", "rank": 4, "extras": {
        "projection_prng_key": 3, "sparse": True, "selection": {"method": "diffora"},
        "federated": {"strategy": "fedavg"}, "converted_from": {"method": "lora-xs"}}}
    loaded = lf.AdapterConfig.from_dict(old)
    assert loaded.options == {"projection_prng_key": 3, "sparse": True}
    assert loaded.provenance == {"selection": {"method": "diffora"}, "federated": {"strategy": "fedavg"},
                                 "converted_from": {"method": "lora-xs"}}
    assert lf.AdapterConfig.from_dict(loaded.to_dict()) == loaded
    assert lf.AdapterConfig.from_dict({"method": "lora", "extras": {}}) == lf.AdapterConfig()
    with pytest.raises(lf.AdapterError, match="lora: unknown option 'n_blocks'; lora takes no options"):
        lf.AdapterConfig.from_dict({"method": "lora", "extras": {"n_blocks": 4}})


def test_provenance_is_a_free_record_no_method_reads():
    for method in PER_LAYER:
        assert lf.AdapterConfig(method=method, provenance={"anything": [1, {"at": "all"}]}).provenance


@pytest.mark.parametrize("method, init, options, message", [
    ("bone", "default", {"n_blocks": 4}, "bone: unknown option 'n_blocks'; bone takes no options"),
    ("lora", "pissa", {"eva_rho": 2.0},
     "lora with init 'pissa': unknown option 'eva_rho'; valid options: svd_niter (int | None, default None)"),
    ("lora-sb", "default", {"svd_niter": 2.5}, "option 'svd_niter' must be an integer >= 0, or null, got 2.5"),
    ("lora", "lora-ga", {"lora_ga_gamma": True}, "option 'lora_ga_gamma' must be a number > 0, got True"),
    ("comp-lora", "default", {"k": 2, "sides": "in"}, "unknown option 'sides'; valid options: k (int | None, "
                                                      "default None), side ('both' | 'in' | 'out', default 'both')"),
])
def test_an_option_the_method_or_its_init_does_not_take_is_refused_with_the_valid_ones(method, init, options, message):
    with pytest.raises(lf.AdapterError) as error:
        lf.AdapterConfig(method=method, init=init, options=options)
    assert message in str(error.value)


def test_an_adapter_takes_its_methods_options_and_its_inits():
    config = lf.AdapterConfig(method="lora-xs", options={"svd_niter": 2})  # lora-xs starts from its own SVD
    assert config.options == {"svd_niter": 2}
    lf.AdapterConfig(init="eva", options={"eva_rho": 1, "eva_tau": 0.9})  # an int is a fine float


def test_tensors_replaced_puts_parameters_and_buffers_back_whatever_happens():
    from loraforge.adapters.inject import tensors_replaced

    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    weight, mean = model[0].weight, model[1].running_mean
    stand_in = (weight * 2).detach().requires_grad_()
    with tensors_replaced(model, {"0.weight": stand_in * 1.0, "1.running_mean": torch.ones(2)}):
        assert model[0].weight is not weight and torch.equal(model[1].running_mean, torch.ones(2))
        model.eval()
        loss = model(torch.ones(1, 3)).sum()
    assert loss.grad_fn is not None and torch.autograd.grad(loss, stand_in)[0].abs().sum() > 0  # differentiable in it
    assert model[0].weight is weight and model[1].running_mean is mean
    with pytest.raises(RuntimeError, match="inside"), tensors_replaced(model, {"0.bias": torch.zeros(2)}):
        raise RuntimeError("inside")
    assert isinstance(model[0].bias, nn.Parameter)
    with pytest.raises(lf.AdapterError, match="neither a parameter nor a buffer"):
        with tensors_replaced(model, {"0.weight": torch.zeros(2, 3), "0.nothing": torch.zeros(1)}):
            pass
    assert model[0].weight is weight  # the slots filled before the bad key are restored too
