"""LoRA-GA: the checks of shared/methods/lora-ga.md, the start against an independently computed
gradient's SVD, and PEFT's directions."""

import pytest
import torch
from peft import LoraConfig, LoraGAConfig, get_peft_model
from peft.tuners.lora.loraga import preprocess_loraga
from torch import nn

import loraforge as lf
from loraforge.methods.init.lora_ga import lora_ga_start
from loraforge.methods.init.residual import ResidualLoRALinear
from loraforge.methods.lora import LoRALinear
from loraforge.testing import tiny_llama, tiny_tokenizer
from loraforge.training.data import BatchPlan, collate, from_records

R = 4


def best_rank(matrix: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix)
    return u[:, :k] @ torch.diag(s[:k]) @ vh[:k]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


def aligned(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """b's rows with the sign that matches a's (singular vectors are unique up to sign)."""
    return b * torch.sign((a * b).sum(1, keepdim=True))


def toy_gradient(d_out: int = 16, d_in: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d_out, d_out, generator=g))
    v, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g))
    k = min(d_out, d_in)
    return u[:, :k] @ torch.diag(0.8 ** torch.arange(k, dtype=torch.float32)) @ v[:, :k].T


def test_factors_are_scaled_orthonormal_singular_vectors():
    grad = toy_gradient()  # 16 x 16: q = min(4r, 16) is the whole spectrum, the SVD is exact
    a, b = lora_ga_start(grad, R)
    c2 = 16 ** 0.5 / 16  # c = d_out^(1/4) / sqrt(16)
    torch.testing.assert_close(a @ a.T, c2 * torch.eye(R), atol=1e-5, rtol=0)
    torch.testing.assert_close(b.T @ b, c2 * torch.eye(R), atol=1e-5, rtol=0)
    u, _, vh = torch.linalg.svd(grad)
    torch.testing.assert_close(u[:, :R].T @ b, torch.zeros(R, R), atol=1e-4, rtol=0)  # B in directions r+1..2r
    torch.testing.assert_close(a @ vh[R:2 * R].T, torch.zeros(R, R), atol=1e-4, rtol=0)  # A in directions 1..r
    a, b = a / c2 ** 0.5, b / c2 ** 0.5  # the exact first-order identity, before scaling
    torch.testing.assert_close(grad @ a.T @ a + b @ b.T @ grad, best_rank(grad, 2 * R), atol=1e-4, rtol=0)


def test_output_equals_the_base_at_init():
    layer = ResidualLoRALinear(nn.Linear(16, 16), lf.AdapterConfig(rank=R, alpha=8), "x")
    layer.start_at(*lora_ga_start(toy_gradient(), R))
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), layer.base_layer(x))
    torch.testing.assert_close(layer.base_layer.weight - layer.delta_weight(), layer.base_layer.weight
                               - layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
                               + layer.scaling * layer.lora_B0 @ layer.lora_A0, atol=1e-6, rtol=0)


def regression(seed: int = 0):
    """Linear regression d = 64 whose target differs from W0 by a decaying-spectrum update."""
    g = torch.Generator().manual_seed(seed)
    w0 = 0.1 * torch.randn(64, 64, generator=g)
    x = torch.randn(512, 64, generator=g)
    y = x @ (w0 + 2 * toy_gradient(64, 64, seed)).T
    return w0, x, y


def sgd(layer: nn.Module, x, y, lr: float, steps: int) -> float:
    params = [p for p in layer.parameters() if p.requires_grad]
    for _ in range(steps):
        loss = 0.5 * (layer(x) - y).pow(2).sum(1).mean()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, grad in zip(params, grads):
                p.sub_(lr * grad)
    with torch.no_grad():
        return float(0.5 * (layer(x) - y).pow(2).sum(1).mean())


def regression_layers(w0, x, y):
    base = nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        base.weight.copy_(w0)
    w = w0.clone().requires_grad_(True)
    grad = torch.autograd.grad(0.5 * (x @ w.T - y).pow(2).sum(1).mean(), w)[0]  # G = dL/dW0
    cfg = lf.AdapterConfig(rank=R, alpha=8)
    ga = ResidualLoRALinear(base, cfg, "ga").requires_grad_(False)
    ga.start_at(*lora_ga_start(grad, R))
    torch.manual_seed(0)
    plain = LoRALinear(nn.Linear(64, 64, bias=False).requires_grad_(False), cfg, "lora")
    with torch.no_grad():
        plain.base_layer.weight.copy_(w0)
    for layer in (ga, plain):
        layer.lora_A.weight.requires_grad_(True)
        layer.lora_B.weight.requires_grad_(True)
    return grad, ga, plain


