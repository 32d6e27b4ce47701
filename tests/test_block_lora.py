"""Block-LoRA: the checks of shared/methods/block-lora.md, gradients, bad input."""

import pytest
import torch
import torch.nn.functional as F
from test_methods_common import MODELS, check_gradient_matches_dense, check_layer_merge, logits
from torch import nn

import loraforge as lf
from loraforge.methods.block_lora import BlockLoRALinear
from loraforge.testing import tiny_llama


def block_config(n_blocks: int = 4, **kw) -> lf.AdapterConfig:
    return lf.AdapterConfig(**{"method": "block-lora", "rank": 4, "alpha": 8, "options": {"n_blocks": n_blocks}, **kw})


def random_layer(d_in: int = 16, d_out: int = 12, n_blocks: int = 4) -> BlockLoRALinear:
    torch.manual_seed(0)
    return BlockLoRALinear(nn.Linear(d_in, d_out), block_config(n_blocks, init="random"), "x")


def explicit_delta(layer: BlockLoRALinear) -> torch.Tensor:
    a_s, b = layer.lora_A.weight, layer.lora_B.weight
    return layer.scaling * b @ torch.cat([a_s] * layer.n_blocks, dim=1)  # s B [A_s, ..., A_s]


@pytest.mark.parametrize("name", MODELS)
def test_init_equals_base(name):
    model = MODELS[name]()
    before = logits(model)
    lf.attach(model, block_config(seed=0))
    assert torch.equal(logits(model), before)


def test_trainable_parameter_count():
    assert lf.get_method("block-lora").trainable_params(64, 64, block_config(4)) == 4 * 64 + 4 * 16
    assert lf.get_method("lora").trainable_params(64, 64, lf.AdapterConfig(rank=4)) == 512
    model = lf.attach(tiny_llama(), block_config(4, target_modules=["q_proj", "v_proj"]))
    assert lf.trainable_parameters(model) == 2 * (4 * 32 + 4 * 8 + 4 * 16 + 4 * 8)


def test_chunk_sum_forward_equals_explicit_update():
    layer = random_layer()
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ explicit_delta(layer).T, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.delta_weight(), explicit_delta(layer), atol=1e-6, rtol=0)


def test_update_has_rank_r_and_equal_column_blocks():
    layer = random_layer(d_in=32, d_out=24, n_blocks=8)
    with torch.no_grad():
        delta = layer.delta_weight()
    assert torch.linalg.matrix_rank(delta) <= 4
    for block in delta.split(32 // 8, dim=1):
        torch.testing.assert_close(block, delta[:, :4], atol=1e-6, rtol=0)


def test_one_block_is_lora():
    ours = lf.attach(tiny_llama(), block_config(1, init="random", seed=3))
    lora = lf.attach(tiny_llama(), lf.AdapterConfig(rank=4, alpha=8, init="random", seed=3))
    for (k, v), (k2, w) in zip(lf.adapter_state_dict(ours).items(), lf.adapter_state_dict(lora).items()):
        assert k == k2 and torch.equal(v, w)  # same draws, in LoRA's order
    assert torch.equal(logits(ours), logits(lora))


def test_merge_equals_unmerged_and_unmerge_restores():
    check_layer_merge(random_layer())


def test_gradient_matches_dense_autograd():
    layer = random_layer().double()
    x = torch.randn(3, 16, dtype=torch.double)

    def dense(a_s, b):
        delta = layer.scaling * b @ torch.cat([a_s] * layer.n_blocks, dim=1)
        return F.linear(x, layer.base_layer.weight + delta, layer.base_layer.bias)

    check_gradient_matches_dense(layer, [layer.lora_A.weight, layer.lora_B.weight], dense, x)


@pytest.mark.parametrize("options, message", [
    ({"n_blocks": 3}, "does not divide d_in"),
    ({"n_blocks": 0}, "positive integer"),
    ({"n_blocks": "8"}, "positive integer"),
    ({"blocks": 8}, "unknown option"),
])
def test_bad_options(options, message):
    with pytest.raises(lf.AdapterError, match=message):
        lf.attach(tiny_llama(), lf.AdapterConfig(method="block-lora", rank=4, options=options))
