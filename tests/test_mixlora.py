"""MixLoRA: the checks of shared/methods/mixlora.md, against a naive expert-by-expert formulation."""

import json
import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

import loraforge as lf
from loraforge.methods.moe import MixLoRAFFN, expert_load
from loraforge.testing import tiny_llama, tiny_tokenizer
from loraforge.training.config import TrainConfig
from loraforge.training.data import from_records
from loraforge.training.loop import train

PROJ = ("gate_proj", "up_proj", "down_proj")


def make_block(d=8, d_ff=16, bias=False, init="random", rank=2, **options) -> MixLoRAFFN:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=d, intermediate_size=d_ff, mlp_bias=bias, num_attention_heads=1)
    mlp = LlamaMLP(config).requires_grad_(False)
    return MixLoRAFFN(mlp, lf.AdapterConfig(method="mixlora", rank=rank, alpha=2 * rank, init=init, options=options), "mlp")


def tokens(n=7, d=8, seed=1) -> torch.Tensor:
    return torch.randn(1, n, d, generator=torch.Generator().manual_seed(seed))  # (1, N, d)


def expert_projection(block: MixLoRAFFN, name: str, e: int, v: torch.Tensor) -> torch.Tensor:
    """(W + s B_e A_e) v + b with the dense d_out x d_in weight of expert e."""
    layer, lora = getattr(block.base_layer, name), block.experts[name]
    return torch.nn.functional.linear(v, layer.weight + lora.scaling * lora.lora_B[e] @ lora.lora_A[e], layer.bias)


def naive(block: MixLoRAFFN, h: torch.Tensor) -> torch.Tensor:
    """y = sum over the chosen e of w_e FFN_e(h), token by token, expert by expert."""
    out = []
    for x in h.reshape(-1, h.shape[-1]):
        top_p, top = torch.softmax(block.router.weight @ x, -1).topk(block.top_k)
        y = 0
        for w, e in zip(top_p / top_p.sum(), top.tolist()):
            z = block.base_layer.act_fn(expert_projection(block, "gate_proj", e, x)) * expert_projection(block, "up_proj", e, x)
            y = y + w * expert_projection(block, "down_proj", e, z)
        out.append(y)
    return torch.stack(out).reshape(h.shape)


@pytest.mark.parametrize("experts,k", [(1, 1), (4, 1), (4, 2), (8, 3), (5, 5)])
def test_each_token_gets_exactly_k_experts_with_weights_summing_to_one(experts, k):
    block = make_block(num_experts=experts, top_k=k, router_init_std=1.0)
    probs, weights, chosen = block.route(tokens(20)[0])
    dense = torch.zeros_like(probs).scatter(1, chosen, weights)  # (N, E)
    assert ((dense > 0).sum(1) == k).all()
    torch.testing.assert_close(dense.sum(1), torch.ones(20), atol=1e-6, rtol=0)
    torch.testing.assert_close(probs.sum(1), torch.ones(20), atol=1e-6, rtol=0)


@pytest.mark.parametrize("experts,k,bias", [(4, 2, False), (4, 1, True), (6, 3, True), (3, 3, False)])
def test_efficient_form_equals_naive_per_expert_sum(experts, k, bias):
    block = make_block(bias=bias, num_experts=experts, top_k=k, router_init_std=1.0)
    h = tokens(9)
    with torch.no_grad():
        torch.testing.assert_close(block(h), naive(block, h), atol=1e-5, rtol=0)


def test_at_init_block_and_model_equal_the_frozen_ffn():
    block = make_block(init="default", router_init_std=3.0)  # any router: the weights sum to 1
    h = tokens()
    with torch.no_grad():
        torch.testing.assert_close(block(h), block.base_layer(h), atol=1e-5, rtol=0)
    model, ids = tiny_llama(), torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        lf.attach(model, lf.AdapterConfig(method="mixlora", rank=4, seed=0))
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-5, rtol=0)
    router = model.model.layers[0].mlp.router.weight
    assert 0.015 < router.std().item() < 0.025 and router.requires_grad


def cyclic_routing_block(norm: str) -> tuple[MixLoRAFFN, torch.Tensor]:
    # E = d = 4, G = 4 I, token i = e_i + e_{i+1}/2: choices (i, i+1), each slot uses every expert
    # once, and the probabilities are cyclic shifts of one vector, so P_e = 1/E: perfectly balanced.
    block = make_block(d=4, num_experts=4, top_k=2, aux_loss_coef=1.0, aux_norm=norm).train()
    with torch.no_grad():
        block.router.weight.copy_(4 * torch.eye(4))
    return block, (torch.eye(4) + 0.5 * torch.eye(4).roll(1, dims=1))[None]  # (1, 4, 4)


