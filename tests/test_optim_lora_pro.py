"""LoRA-Pro (loraforge/optim/lora_pro.py) against its closed form, in float64 on one layer whose full
gradient G is obtained by making W0 trainable on the same batch."""

import pytest
import torch
from torch import nn

import loraforge as lf
from loraforge.methods.lora import LoRALinear
from loraforge.optim.lora_pro import adjusted_gradients, equivalent_gradient, solve_sylvester
from loraforge.testing import tiny_llama

M, N, R = 10, 12, 3


def layer_and_grads(zero_b: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(N, M).double(), lf.AdapterConfig(rank=R, alpha=6, init="default" if zero_b else "random"), "l")
    layer.double()
    layer.base_layer.weight.requires_grad_(True)
    x, target = torch.randn(7, N, dtype=torch.float64), torch.randn(7, M, dtype=torch.float64)
    ((layer(x) - target) ** 2).sum().backward()
    a, b = layer.lora_A.weight.detach().clone(), layer.lora_B.weight.detach().clone()  # (r, n), (m, r)
    return layer, a, b, layer.lora_A.weight.grad, layer.lora_B.weight.grad, layer.base_layer.weight.grad


def projection(a, b, g):
    p_b = b @ torch.linalg.inv(b.T @ b) @ b.T  # (m, m)
    p_a = a.T @ torch.linalg.inv(a @ a.T) @ a  # (n, n)
    return p_b @ g + g @ p_a - p_b @ g @ p_a


def test_autograd_gradients_are_the_chain_rule_of_g():
    layer, a, b, g_a, g_b, g = layer_and_grads()
    s = layer.scaling
    torch.testing.assert_close(g_a, s * b.T @ g)
    torch.testing.assert_close(g_b, s * g @ a.T)


@pytest.mark.parametrize("x_mode", ["sylvester", "symmetry", "zero"])
def test_equivalent_gradient_is_the_projection_of_g(x_mode):
    layer, a, b, g_a, g_b, g = layer_and_grads()
    s = layer.scaling
    g_a_star, g_b_star = adjusted_gradients(a, b, g_a, g_b, s, x_mode)
    torch.testing.assert_close(equivalent_gradient(a, b, g_a_star, g_b_star, s), projection(a, b, g), atol=1e-5, rtol=0)


def test_equivalent_gradient_is_optimal_and_its_residual_orthogonal():
    layer, a, b, g_a, g_b, g = layer_and_grads()
    s = layer.scaling
    best = equivalent_gradient(a, b, *adjusted_gradients(a, b, g_a, g_b, s), s)
    error = torch.linalg.norm(best - g)
    assert error <= torch.linalg.norm(equivalent_gradient(a, b, g_a, g_b, s) - g)  # plain LoRA's
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        y, z = torch.randn(R, N, generator=gen, dtype=torch.float64), torch.randn(M, R, generator=gen, dtype=torch.float64)
        assert error <= torch.linalg.norm(equivalent_gradient(a, b, y, z, s) - g)
        assert abs(torch.sum((g - best) * (b @ y + z @ a))) < 1e-8 * torch.linalg.norm(g) * torch.linalg.norm(b @ y + z @ a)


