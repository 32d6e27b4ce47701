"""SG-LoRA (sg-lora.md checks 1-3, 5), its delta-W merge baseline, and sampling from a description on the CLI."""

import pytest
import torch
from generate_helpers import probe_logits, tiny_zoo

from loraforge.cli import main
from loraforge.generate.conditions import embed_texts, load_text_encoder
from loraforge.generate.cvae import CVAEConfig
from loraforge.generate.generator import write_generated
from loraforge.generate.sg_lora import SGLoRA, SGLoRAConfig, expert_weights, semantic_condition, train_sg_lora

CHANNELS = (8, 16, 32, 32, 32, 32, 32, 32, 32, 32, 16, 8)


@pytest.fixture(scope="module")
def encoder():
    return load_text_encoder()


@pytest.fixture(scope="module")
def one_expert(tmp_path_factory, encoder):
    root = tmp_path_factory.mktemp("sg")
    zoo = tiny_zoo(root, ["4"])
    config = SGLoRAConfig(cvae=CVAEConfig(channels=CHANNELS, latent_dim=16, steps=800, lr=3e-3))
    return root, zoo, train_sg_lora(zoo, root / "gen", config, encoder=encoder, progress=False)


def test_expert_weights_are_a_top_k_softmax_and_permutation_equivariant():
    s = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2])
    w = expert_weights(s, top_k=3, temperature=0.1)
    assert (w >= 0).all() and torch.isclose(w.sum(), torch.tensor(1.0))
    assert (w[[0, 4]] == 0).all() and w[1] > w[3] > w[2] > 0
    torch.testing.assert_close(w[1:4], torch.softmax(s[1:4] / 0.1, 0))
    perm = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(expert_weights(s[perm], 3, 0.1), w[perm])


def test_own_description_at_zero_temperature_is_that_expert(encoder):
    descriptions = ["Add 3 to the number.", "Answer 'yes' if the sentence is positive.", "Translate to French."]
    experts = embed_texts(descriptions, encoder)
    for j, d in enumerate(descriptions):
        c, w = semantic_condition(embed_texts([d], encoder)[0], experts, top_k=2, temperature=0.0)
        assert w.tolist() == [1.0 if i == j else 0.0 for i in range(3)]
        torch.testing.assert_close(c, experts[j])
        _, w_small = semantic_condition(embed_texts([d], encoder)[0], experts, top_k=2, temperature=1e-4)
        assert w_small[j] > 0.999  # T -> 0 approaches the one-hot


def test_overfit_expert_reproduces_its_adapter_from_its_description(one_expert, encoder):
    root, zoo, gen = one_expert
    sg = SGLoRA.load(gen, encoder=encoder)
    state, weights = sg.generate(zoo.tasks[0].description, seed=None)
    assert weights.tolist() == [1.0]
    out = write_generated(root / "sampled", sg.record, state, {"z": "zero"})
    base, want, got = probe_logits(None), probe_logits(zoo.tasks[0].final), probe_logits(str(out))
    assert (want - base).norm() / base.norm() > 1e-2
    assert (got - want).norm() / want.norm() < 1e-3


def test_seeds_are_deterministic_and_diverse(one_expert, encoder):
    _, zoo, gen = one_expert
    sg = SGLoRA.load(gen, encoder=encoder)
    a, _ = sg.generate("Add 9 to the number.", seed=1)
    b, _ = sg.generate("Add 9 to the number.", seed=1)
    c, _ = sg.generate("Add 9 to the number.", seed=2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_expert_merge_of_one_expert_is_its_update_and_cli_samples(one_expert, encoder, tmp_path):
    _, zoo, gen = one_expert
    merged = SGLoRA.load(gen, encoder=encoder).write_expert_merge("Add 9 to the number.", tmp_path / "merged")
    torch.testing.assert_close(probe_logits(str(merged)), probe_logits(zoo.tasks[0].final))
    assert main(["generator", "sample", "--generator", str(gen), "--description", "Add 9 to the number.",
                 "--out", str(tmp_path / "adapter")]) == 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert main(["generator", "sample", "--generator", str(gen), "--examples", zoo.tasks[0].train,
                 "--out", str(tmp_path / "x")]) == 2
