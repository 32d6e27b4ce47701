"""The text hypernetwork (hypernetwork.md checks 1-3 and 5, a fit on the zoo tasks, the CLI)."""

import copy

import pytest
import torch
from generate_helpers import probe_logits, tiny_zoo

from loraforge.adapters.inject import attach, tensors_replaced
from loraforge.cli import main
from loraforge.core.config import AdapterConfig
from loraforge.generate.conditions import load_text_encoder
from loraforge.generate.flat import FlatSpec
from loraforge.generate.generator import ZooData, write_generated
from loraforge.generate.hypernet import (
    Hypernet,
    HypernetConfig,
    Hypernetwork,
    l2_of,
    per_row_adapters,
    train_hypernet,
)
from loraforge.testing import tiny_llama, tiny_tokenizer
from loraforge.training.data import collate, load_dataset
from loraforge.training.loss import mean_batch_loss


@pytest.fixture(scope="module")
def encoder():
    return load_text_encoder()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return tiny_zoo(tmp_path_factory.mktemp("hyper"), ["2", "5"])


def test_zero_output_is_the_base_model_exactly(zoo):
    data = ZooData.read(zoo)
    hyper = Hypernetwork(6, data.spec, hidden=8)
    for p in hyper.parameters():
        torch.nn.init.zeros_(p)
    state = hyper.adapter(torch.randn(6))
    assert all((t == 0).all() for t in state.values())
    model = attach(tiny_llama(), AdapterConfig.from_dict({**data.config.to_dict(), "target_modules": data.targets}))
    ids = torch.randint(5, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), tensors_replaced(model, state):
        got = model(input_ids=ids).logits
    assert torch.equal(got, probe_logits(None))


def test_a_batch_of_two_tasks_runs_each_row_with_its_own_adapter(zoo):
    data = ZooData.read(zoo)
    model = attach(tiny_llama(), AdapterConfig.from_dict({**data.config.to_dict(), "target_modules": data.targets}))
    states = [{k: torch.randn_like(v) * 0.3 for k, v in data.states[0][0].items()} for _ in range(2)]
    ids = torch.randint(5, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with per_row_adapters(model, states):
            together = model(input_ids=ids).logits
        alone = []
        for row, state in enumerate(states):
            with tensors_replaced(model, state):
                alone.append(model(input_ids=ids[row:row + 1]).logits[0])
    torch.testing.assert_close(together, torch.stack(alone), atol=1e-5, rtol=1e-5)
    assert (alone[0] - alone[1]).abs().max() > 1e-2  # the two adapters differ, so a mix-up would show


def test_l2_is_the_sum_of_squares_of_every_predicted_a_and_b():
    spec = FlatSpec(["x.lora_A.weight", "x.lora_B.weight"], [(2, 3), (4, 2)], torch.ones(2), torch.tensor([2.0, 0.5]))
    hyper = Hypernetwork(3, spec, hidden=4)
    state = hyper.adapter(torch.randn(3))
    manual = state["x.lora_A.weight"].pow(2).sum() + state["x.lora_B.weight"].pow(2).sum()
    torch.testing.assert_close(l2_of(state), manual)
    assert manual > 0


def test_training_moves_only_the_hypernetwork_and_fits_the_tasks(zoo, encoder, tmp_path):
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    before = copy.deepcopy(model.state_dict())
    config = HypernetConfig(hidden=16, steps=30, lr=1e-2, tasks_per_step=2, batch_size=8)
    gen = train_hypernet(zoo, tmp_path / "gen", config, model=model, tokenizer=tokenizer, encoder=encoder,
                         progress=False)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)  # bitwise frozen
    assert all(p.grad is None for p in model.parameters())
    hyper = Hypernet.load(gen, encoder=encoder)
    history = hyper.record.history
    assert history[-1]["lm_loss"] < history[0]["lm_loss"]
    # The adapter it writes for a zoo task fits that task's held-out rows better than the base does.
    task = zoo.tasks[1]
    out = write_generated(tmp_path / "a", hyper.record, hyper.generate(hyper.condition_of(task.description)), {})
    test = load_dataset(task.test, tokenizer, max_length=64)
    batch = collate([test[i] for i in range(len(test))], 0)

    def loss(adapter):
        from loraforge.adapters.io import load_adapter

        m = tiny_llama()
        if adapter:
            load_adapter(m, adapter)
        with torch.no_grad():
            return mean_batch_loss(m, batch, "causal-lm").item()

    assert loss(str(out)) < loss(None)


def test_cli_trains_and_samples_from_a_description(zoo, tmp_path):
    gen = tmp_path / "gen"
    assert main(["generator", "train", "--kind", "hypernet", "--zoo", str(zoo.root), "--out", str(gen),
                 "--steps", "2"]) == 0
    assert main(["generator", "sample", "--generator", str(gen), "--description", "Add 4 to the number.",
                 "--out", str(tmp_path / "adapter")]) == 0
    from peft import PeftModel

    PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    assert main(["generator", "sample", "--generator", str(gen), "--examples", zoo.tasks[0].train,
                 "--out", str(tmp_path / "x")]) == 2
