"""The machinery ICM-LoRA and SG-LoRA share: flat adapters (icm-lora.md checks 1-2), the CVAE (checks 3-5),
the delta-W merge (sg-lora.md check 4)."""

import pytest
import torch

from loraforge.generate.cvae import CVAE, CVAEConfig, kl_standard_normal, train_cvae
from loraforge.generate.flat import FlatSpec, merge_on_delta_w

NARROW = (8, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 8)  # the reference's 12 stride-2 blocks, fewer channels: test speed


def lora_state(seed: int, d_in: int = 12, d_out: int = 10, r: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.{name}.lora_{ab}.weight": torch.randn(*(shape), generator=g) * (i + 1) + seed
            for i in range(2) for name in ("q", "v") for ab, shape in (("A", (r, d_in)), ("B", (d_out, r)))}


def test_flatten_unflatten_is_exact_and_normalisation_inverts():
    states = [lora_state(s) for s in range(3)]
    spec = FlatSpec.fit(states)
    raw = spec.flatten(states[1], normalise=False)
    assert raw.shape == (spec.length,) == (2 * 2 * (2 * 12 + 10 * 2),)
    back = spec.unflatten(raw, normalise=False)
    assert all(torch.equal(back[k], states[1][k]) for k in states[1])  # bit for bit, every A and B
    x = spec.flatten(states[1])
    for key, value in spec.unflatten(x).items():
        torch.testing.assert_close(value, states[1][key], atol=1e-5, rtol=1e-6)
    # The statistics are the zoo's, per tensor: over all three adapters each tensor is z-scored.
    zoo = torch.stack([spec.flatten(s) for s in states])
    first = zoo[:, :2 * 12]  # layers.0.q.lora_A across the zoo
    torch.testing.assert_close(first.mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(first.std(correction=0), torch.tensor(1.0), atol=1e-5, rtol=0)
    with pytest.raises(Exception, match="shape"):
        spec.check({**states[0], spec.keys[0]: torch.zeros(3, 3)}, "bad")


@pytest.mark.parametrize("length", [1, 448, 4096, 5000])
def test_cvae_output_length_and_exact_kl(length):
    model = CVAE(length, condition_dim=5, config=CVAEConfig(channels=NARROW, latent_dim=6))
    assert model.padded % 4096 == 0 and model.padded >= length
    x, c = torch.randn(3, length), torch.randn(3, 5)
    mu, log_var = model.encode(x, c)
    assert mu.shape == log_var.shape == (3, 6)
    assert model.decode(mu, c).shape == (3, length)
    assert model.decode_padded(mu, c).shape == (3, model.padded)
    assert kl_standard_normal(torch.zeros(4, 6), torch.zeros(4, 6)).item() == 0.0
    mu, log_var = torch.randn(4, 6), torch.randn(4, 6)
    closed = 0.5 * (log_var.exp() + mu ** 2 - 1 - log_var).sum(1).mean()
    torch.testing.assert_close(kl_standard_normal(mu, log_var), closed)


def test_cvae_overfits_one_sample_and_samples_deterministically():
    x, c = torch.randn(1, 300), torch.randn(1, 4)
    model, history = train_cvae(x, c, CVAEConfig(channels=NARROW, latent_dim=16, steps=400, lr=3e-3), progress=False)
    assert history[-1]["mse"] < 1e-4 < 1e-2 < history[0]["mse"]
    assert (model.sample(c, None) - x).norm() / x.norm() < 0.05  # z = 0, eval mode: the sample it was fitted to
    assert torch.equal(model.sample(c, seed=3), model.sample(c, seed=3))
    fresh = CVAE(300, 4, CVAEConfig(channels=NARROW, latent_dim=8)).eval()  # a decoder that reads z
    assert not torch.equal(fresh.sample(c, seed=3), fresh.sample(c, seed=4))


def test_delta_w_merge_is_exact_and_differs_from_averaging_factors():
    states, weights = [lora_state(s) for s in range(3)], [0.5, 0.3, 0.2]
    merged = merge_on_delta_w(states, weights)
    a, b = "layers.1.v.lora_A.weight", "layers.1.v.lora_B.weight"
    assert merged[a].shape == (6, 12) and merged[b].shape == (10, 6)
    expected = sum(w * s[b] @ s[a] for w, s in zip(weights, states))
    torch.testing.assert_close(merged[b] @ merged[a], expected)
    factors = sum(w * s[b] for w, s in zip(weights, states)) @ sum(w * s[a] for w, s in zip(weights, states))
    assert (factors - expected).abs().max() > 1e-2  # averaging A and B apart is another adapter
    same = merge_on_delta_w([states[0]] * 3, weights)  # identical experts: both agree
    torch.testing.assert_close(same[b] @ same[a], states[0][b] @ states[0][a])