def test_first_step_follows_the_best_rank_2r_gradient():
    w0, x, y = regression()
    grad, ga, plain = regression_layers(w0, x, y)
    moves = {}
    for name, layer in (("ga", ga), ("lora", plain)):
        before = layer.delta_weight().detach()
        sgd(layer, x, y, lr=1e-3, steps=1)
        moves[name] = layer.delta_weight().detach() - before
    assert cosine(moves["ga"], -best_rank(grad, 2 * R)) >= 0.9
    assert cosine(moves["ga"], -grad) > cosine(moves["lora"], -grad)


def test_twenty_steps_reach_a_lower_loss_than_lora():
    w0, x, y = regression(1)
    _, ga, plain = regression_layers(w0, x, y)
    assert sgd(ga, x, y, lr=0.05, steps=20) < sgd(plain, x, y, lr=0.05, steps=20)


def llama_data():
    tok = tiny_tokenizer()
    return from_records([{"prompt": f"question {i}", "completion": f"answer {i % 5}"} for i in range(32)], tok)


def independent_gradients(data, batches: int = 3, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """mean over batches of dL/dW0 with Hugging Face's own causal-LM loss, for every Linear."""
    model = tiny_llama().train()
    plan = BatchPlan(len(data), batch_size, seed=0)
    for k in range(batches):
        batch = collate([data[i] for i in plan.indices(k)], pad_id=0)
        model(**batch).loss.backward()
    return {n: m.weight.grad / batches for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}


def test_start_is_the_svd_of_the_data_gradient():
    data = llama_data()
    model = lf.attach(tiny_llama(), lf.AdapterConfig(init="lora-ga", rank=8, alpha=16))
    report = lf.initialize(model, data, batches=3, batch_size=8, progress=False)
    assert report.init == "lora-ga" and report.batches == 3
    for name, grad in independent_gradients(data).items():  # r = 8: q = min(32, d) covers every layer's spectrum
        layer = model.get_submodule(name)
        u, _, vh = torch.linalg.svd(grad)
        c = grad.shape[0] ** 0.25 / 4
        torch.testing.assert_close(layer.lora_A.weight, aligned(layer.lora_A.weight, c * vh[:8]), atol=1e-4, rtol=0)
        torch.testing.assert_close(layer.lora_B.weight.T, aligned(layer.lora_B.weight.T, c * u[:, 8:16].T),
                                   atol=1e-4, rtol=0)


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_directions_equal_peft_lora_ga():
    """PEFT scales B by diag(S[r:2r]) and leaves A unscaled (see init/lora_ga.py); the directions agree."""
    data = llama_data()
    targets = ["q_proj", "k_proj", "down_proj"]
    ours = lf.attach(tiny_llama(), lf.AdapterConfig(init="lora-ga", rank=8, alpha=16, target_modules=targets))
    lf.initialize(ours, data, batches=2, batch_size=8, progress=False)
    peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights="lora_ga",
                             lora_ga_config=LoraGAConfig())
    base = tiny_llama()
    plan = BatchPlan(len(data), 8, seed=0)

    def train_step():
        for k in range(2):
            base(**collate([data[i] for i in plan.indices(k)], pad_id=0)).loss.backward()

    preprocess_loraga(base, peft_config, train_step)
    theirs = get_peft_model(base, peft_config).base_model.model
    for name, layer in lf.adapter_layers(ours).items():
        a, b = theirs.get_submodule(name).lora_A["default"].weight, theirs.get_submodule(name).lora_B["default"].weight
        unit = lambda m: m / m.norm(dim=1, keepdim=True)  # noqa: E731
        torch.testing.assert_close(unit(layer.lora_A.weight), aligned(layer.lora_A.weight, unit(a)), atol=1e-4, rtol=0)
        torch.testing.assert_close(unit(layer.lora_B.weight.T), aligned(layer.lora_B.weight.T, unit(b.T)), atol=1e-4, rtol=0)


def test_rank_too_large_for_the_layer():
    with pytest.raises(lf.AdapterError, match="layer: LoRA-GA takes 2r = 18 singular vectors of a 16 x 16 gradient"):
        lora_ga_start(toy_gradient(), 9)