def test_sylvester_x_solves_its_equation_and_is_closest_to_the_raw_gradients():
    layer, a, b, g_a, g_b, _ = layer_and_grads()
    s = layer.scaling
    p = torch.linalg.pinv(b.T @ b + 1e-8 * torch.eye(R, dtype=torch.float64))
    c = -(p @ g_a @ a.T) / s**2
    x = solve_sylvester(b.T @ b, a @ a.T, c)
    residual = b.T @ b @ x + x @ a @ a.T - c
    assert torch.linalg.norm(residual) < 1e-6 * torch.linalg.norm(c)
    base_a, base_b = adjusted_gradients(a, b, g_a, g_b, s, "zero")

    def distance(x):  # ||g_A*(X) - g_A||^2 + ||g_B*(X) - g_B||^2
        return torch.sum((base_a + x @ a - g_a) ** 2) + torch.sum((base_b - b @ x - g_b) ** 2)

    g_a_star, g_b_star = adjusted_gradients(a, b, g_a, g_b, s, "sylvester")
    torch.testing.assert_close(g_a_star, base_a + x @ a)
    best = distance(x)
    for seed in range(5):
        bump = 1e-3 * torch.randn(R, R, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        assert distance(x + bump) > best


def test_gradient_in_the_tangent_space_comes_back_unchanged():
    _, a, b, _, _, _ = layer_and_grads()
    gen = torch.Generator().manual_seed(3)
    g = b @ torch.randn(R, N, generator=gen, dtype=torch.float64) + torch.randn(M, R, generator=gen, dtype=torch.float64) @ a
    s = 2.0
    g_a_star, g_b_star = adjusted_gradients(a, b, s * b.T @ g, s * g @ a.T, s)
    torch.testing.assert_close(equivalent_gradient(a, b, g_a_star, g_b_star, s), g, atol=1e-6, rtol=0)


def test_zero_b_start_is_finite_and_moves_only_b():
    layer, a, b, g_a, g_b, g = layer_and_grads(zero_b=True)
    s = layer.scaling
    assert torch.count_nonzero(b) == 0 and torch.count_nonzero(g_a) == 0
    g_a_star, g_b_star = adjusted_gradients(a, b, g_a, g_b, s)
    assert torch.count_nonzero(g_a_star) == 0
    torch.testing.assert_close(g_b_star, g_b @ torch.linalg.inv(a @ a.T) / s**2, atol=1e-6, rtol=1e-6)
    # Equivalent gradient: G projected on the row space of A, the best any B-only step can do.
    torch.testing.assert_close(equivalent_gradient(a, b, g_a_star, g_b_star, s), g @ a.T @ torch.linalg.inv(a @ a.T) @ a,
                               atol=1e-6, rtol=1e-6)  # the 1e-8 ridge on A A^T


def test_full_mode_step_moves_w_along_the_projected_adam_direction():
    layer, a, b, g_a, g_b, g = layer_and_grads()
    layer.base_layer.weight.requires_grad_(False)
    layer.base_layer.weight.grad = None
    s, lr = layer.scaling, 1e-7
    optimizer = lf.make_optimizer(nn.Sequential(layer), "lora-pro", lr=lr, weight_decay=0.0)
    optimizer.step()
    g_tilde = projection(a, b, g)
    adam = g_tilde / (g_tilde.abs() + 1e-8)  # Adam's first direction m^/(sqrt(v^)+eps)
    moved = (s * layer.lora_B.weight @ layer.lora_A.weight - s * b @ a).detach() / lr  # float64 throughout
    torch.testing.assert_close(moved, -projection(a, b, adam), atol=1e-4, rtol=1e-4)
    state = optimizer.state[layer.lora_A.weight]
    assert state["exp_avg"].shape == (M, N) and state["exp_avg_sq"].shape == (M, N)  # the full-weight space


@pytest.mark.parametrize("method", ["dora", "lora-xs", "block-lora"])
def test_other_parametrisations_are_refused(method):
    if method not in [m.name for m in lf.methods()]:
        pytest.skip(f"{method} not registered")
    model = lf.attach(tiny_llama(), lf.AdapterConfig(method=method, rank=4, alpha=8))
    with pytest.raises(lf.LoraforgeError, match="plain product form"):
        lf.make_optimizer(model, "lora-pro", lr=1e-3)


def test_efficient_mode_keeps_a_and_b_sized_moments():
    model = lf.attach(tiny_llama(), lf.AdapterConfig(rank=4, alpha=8, init="random", target_modules=["q_proj"]))
    optimizer = lf.make_optimizer(model, "lora-pro", lr=1e-3, lorapro_mode="efficient")
    ids = torch.randint(5, 100, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    for layer in lf.adapter_layers(model).values():
        for param in (layer.lora_A.weight, layer.lora_B.weight):
            assert optimizer.state[param]["exp_avg"].shape == param.shape