@pytest.mark.parametrize("norm,balanced", [("mixtral", 2.0), ("switch", 1.0)])
def test_aux_loss_is_k_or_1_when_balanced_larger_when_collapsed_with_router_gradient(norm, balanced):
    block, h = cyclic_routing_block(norm)
    block(h)
    torch.testing.assert_close(block.aux_loss.item(), balanced, atol=1e-6, rtol=0)
    block(torch.eye(4)[:1].repeat(4, 1)[None])  # every token's first choice is expert 0
    assert block.aux_loss.item() > balanced + 0.5
    block.aux_loss.backward()
    assert block.router.weight.grad.abs().sum() > 0


def test_aux_loss_matches_hand_computation():
    block = make_block(d=3, num_experts=3, top_k=2, aux_loss_coef=1.0).train()
    with torch.no_grad():
        block.router.weight.copy_(torch.eye(3))  # logits = h
    block(torch.tensor([[[1.0, 0.0, -1.0], [0.0, 2.0, 1.0]]]))
    p1 = [math.exp(v) / (math.e + 1 + math.exp(-1)) for v in (1, 0, -1)]  # choices 0, 1
    p2 = [math.exp(v) / (1 + math.exp(2) + math.e) for v in (0, 2, 1)]  # choices 1, 2
    P = [(a + b) / 2 for a, b in zip(p1, p2)]
    f = [[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]]  # share of first / second choices per expert
    expected = 3 * sum(f[j][e] * P[e] for j in range(2) for e in range(3))
    torch.testing.assert_close(block.aux_loss.item(), expected, atol=1e-6, rtol=0)


def test_aux_loss_pools_all_layers_and_leaves_padding_out():
    model = lf.attach(tiny_llama(), lf.AdapterConfig(method="mixlora", rank=4, seed=0, init="random",
                                                     options={"num_experts": 4, "aux_loss_coef": 1.0})).train()
    logits = []
    for layer in model.model.layers:
        layer.mlp.router.register_forward_hook(lambda m, i, o: logits.append(o.detach()))
    ids = torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    model(input_ids=ids, attention_mask=mask)
    aux = model.model.layers[0].mlp.aux_loss
    assert all(getattr(layer.mlp, "aux_loss", None) is None for layer in model.model.layers[1:])

    def pooled(real: torch.Tensor) -> torch.Tensor:
        probs = torch.cat([lg[real] for lg in logits]).softmax(-1)  # (layers x real tokens, E)
        f = torch.nn.functional.one_hot(probs.topk(2).indices, 4).float().mean(0)  # (k, E)
        return 4 * (f * probs.mean(0)).sum()

    torch.testing.assert_close(aux, pooled(mask.flatten().bool()), atol=1e-6, rtol=0)
    assert abs(aux.item() - pooled(torch.ones(18, dtype=torch.bool)).item()) > 1e-4  # padding did matter
    loads = expert_load(model)
    assert list(loads) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(load.sum().item() == 2 * 15 for load in loads.values())  # k x real tokens
    expert_load(model, reset=True)
    assert all(load.sum() == 0 for load in expert_load(model).values())


def test_trainable_parameters_match_the_spec_formula():
    block = make_block(d=64, d_ff=128, num_experts=4, rank=2)
    assert sum(p.numel() for p in block.parameters() if p.requires_grad) == 4 * 64 + 4 * 2 * 3 * (64 + 128) == 4864
    config = lf.AdapterConfig(method="mixlora", rank=2, options={"num_experts": 4})
    assert lf.get_method("mixlora").trainable_params(64, 128, config) == 4 * 2 * (64 + 128)  # one projection's bank
    model = lf.attach(tiny_llama(), lf.AdapterConfig(method="mixlora", rank=4))  # d 32, d_ff 64, E 8, all-linear
    ffn, attention = 8 * 32 + 8 * 4 * 3 * (32 + 64), 4 * ((32 + 32) + 2 * (32 + 16) + (32 + 32))
    assert lf.trainable_parameters(model) == 2 * (ffn + attention)


