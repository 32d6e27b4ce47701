"""RandLoRA: the checks of shared/methods/randlora.md, PEFT parity from the same key, the shared checks
(RandLoRA has its own attach hook, so test_methods_common's table leaves it out)."""

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from peft import RandLoraConfig, get_peft_model
from test_methods_common import (
    MODELS,
    check_attach,
    check_gradient_matches_dense,
    check_loss_decreases,
    check_merge,
    check_param_count,
    check_save_load,
    copy_into_peft,
    logits,
    perturb,
)
from torch import nn

import loraforge as lf
from loraforge.methods.randlora import RandLoRALinear, RandomBases
from loraforge.testing import assert_same_outputs, tiny_llama

OPTIONS = [{}, {"sparse": True}, {"very_sparse": True, "projection_prng_key": 3}]


def rand_config(**kw) -> lf.AdapterConfig:
    return lf.AdapterConfig(**{"method": "randlora", "rank": 4, "alpha": 80, "seed": 1, **kw})


def random_layer(d_in: int = 64, d_out: int = 64, rank: int = 4) -> RandLoRALinear:
    torch.manual_seed(0)
    layer = RandLoRALinear(nn.Linear(d_in, d_out), rand_config(rank=rank, alpha=rank, init="random"), "x")  # s = 1
    with torch.no_grad():
        layer.randlora_gamma.normal_(std=1 / 64)
    return layer


def paper_delta(layer: RandLoRALinear) -> torch.Tensor:
    """s sum_i B_i diag(lambda_i) A diag(gamma_i), basis by basis (D x m), then as d_out x d_in."""
    a = layer.bases.A[:, : layer.small]
    b_flat = layer.bases.B[: layer.big, : layer.n_bases].flatten(1)
    delta = sum(b_flat[:, i::layer.n_bases] @ torch.diag(layer.randlora_lambda[:, i]) @ a @ torch.diag(layer.randlora_gamma[i])
                for i in range(layer.n_bases))
    delta = layer.scaling * delta
    return delta if layer.in_features == layer.small else delta.T


@pytest.mark.parametrize("name", MODELS)
def test_shared_checks(name, tmp_path):
    make = MODELS[name]
    check_attach(rand_config(), make)
    check_save_load(rand_config(), make, tmp_path)
    check_merge(rand_config(), make)
    check_loss_decreases(rand_config(), make)


@pytest.mark.parametrize("name", MODELS)
def test_init_equals_base(name):
    model = MODELS[name]()
    before = logits(model)
    lf.attach(model, rand_config())
    assert torch.equal(logits(model), before)


def test_trainable_parameter_count():
    method = lf.get_method("randlora")
    assert method.trainable_params(64, 64, rand_config()) == 16 * 4 + 16 * 64 == 1088
    assert method.trainable_params(128, 64, rand_config(rank=8)) == 8 * 8 + 8 * 64 == 576
    check_param_count(rand_config())
    model = lf.attach(tiny_llama(), rand_config(target_modules=["q_proj", "k_proj"]))
    assert lf.trainable_parameters(model) == 2 * ((8 * 4 + 8 * 32) + (4 * 4 + 4 * 16))


@pytest.mark.parametrize("d_in, d_out", [(64, 40), (40, 64)])
def test_two_matmul_forward_equals_the_paper_sum(d_in, d_out):
    layer = random_layer(d_in, d_out)
    x = torch.randn(3, 5, d_in)
    with torch.no_grad():
        delta = paper_delta(layer)
        torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ delta.T, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.delta_weight(), delta, atol=1e-5, rtol=0)


def test_update_is_full_rank_where_lora_of_the_same_budget_is_not():
    layer = random_layer()
    with torch.no_grad():
        s = torch.linalg.svdvals(layer.delta_weight())
    assert int((s > 1e-6 * s.max()).sum()) == 64
    lora_rank = 1088 // (64 + 64)  # the LoRA rank the same 1088 numbers buy
    torch.manual_seed(0)
    b, a = torch.randn(64, lora_rank), torch.randn(lora_rank, 64)
    assert torch.linalg.matrix_rank(b @ a) <= 8


def test_bases_are_deterministic_per_key():
    first, again = RandomBases(rand_config(), 64, 32, "cpu"), RandomBases(rand_config(), 64, 32, "cpu")
    assert torch.equal(first.A, again.A) and torch.equal(first.B, again.B)
    other = RandomBases(rand_config(options={"projection_prng_key": 1}), 64, 32, "cpu")
    assert not torch.equal(first.A, other.A) and not torch.equal(first.B, other.B)
    assert first.A.std().item() == pytest.approx(1, abs=0.02) and first.B.std().item() == pytest.approx(1, abs=0.02)


