"""MixLoRA on non-gated FFNs (issue 19, item 3): BERT's intermediate.dense / output.dense and GPT-2's
c_fc / c_proj, experts on the up and down projections, the router on the FFN input h:

    y = sum_{e in S(h)} w_e (W_d + s B^d_e A^d_e) act((W_u + s B^u_e A^u_e) h + b_u) + b_d
"""

import pytest
import torch

import loraforge as lf
from loraforge.methods.moe import expert_load
from loraforge.methods.moe.mixlora import ExpertDown, MixLoRAFFN
from loraforge.testing import tiny_bert, tiny_gpt2, tiny_tokenizer
from loraforge.training.config import TrainConfig
from loraforge.training.data import from_records
from loraforge.training.loop import train

E, K, R = 4, 2, 2


def config(init: str = "default", **kw) -> lf.AdapterConfig:
    return lf.AdapterConfig(method="mixlora", rank=R, alpha=4, init=init, seed=3, target_modules=["c_attn", "query"],
                            options={"num_experts": E, "top_k": K, "router_init_std": 0.5, **kw})


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(5, 100, (2, 7), generator=torch.Generator().manual_seed(seed))


def ffn_paths(model) -> tuple[str, MixLoRAFFN]:
    return next((n, m) for n, m in model.named_modules() if isinstance(m, MixLoRAFFN))


def naive_ffn(block: MixLoRAFFN, h: torch.Tensor, down_layer, down_experts) -> torch.Tensor:
    """sum_S w_e FFN_e(h), expert by expert with dense weights, before any dropout / LayerNorm."""
    mlp, layout = block.base_layer, block.layout
    h = h.reshape(-1, h.shape[-1])
    _, weights, chosen = block.route(h)
    up, act = getattr(mlp, layout.up), getattr(mlp, layout.act)
    out = torch.zeros(h.shape[0], down_layer(act(up(h[:1]))).shape[-1])
    for j in range(K):
        for e in range(E):
            rows = chosen[:, j] == e
            if rows.any():
                z = act(up(h[rows]) + block.experts[layout.up](h[rows], e))
                y = down_layer(z) + down_experts(z, e)
                out[rows] += weights[rows, j, None] * y
    return out


def layer_io(model, block_name: str):
    """The FFN input of the first layer, captured by a hook."""
    seen = {}

    def keep(module, args, output) -> None:  # returns None: the output stays as it is
        seen.setdefault("h", args[0])

    handle = model.get_submodule(block_name).register_forward_hook(keep)
    with torch.no_grad():
        model(input_ids=ids())
    handle.remove()
    return seen["h"]


@pytest.mark.parametrize("make", [tiny_bert, tiny_gpt2])
def test_at_init_the_model_equals_the_frozen_one(make):
    base = make()
    with torch.no_grad():
        before = base(input_ids=ids()).logits
        model = lf.attach(base, config())
        assert isinstance(ffn_paths(model)[1], MixLoRAFFN)
        torch.testing.assert_close(model(input_ids=ids()).logits, before, atol=1e-5, rtol=0)


def test_gpt2_mixture_equals_the_naive_per_expert_sum():
    model = lf.attach(tiny_gpt2(), config("random"))
    name, block = ffn_paths(model)
    assert name == "transformer.h.0.mlp" and set(block.experts) == {"c_fc", "c_proj"}
    h = layer_io(model, name)
    with torch.no_grad():
        expected = naive_ffn(block, h, block.base_layer.c_proj, block.experts["c_proj"])
        torch.testing.assert_close(block(h).reshape(expected.shape), expected, atol=1e-5, rtol=1e-5)


def test_bert_mixture_equals_the_naive_per_expert_sum():
    model = lf.attach(tiny_bert(), config("random"))
    name, block = ffn_paths(model)
    down = model.get_submodule(name.replace("intermediate", "output.dense"))
    assert name == "bert.encoder.layer.0.intermediate" and isinstance(down, ExpertDown) and set(block.experts) == {"dense"}
    output = model.get_submodule(name.replace("intermediate", "output"))
    h = layer_io(model, name)
    with torch.no_grad():
        ffn = naive_ffn(block, h, down.base_layer, down.experts).reshape(*h.shape[:-1], -1)
        expected = output.LayerNorm(ffn + h)  # eval: dropout is the identity
        torch.testing.assert_close(output(block(h), h), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", [tiny_bert, tiny_gpt2])
def test_gradients_reach_router_and_both_expert_banks_and_count(make):
    model = lf.attach(make(), config("random")).train()
    model(input_ids=ids()).logits.square().mean().backward()
    name, block = ffn_paths(model)
    banks = list(block.experts.values())
    down = model.get_submodule(name.replace("intermediate", "output.dense")) if name.endswith("intermediate") else None
    banks += [down.experts] if down is not None else []
    assert len(banks) == 2 and block.router.weight.grad.abs().sum() > 0
    for bank in banks:
        assert bank.lora_A.grad.abs().sum() > 0 and bank.lora_B.grad.abs().sum() > 0
    d, d_ff = block.in_features, banks[0].lora_B.shape[1]
    ffn_params = block.router.weight.numel() + sum(b.lora_A.numel() + b.lora_B.numel() for b in banks)
    assert ffn_params == E * d + 2 * E * R * (d + d_ff)  # router + up and down banks


@pytest.mark.parametrize("make", [tiny_bert, tiny_gpt2])
def test_save_reload_and_detach(make, tmp_path):
    model = lf.attach(make(), config("random"))
    lf.save_adapter(model, tmp_path / "a")
    loaded = lf.load_adapter(make(), tmp_path / "a")
    assert set(lf.adapter_state_dict(loaded)) == set(lf.adapter_state_dict(model))
    with torch.no_grad():
        adapted = model(input_ids=ids(1)).logits
        assert torch.equal(loaded(input_ids=ids(1)).logits, adapted)
        base = make()(input_ids=ids(1)).logits
        assert not torch.allclose(adapted, base, atol=1e-4)
        with lf.adapter_disabled(model):
            torch.testing.assert_close(model(input_ids=ids(1)).logits, base, atol=1e-6, rtol=0)
        lf.detach(model)
        torch.testing.assert_close(model(input_ids=ids(1)).logits, base, atol=1e-6, rtol=0)
    assert not lf.adapter_layers(model)


def test_gpt2_mixlora_trains_with_the_load_balance_loss(tmp_path):
    # The tiny GPT-2 learns slowly under any adapter: the bar is plain LoRA on the same FFN projections.
    tok = tiny_tokenizer()
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} + {i} = {2 * i}"}]} for i in range(16)]
    results = {method: train(TrainConfig(out=str(tmp_path / method), method=method, rank=4, alpha=8, steps=30, lr=1e-2,
                                         batch_size=4, targets=targets, precision="fp32"),
                             model=tiny_gpt2(), tokenizer=tok, train_data=from_records(rows, tok, max_length=48),
                             progress=False)
               for method, targets in (("mixlora", "c_attn"), ("lora", "c_attn,c_fc,c_proj"))}
    mix = results["mixlora"]
    assert mix.loss_reduction > 0.03 and mix.loss_reduction >= results["lora"].loss_reduction
    assert all(0 < row["aux_loss"] < 0.01 * 8 for row in mix.history if "loss" in row)
    assert sum(expert_load(mix.model)["transformer.h.0.mlp"]) > 0