def test_one_expert_top_1_is_lora_on_gate_up_down():
    ffn_only = ["gate_proj", "up_proj", "down_proj"]
    lora = lf.attach(tiny_llama(), lf.AdapterConfig(rank=4, alpha=8, init="random", seed=1, target_modules=ffn_only))
    mix = lf.attach(tiny_llama(), lf.AdapterConfig(method="mixlora", rank=4, alpha=8, target_modules=ffn_only,
                                                   options={"num_experts": 1, "top_k": 1}))
    with torch.no_grad():
        for i, layer in enumerate(mix.model.layers):
            for p in PROJ:
                source = getattr(lora.model.layers[i].mlp, p)
                layer.mlp.experts[p].lora_A[0] = source.lora_A.weight
                layer.mlp.experts[p].lora_B[0] = source.lora_B.weight
        ids = torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(mix(input_ids=ids).logits, lora(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_gradients_reach_only_the_chosen_experts():
    block = make_block(num_experts=4, top_k=2, router_init_std=1.0)
    h = tokens(1)
    chosen = set(block.route(h[0])[2][0].tolist())
    block(h).square().sum().backward()
    for e in range(4):
        for p in PROJ:
            for t in (block.experts[p].lora_A, block.experts[p].lora_B):
                assert (t.grad[e].abs().sum() > 0) == (e in chosen)


def test_gradients_equal_autograd_of_the_naive_form():
    block = make_block(bias=True, num_experts=4, top_k=2, router_init_std=1.0)
    h, target = tokens(6), tokens(6, seed=2)
    params = [block.router.weight] + [t for p in PROJ for t in (block.experts[p].lora_A, block.experts[p].lora_B)]
    ours = torch.autograd.grad((block(h) * target).sum(), params)
    reference = torch.autograd.grad((naive(block, h) * target).sum(), params)
    for a, b in zip(ours, reference):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip_on_a_fresh_model(tmp_path):
    config = lf.AdapterConfig(method="mixlora", rank=4, init="random", seed=2, target_modules=["q_proj", "v_proj"],
                              options={"num_experts": 4, "top_k": 1, "router_init_std": 0.5})
    model = lf.attach(tiny_llama(), config)
    lf.save_adapter(model, tmp_path / "a")
    loaded = lf.load_adapter(tiny_llama(), tmp_path / "a")
    assert loaded.model.layers[1].mlp.top_k == 1 and loaded.model.layers[1].mlp.num_experts == 4
    assert set(lf.adapter_state_dict(loaded)) == set(lf.adapter_state_dict(model))
    ids = torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_disable_merge_and_detach_leave_the_base_model():
    model, ids = tiny_llama(), torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(input_ids=ids).logits
        lf.attach(model, lf.AdapterConfig(method="mixlora", rank=4, init="random", seed=0))
        adapted = model(input_ids=ids).logits
        assert not torch.allclose(adapted, base, atol=1e-3)
        with lf.adapter_disabled(model):
            assert torch.equal(model(input_ids=ids).logits, base)
        lf.merge(model)  # attention LoRA folds in, the mixture stays as it is
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, atol=1e-5, rtol=0)
        with pytest.raises(lf.AdapterError, match="does not merge"):
            lf.merge_and_unload(model)
        lf.detach(model)
        torch.testing.assert_close(model(input_ids=ids).logits, base, atol=1e-5, rtol=0)
    assert isinstance(model.model.layers[0].mlp, LlamaMLP) and not lf.adapter_layers(model)


def test_twenty_training_steps_lower_the_loss_and_log_aux_loss(tmp_path):
    tok = tiny_tokenizer()
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"## Sum\n- {i} + {i} = {2 * i}"}]} for i in range(16)]
    result = train(TrainConfig(out=str(tmp_path / "run"), method="mixlora", rank=4, alpha=8, steps=20, lr=3e-2,
                               batch_size=4), model=tiny_llama(), tokenizer=tok,
                   train_data=from_records(rows, tok, max_length=64), progress=False)
    assert result.loss_reduction > 0.3
    logged = [json.loads(line) for line in (result.out / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < row["aux_loss"] < 0.01 * 8 for row in logged)  # c L_aux, L_aux in [~k, E]
    assert sum(expert_load(result.model)["model.layers.0.mlp"]) > 0


@pytest.mark.parametrize("make,options,message", [
    (lambda: torch.nn.Sequential(torch.nn.Linear(8, 8)), {}, "needs FFNs it knows"),
    (tiny_llama, {"top_k": 9}, "top_k"),
    (tiny_llama, {"num_experts": 0}, "num_experts"),
    (tiny_llama, {"num_experts": "8"}, "num_experts"),
    (tiny_llama, {"aux_norm": "gshard"}, "aux_norm"),
    (tiny_llama, {"router_init_std": 0}, "router_init_std"),
    (tiny_llama, {"experts": 4}, "unknown option"),
])
def test_bad_input_is_refused_before_anything_is_wrapped(make, options, message):
    model = make()
    with pytest.raises(lf.AdapterError, match=message):
        lf.attach(model, lf.AdapterConfig(method="mixlora", options=options))
    assert not lf.adapter_layers(model)
