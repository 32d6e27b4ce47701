"""Flexora, DiffoRA and CoLoRA (loraforge/select/): the gate, the selection and allocation rules, and a
constructed task whose answer is known: only some blocks' weights need to change."""

import json

import pytest
import torch
from torch import nn

import loraforge as lf
from loraforge.core.plugins import SELECTORS, Component
from loraforge.select import SearchData, gate_adapter
from loraforge.select.colora import allocate_ranks, faig, integrated_gradients
from loraforge.select.diffora import top_modules
from loraforge.select.flexora import search_steps, selected_layers
from loraforge.testing import assert_same_outputs, tiny_llama, tiny_tokenizer
from loraforge.training.config import TrainConfig
from loraforge.training.data import from_records
from loraforge.training.loop import train

D, BLOCKS = 8, 4


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, D, bias=False)


class Toy(nn.Module):
    """y = sum_l proj_l(x_l): block l reads only its own slice of the input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([Block() for _ in range(BLOCKS)])

    def forward(self, x):  # (N, BLOCKS, D) -> (N, D)
        return sum(block.proj(x[:, i]) for i, block in enumerate(self.layers))


def toy_search(changed: list[int], seed: int = 0) -> SearchData:
    """Targets from weights where only the blocks in `changed` moved (by a rank-1 update)."""
    gen = torch.Generator().manual_seed(seed)
    teacher = Toy()
    with torch.no_grad():
        for i in changed:
            teacher.layers[i].proj.weight += 2.0 * torch.randn(D, 1, generator=gen) @ torch.randn(1, D, generator=gen)

    def batch():
        x = torch.randn(256, BLOCKS, D, generator=gen)
        return {"x": x, "y": teacher(x).detach()}

    return SearchData([batch() for _ in range(4)], [batch() for _ in range(2)],
                      lambda model, b: ((model(b["x"]) - b["y"]) ** 2).mean())


def toy_config(**kw):
    return lf.AdapterConfig(**({"rank": 2, "alpha": 2, "target_modules": ["proj"], "seed": 0} | kw))


def test_gate_one_is_the_layer_and_gate_zero_the_base_with_no_adapter_gradient():
    model = lf.attach(Toy(), toy_config(init="random"))
    layer = model.layers[0].proj
    x = torch.randn(5, D)
    plain = layer(x)
    handle = gate_adapter(layer, lambda: torch.tensor(1.0))
    assert torch.equal(layer(x), plain)
    handle.remove()
    handle = gate_adapter(layer, lambda: torch.tensor(0.0))
    out = layer(x)
    assert torch.equal(out, layer.base_layer(x))
    out.sum().backward()
    assert torch.count_nonzero(layer.lora_A.weight.grad) == 0 and torch.count_nonzero(layer.lora_B.weight.grad) == 0
    handle.remove()


def test_flexora_keeps_the_layers_whose_gate_rose():
    assert selected_layers([0.3, -0.1, 0.0, 0.2], [0, 1, 2, 3]) == [0, 3]
    assert selected_layers([-0.3, -0.1, -0.1, -0.2], [0, 1, 2, 3]) == [1]  # none rose: the top one, first on ties


def test_flexora_searches_one_epoch_of_at_most_5000_rows_by_default(tmp_path):
    # The reference (kithib/Flexora, flexora.yaml): max_samples 5000, one epoch, one gate step per LoRA step.
    assert search_steps(60, 4, held_out=True) == 12  # 48 rows searched, 12 held out for the gates
    assert search_steps(60, 4, held_out=False) == 15
    assert search_steps(100_000, 32, held_out=True) == 157  # ceil(5000 / 32)
    tok = tiny_tokenizer()
    data = from_records([{"prompt": f"Q{i}: {i}+{i}?", "completion": f" {2 * i}"} for i in range(60)], tok, max_length=32)
    config = TrainConfig.from_dict(dict(out=str(tmp_path / "run"), select="flexora", rank=4, alpha=8, steps=1, lr=1e-2,
                                        batch_size=4, precision="fp32"))
    result = train(config, model=tiny_llama(), tokenizer=tok, train_data=data, progress=False)
    assert result.model.loraforge_config.provenance["selection"]["search_steps"] == 12
    with pytest.raises(lf.LoraforgeError, match="--select-steps must be 0"):
        SELECTORS.build(Component("flexora", {"select_steps": -1}))


def test_flexora_finds_the_blocks_that_need_to_change():
    model = Toy()
    flexora = SELECTORS.build(Component("flexora", {"select_steps": 60, "select_lr": 0.05}), lr=1e-2)
    flexora.attach(model, toy_config(), toy_search([0, 2]))
    selection = model.loraforge_config.provenance["selection"]
    assert selection["layers"] == [0, 2]
    assert sorted(lf.adapter_layers(model)) == ["layers.0.proj", "layers.2.proj"]
    per_layer = 2 * 2 * D  # A (2 x D) + B (D x 2)
    assert lf.trainable_parameters(model) == 2 * per_layer
    fresh = lf.attach(Toy(), toy_config(target_modules=["layers.0.proj", "layers.2.proj"]))
    for key, value in lf.adapter_state_dict(fresh).items():  # stage 4 starts from a fresh LoRA
        assert torch.equal(lf.adapter_state_dict(model)[key], value)


def test_flexora_unrolled_hypergradient_matches_finite_differences():
    """Spec check 3: d/da L_val(theta - eta grad L_train(theta, a), a), in fp64, against central differences."""
    from loraforge.select import unrolled_gate_grads

    search = toy_search([1, 2])
    search = SearchData([{k: v.double() for k, v in b.items()} for b in search.train],
                        [{k: v.double() for k, v in b.items()} for b in search.val], search.loss)
    model = lf.attach(Toy(), toy_config(init="random")).double()
    weights = [p for p in model.parameters() if p.requires_grad]
    logits = torch.tensor([0.3, -0.2, 0.1, 0.5], dtype=torch.float64, requires_grad=True)
    for i in range(BLOCKS):
        gate_adapter(model.layers[i].proj, lambda i=i: BLOCKS * torch.softmax(logits, 0)[i])
    eta, train_batch, val_batch = 0.05, search.train[0], search.val[0]
    exact = unrolled_gate_grads(model, search, weights, [logits], train_batch, val_batch, eta)[0]

    def unrolled_val_loss(a: torch.Tensor) -> float:
        with torch.no_grad():
            logits.copy_(a)
        grads = torch.autograd.grad(search.loss(model, train_batch), weights)
        start = [w.detach().clone() for w in weights]
        with torch.no_grad():
            for w, g in zip(weights, grads):
                w -= eta * g
            loss = float(search.loss(model, val_batch))
            for w, s in zip(weights, start):
                w.copy_(s)
        return loss

    start, delta = logits.detach().clone(), 1e-5
    numeric = torch.tensor([(unrolled_val_loss(start + delta * e) - unrolled_val_loss(start - delta * e)) / (2 * delta)
                            for e in torch.eye(BLOCKS, dtype=torch.float64)], dtype=torch.float64)
    assert torch.linalg.norm(exact - numeric) < 1e-3 * torch.linalg.norm(numeric)
    first_order = torch.autograd.grad(search.loss(model, val_batch), logits)[0]  # what the unroll adds is not nothing
    assert torch.linalg.norm(first_order - numeric) > 10 * torch.linalg.norm(exact - numeric)


def test_fused_lora_refuses_a_second_derivative_it_would_get_wrong():
    layer = lf.attach(Toy(), toy_config(init="random")).layers[0].proj
    x = torch.randn(3, D, requires_grad=True)
    grad_a = torch.autograd.grad(layer(x).pow(2).sum(), layer.lora_A.weight, create_graph=True)[0]
    with pytest.raises(RuntimeError):
        torch.autograd.grad(grad_a.sum(), layer.lora_B.weight)


def test_flexora_second_order_search_runs_and_selects():
    model = Toy()
    SELECTORS.build(Component("flexora", {"select_steps": 30, "select_lr": 0.05, "select_order": 2}), lr=1e-2).attach(
        model, toy_config(), toy_search([0, 2]))
    assert model.loraforge_config.provenance["selection"]["layers"] == [0, 2]


def test_diffora_keeps_ceil_rho_m_modules_the_ones_that_need_to_change():
    model = Toy()
    SELECTORS.build(Component("diffora", {"diffora_ratio": 0.5, "select_steps": 60, "select_lr": 0.05}), lr=1e-2).attach(
        model, toy_config(), toy_search([1, 3]))
    assert model.loraforge_config.provenance["selection"]["modules"] == ["layers.1.proj", "layers.3.proj"]
    assert lf.trainable_parameters(model) == 2 * (2 * 2 * D)


def test_diffora_weight_sharing_starts_from_the_searched_adapter(monkeypatch):
    import loraforge.select.diffora as diffora

    searched = {}
    real = diffora.gated_search

    def spy(model, *args):
        real(model, *args)
        searched.update({k: v.detach().clone() for k, v in lf.adapter_state_dict(model).items()})

    monkeypatch.setattr(diffora, "gated_search", spy)
    model = Toy()
    diffora = SELECTORS.build(Component("diffora", {"diffora_ratio": 0.25, "select_steps": 5}), lr=1e-2)
    diffora.attach(model, toy_config(), toy_search([1]))
    own = lf.adapter_state_dict(model)
    assert len(own) == 2
    for key, value in own.items():
        assert torch.equal(value, searched[key])


def test_diffora_selection_is_invariant_to_monotone_rescaling():
    logits = {"a": 0.3, "b": -1.0, "c": 0.3, "d": 2.0, "e": 0.1}
    picked = top_modules(logits, 0.5)
    assert picked == ["a", "c", "d"]  # ceil(2.5) = 3; a before c on the tie
    assert top_modules({k: 3 * v + 1 for k, v in logits.items()}, 0.5) == picked
    assert top_modules({k: float(torch.sigmoid(torch.tensor(v))) for k, v in logits.items()}, 0.5) == picked


def test_diffora_gate_gradient_is_s_times_update_inner_product_times_sigmoid_slope():
    model = lf.attach(Toy(), toy_config(init="random", alpha=3))
    layer = model.layers[0].proj
    beta = torch.tensor(0.4, requires_grad=True)
    handle = gate_adapter(layer, lambda: torch.sigmoid(beta))
    x, target = torch.randn(6, D), torch.randn(6, D)
    out = layer(x)
    out.retain_grad()
    ((out - target) ** 2).sum().backward()
    handle.remove()
    s, a, b = layer.scaling, layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    sig = torch.sigmoid(beta.detach())
    manual = s * torch.sum(out.grad * (x @ a.T @ b.T)) * sig * (1 - sig)
    torch.testing.assert_close(beta.grad, manual, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("select", ["flexora", "diffora", "colora"])
def test_trained_adapter_reloads_with_its_selected_structure_in_loraforge_and_peft(tmp_path, select):
    tok = tiny_tokenizer()
    data = from_records([{"prompt": f"Q{i}: {i}+{i}?", "completion": f" {2 * i}"} for i in range(30)], tok, max_length=32)
    config = TrainConfig.from_dict(dict(out=str(tmp_path / select), select=select, select_steps=6, rank=4, alpha=8, steps=3, lr=1e-2,
                         batch_size=4, precision="fp32", diffora_ratio=0.3))
    result = train(config, model=tiny_llama(), tokenizer=tok, train_data=data, progress=False)
    chosen = sorted(lf.adapter_layers(result.model))
    if select == "colora":  # every module, heterogeneous ranks
        ranks = {n: layer.rank for n, layer in lf.adapter_layers(result.model).items()}
        assert len(ranks) == 14 and sum(ranks.values()) == 4 * 14 and len(set(ranks.values())) > 1
    else:
        assert 0 < len(chosen) < 14  # tiny_llama has 2 x 7 linear layers
    saved = json.loads((result.out / "adapter" / "loraforge_config.json").read_text())
    assert saved["provenance"]["selection"]["method"] == select
    reloaded = lf.load_adapter(tiny_llama(), result.out / "adapter")
    assert sorted(lf.adapter_layers(reloaded)) == chosen
    ids = torch.randint(5, 100, (2, 10))

    def logits(model):
        return model(input_ids=ids).logits

    result.model.eval()
    assert_same_outputs(reloaded, result.model, logits)
    peft = pytest.importorskip("peft")
    assert_same_outputs(peft.PeftModel.from_pretrained(tiny_llama(), str(result.out / "adapter")), result.model, logits)


# Methods that refuse what they do not know: a selector's record goes to provenance, not to their options.
OPTIONS = {"bone": {}, "loldu": {}, "block-lora": {"n_blocks": 4}, "randlora": {"projection_prng_key": 3},
           "comp-lora": {"k": 2, "side": "in"}}


def short_selected_run(tmp_path, select: str, method: str):
    tok = tiny_tokenizer()
    data = from_records([{"prompt": f"Q{i}: {i}+{i}?", "completion": f" {2 * i}"} for i in range(12)], tok, max_length=32)
    config = TrainConfig.from_dict(dict(out=str(tmp_path / "run"), method=method, options=OPTIONS[method], select=select,
                         select_steps=2, colora_ig_steps=2, rank=4, alpha=8, steps=2, lr=1e-2, batch_size=4,
                         precision="fp32"))
    return train(config, model=tiny_llama(), tokenizer=tok, train_data=data, progress=False)


@pytest.mark.parametrize("select, method", [(s, m) for s in ("flexora", "diffora", "colora") for m in OPTIONS
                                            if (s, m) != ("colora", "randlora")])
def test_any_selector_composes_with_any_method_and_its_options(tmp_path, select, method):
    result = short_selected_run(tmp_path, select, method)
    saved = lf.AdapterConfig.from_dict(json.loads((result.out / "adapter" / "loraforge_config.json").read_text()))
    assert saved.options == OPTIONS[method] and saved.provenance["selection"]["method"] == select
    reloaded = lf.load_adapter(tiny_llama(), result.out / "adapter")
    assert sorted(lf.adapter_layers(reloaded)) == sorted(lf.adapter_layers(result.model))
    ids = torch.randint(5, 100, (2, 10))
    result.model.eval()
    assert_same_outputs(reloaded, result.model, lambda model: model(input_ids=ids).logits)


def test_colora_refuses_a_method_with_one_rank_for_every_layer_before_its_search(tmp_path, monkeypatch):
    import loraforge.select.colora as colora

    monkeypatch.setattr(colora, "integrated_gradients", lambda *a: pytest.fail("searched before refusing"))
    with pytest.raises(lf.LoraforgeError, match="colora gives each module its own rank, and randlora has one rank"):
        short_selected_run(tmp_path, "colora", "randlora")


def test_colora_integrated_gradients_are_complete():
    search = toy_search([1])
    model = Toy()
    weights = {f"layers.{i}.proj": model.layers[i].proj.weight for i in range(BLOCKS)}
    start = {n: w.detach().clone() for n, w in weights.items()}
    end = {n: w + 0.3 * torch.randn_like(w) for n, w in start.items()}

    def val_loss(values):
        with torch.no_grad():
            for n, w in weights.items():
                w.copy_(values[n])
            loss = sum(search.loss(model, b) for b in search.val) / len(search.val)
            for n, w in weights.items():
                w.copy_(start[n])
        return float(loss)

    exact = val_loss(end) - val_loss(start)
    errors = [abs(sum(float(a.sum()) for a in integrated_gradients(model, weights, start, end, search, n).values()) - exact)
              for n in (8, 64)]
    assert errors[1] < errors[0] / 4 and errors[1] < 0.02 * abs(exact)
    assert all(torch.equal(w, start[n]) for n, w in weights.items())  # left at the start


def test_colora_allocation_rule():
    caps = dict.fromkeys("abcd", 8)
    assert allocate_ranks({"a": 3.0, "b": 1.0, "c": 0.0, "d": 0.0}, 8, caps, 2) == {"a": 4, "b": 2, "c": 1, "d": 1}
    capped = allocate_ranks({"a": 3.0, "b": 1.0, "c": 0.0, "d": 0.0}, 8, caps | {"a": 3}, 2)
    assert capped == {"a": 3, "b": 3, "c": 1, "d": 1}  # what a cannot take goes to the others
    assert allocate_ranks(dict.fromkeys("abcd", 0.0), 8, caps, 2) == dict.fromkeys("abcd", 2)  # no contribution: uniform
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        scores = {k: float(v) for k, v in zip("abcdef", torch.rand(6, generator=gen))}
        ranks = allocate_ranks(scores, 24, dict.fromkeys(scores, 16), 4)
        assert sum(ranks.values()) == 24 and min(ranks.values()) >= 1
        assert all(ranks[x] >= ranks[y] for x in scores for y in scores if scores[x] >= scores[y])  # monotone


def test_colora_faig_counts_filters_by_output_unit():
    attribution = torch.tensor([[1.0, -1.0], [2.0, 1.0]])  # rows cancel / add up
    assert faig(attribution) == 3.0
    assert faig(attribution, fan_in_fan_out=True) == 3.0 + 0.0  # columns: |1 + 2| + |-1 + 1|


def test_colora_gives_the_changed_block_the_largest_rank():
    model = Toy()
    colora = SELECTORS.build(Component("colora", {"select_steps": 30, "colora_ig_steps": 8}), lr=1e-2)
    colora.attach(model, toy_config(rank=2), toy_search([1]))
    selection = model.loraforge_config.provenance["selection"]
    ranks = {n: layer.rank for n, layer in lf.adapter_layers(model).items()}
    assert ranks == selection["ranks"] and sum(ranks.values()) == 2 * BLOCKS
    assert max(ranks, key=ranks.get) == "layers.1.proj" and ranks["layers.1.proj"] > 2
    assert max(selection["contribution"], key=selection["contribution"].get) == "layers.1.proj"
    before = Toy()
    for i in range(BLOCKS):  # the short fine-tune was undone
        assert torch.equal(model.layers[i].proj.base_layer.weight, before.layers[i].proj.weight)


def test_colora_without_fine_tuning_falls_back_to_uniform_ranks():
    model = Toy()
    SELECTORS.build(Component("colora", {"select_steps": 0})).attach(model, toy_config(rank=2), toy_search([1]))
    assert {layer.rank for layer in lf.adapter_layers(model).values()} == {2}
    assert not model.loraforge_config.rank_pattern


@pytest.mark.parametrize("select", ["diffora", "colora"])
def test_resume_reattaches_the_chosen_structure_and_reaches_the_same_weights(tmp_path, monkeypatch, kill_at_step, select):
    from safetensors.torch import load_file

    tok = tiny_tokenizer()
    data = from_records([{"prompt": f"Q{i}: {i}+{i}?", "completion": f" {2 * i}"} for i in range(30)], tok, max_length=32)

    def run(name, **kw):
        config = TrainConfig.from_dict(dict(out=str(tmp_path / name), select=select, select_steps=4, rank=4, alpha=8, steps=6, lr=1e-2,
                             batch_size=4, precision="fp32", diffora_ratio=0.3, **kw))
        return train(config, model=tiny_llama(), tokenizer=tok, train_data=data, progress=False)

    full = run("full")
    with kill_at_step(4):
        run("killed", save_every=2)
    monkeypatch.setattr("loraforge.select.search_data", lambda *a: pytest.fail("a resumed run must not search again"))
    resumed = run("killed", save_every=2, resume=True)
    want = load_file(str(full.out / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(resumed.out / "adapter" / "adapter_model.safetensors"))
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=0)
