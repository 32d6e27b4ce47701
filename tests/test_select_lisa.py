"""LISA (loraforge/select/lisa.py): exactly gamma blocks train, the set only changes every K steps, the
sampling is seeded, frozen blocks keep their weights and lose their optimizer state, resume is exact."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import loraforge as lf
from loraforge.core.plugins import SELECTORS, Component
from loraforge.select import find_blocks
from loraforge.select.lisa import sample_blocks
from loraforge.testing import tiny_tokenizer
from loraforge.training.config import TrainConfig
from loraforge.training.data import from_records
from loraforge.training.loop import train

TOK = tiny_tokenizer()
DATA = from_records([{"prompt": f"Q{i}: {i}+{i}?", "completion": f" {2 * i}"} for i in range(24)], TOK, max_length=32)


def llama(layers: int = 6) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                        pad_token_id=0)).eval()


def trainable_blocks(model) -> list[int]:
    path, blocks = find_blocks(model)
    return [i for i, b in enumerate(blocks) if any(p.requires_grad for p in b.parameters())]


def test_sampling_is_seeded_uniform_and_without_replacement():
    assert sample_blocks(6, 2, seed=0, period=3) == sample_blocks(6, 2, seed=0, period=3)
    counts = torch.zeros(8)
    periods = 2000
    for period in range(periods):
        chosen = sample_blocks(8, 3, seed=1, period=period)
        assert len(set(chosen)) == 3
        counts[chosen] += 1
    p = 3 / 8
    sigma = (periods * p * (1 - p)) ** 0.5
    assert torch.all((counts - periods * p).abs() < 4 * sigma)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_exactly_gamma_blocks_train_and_the_set_changes_only_every_k_steps(method):
    model = lf.attach(llama(), lf.AdapterConfig(method=method, rank=4, init="random"))
    outside = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("model.layers.")]
    lisa = SELECTORS.build(Component("lisa", {"lisa_layers": 2, "lisa_interval": 3}), seed=0)
    optimizer = lf.make_optimizer(model, "adamw", lr=1e-3)
    sets = []
    for step in range(9):
        lisa.before_step(step, model, optimizer)
        sets.append(trainable_blocks(model))
        assert len(sets[-1]) == 2
        assert all(p.requires_grad for p in outside)  # embedding, head, final norm (full) stay on
        ids = torch.randint(5, 100, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert sets[0] == sets[1] == sets[2] and sets[3] == sets[4] == sets[5] and sets[6] == sets[7] == sets[8]
    assert len({tuple(s) for s in sets}) > 1


def test_frozen_blocks_are_unchanged_and_their_state_dropped():
    model = lf.attach(llama(), lf.AdapterConfig(method="full"))
    lisa = SELECTORS.build(Component("lisa", {"lisa_layers": 2, "lisa_interval": 2}), seed=0)
    optimizer = lf.make_optimizer(model, "adamw", lr=1e-2)
    _, blocks = find_blocks(model)
    for step in range(4):
        lisa.before_step(step, model, optimizer)
        active = trainable_blocks(model)
        before = {i: [p.detach().clone() for p in b.parameters()] for i, b in enumerate(blocks)}
        ids = torch.randint(5, 100, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for i, block in enumerate(blocks):
            same = all(torch.equal(p, q) for p, q in zip(block.parameters(), before[i]))
            assert same == (i not in active)
        # Optimizer state: exactly the always-on tensors plus the gamma active blocks.
        held = sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in optimizer.state.values())
        on = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert held == 2 * on
        assert on < sum(p.numel() for p in model.parameters())


def run(tmp_path, name, **kw):
    config = TrainConfig.from_dict(dict(out=str(tmp_path / name), method="lora", select="lisa", lisa_layers=2, lisa_interval=3, rank=4,
                         alpha=8, steps=8, lr=5e-3, batch_size=4, precision="fp32", **kw))
    return train(config, model=llama(), tokenizer=TOK, train_data=DATA, progress=False)


def test_trainer_logs_the_blocks_and_resumes_identically(tmp_path, kill_at_step):
    full = run(tmp_path, "full")
    logged = [row["lisa_blocks"] for row in full.history if "lisa_blocks" in row]
    assert [row["step"] for row in full.history if "lisa_blocks" in row] == [1, 4, 7]
    assert all(len(b) == 2 for b in logged)

    with kill_at_step(5):
        run(tmp_path, "killed", save_every=2)  # checkpoint after step 4, mid-period (period 1 = steps 4-6)
    resumed = run(tmp_path, "killed", save_every=2, resume=True)
    want = load_file(str(full.out / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(resumed.out / "adapter" / "adapter_model.safetensors"))
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=0)
    state = json.loads((resumed.out / "config.json").read_text())
    assert state["train"]["select"] == {"name": "lisa", "settings": {"lisa_layers": 2, "lisa_interval": 3}}


def test_defaults_are_the_reference_ones():
    # gamma = 2 (the paper's usual setting), K = 20 (LMFlow's lisa_interval_steps); the seed is the run's.
    assert SELECTORS.defaults("lisa") == {"lisa_layers": 2, "lisa_interval": 20}