def test_layers_share_slices_of_the_largest_bases():
    model = lf.attach(tiny_llama(), rand_config())
    layers = list(lf.adapter_layers(model).values())
    shared = layers[0].bases
    assert all(layer.bases is shared for layer in layers)
    largest = RandomBases(rand_config(), 64, 64, "cpu")  # gate/up (64 x 32), down (32 x 64): D = m = 64
    assert torch.equal(shared.A, largest.A) and torch.equal(shared.B, largest.B)
    k_proj = model.model.layers[0].self_attn.k_proj  # 16 x 32: m = 16, D = 32, n = 4
    assert k_proj.bases.A[:, :16].data_ptr() == shared.A.data_ptr()  # a view, not a copy
    assert not any("bases" in key for key in lf.adapter_state_dict(model))  # rebuilt from the key on load


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("name", MODELS)
def test_same_key_gives_peft_bases_and_outputs(name, options):
    ours = perturb(lf.attach(MODELS[name](), rand_config(options=options)))
    targets = sorted({t.rsplit(".", 1)[-1] for t in ours.loraforge_targets})
    theirs = get_peft_model(MODELS[name](), RandLoraConfig(r=4, randlora_alpha=80, target_modules=targets, **options))
    shared = next(iter(lf.adapter_layers(ours).values())).bases
    assert torch.equal(theirs.base_model.randlora_A["default"][:, 0], shared.A)
    assert torch.equal(theirs.base_model.randlora_B["default"], shared.B)
    copy_into_peft(ours, theirs, "randlora_")
    assert_same_outputs(ours, theirs, logits)


def test_init_values_follow_peft():
    layer = RandLoRALinear(nn.Linear(32, 16), rand_config(), "x")  # m = 16, n = 4
    assert torch.count_nonzero(layer.randlora_lambda) == 0
    assert torch.all(layer.randlora_gamma == 1 / 16)  # 1 / max(n, m), PEFT's init_weights=True


def test_gradient_matches_dense_autograd():
    layer = random_layer(24, 16).double()
    layer.bases.double()
    x = torch.randn(3, 24, dtype=torch.double)

    def dense(lam, gamma):
        a, b_flat = layer.bases.A[:, :16], layer.bases.B[:24, : layer.n_bases].flatten(1)
        delta = sum(b_flat[:, i::layer.n_bases] @ torch.diag(lam[:, i]) @ a @ torch.diag(gamma[i]) for i in range(layer.n_bases))
        return F.linear(x, layer.base_layer.weight + layer.scaling * delta.T, layer.base_layer.bias)

    check_gradient_matches_dense(layer, [layer.randlora_lambda, layer.randlora_gamma], dense, x)


def test_saved_adapter_holds_only_the_scalings(tmp_path):
    lf.save_adapter(lf.attach(tiny_llama(), rand_config()), tmp_path / "a")
    keys = safetensors.torch.load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert keys and all(k.endswith(("randlora_lambda", "randlora_gamma")) for k in keys)
    assert len(keys) == 2 * 14  # lambda and gamma of 2 layers x 7 projections


@pytest.mark.parametrize("kw, message", [
    ({"options": {"key": 1}}, "unknown option"),
    ({"options": {"projection_prng_key": -1}}, "integer >= 0"),
    ({"options": {"sparse": "yes"}}, "true or false"),
    ({"options": {"sparse": True, "very_sparse": True}}, "at most one"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ({"use_rslora": True}, "use_rslora"),
])
def test_bad_config(kw, message):
    with pytest.raises(lf.AdapterError, match=message):
        lf.attach(tiny_llama(), rand_config(**kw))


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("name", MODELS)
def test_peft_loads_the_saved_adapter(name, options, tmp_path):
    """The folder is a PEFT RANDLORA adapter: PEFT rebuilds the bases from the key and gives our outputs."""
    from peft import PeftModel

    ours = perturb(lf.attach(MODELS[name](), rand_config(dropout=0.1, options=options))).eval()
    lf.save_adapter(ours, tmp_path / "a")
    theirs = PeftModel.from_pretrained(MODELS[name](), tmp_path / "a").eval()
    config = theirs.peft_config["default"]
    assert (config.r, config.randlora_alpha, config.randlora_dropout) == (4, 80, 0.1)
    assert not config.save_projection and all(getattr(config, k) == v for k, v in options.items())
    assert_same_outputs(ours, theirs, logits)
