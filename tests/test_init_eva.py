"""EVA: the checks of shared/methods/eva.md on synthetic layer inputs, the redistribution rule, and
PEFT's `initialize_lora_eva_weights` on the same model and batches."""

from types import SimpleNamespace

import pytest
import torch
from peft import EvaConfig, LoraConfig, PeftModel, get_peft_model, initialize_lora_eva_weights
from torch import nn

import loraforge as lf
from loraforge.methods.init.eva import redistribute
from loraforge.testing import tiny_llama, tiny_tokenizer
from loraforge.training.data import BatchPlan, collate, from_records

pytestmark = pytest.mark.filterwarnings("ignore:EVA:UserWarning")


class Toy(nn.Module):
    """Each Linear reads its own embedding table: its inputs are rows of a table we choose."""

    def __init__(self, tables: dict[str, torch.Tensor]):
        super().__init__()
        self.tables = nn.ModuleDict({n: nn.Embedding.from_pretrained(t) for n, t in tables.items()})
        self.layers = nn.ModuleDict({n: nn.Linear(t.shape[1], 4) for n, t in tables.items()})

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=sum(self.layers[n](self.tables[n](input_ids)) for n in self.tables))


def text_data(n: int = 64):
    g = torch.Generator().manual_seed(0)
    chars = [chr(c) for c in range(33, 127)]
    rows = [{"text": "".join(chars[i] for i in torch.randint(0, len(chars), (20,), generator=g)), "label": 0}
            for _ in range(n)]
    return from_records(rows, tiny_tokenizer(), task="classification")


def table(spectrum: list[float], seed: int, d: int = 16) -> torch.Tensor:
    """128 token rows whose covariance has the given spectrum in a random basis."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    scales = torch.tensor(spectrum + [0.0] * (d - len(spectrum)))
    return torch.randn(128, d, generator=g) * scales @ basis.T


def eva_toy(tables, rank: int, batches: int = 8, **options):
    model = lf.attach(Toy(tables), lf.AdapterConfig(init="eva", rank=rank, alpha=2.0 * rank, options=options))
    report = lf.initialize(model, text_data(), batches=batches, batch_size=8, progress=False)
    return model, report


def test_a_spans_the_top_principal_directions_of_the_inputs():
    tables = {"a": table([4.0, 2.0, 1.0, 0.5, 0.1, 0.05], seed=1)}
    model, report = eva_toy(tables, rank=3, eva_rho=1.0)
    a = model.layers["a"].lora_A.weight  # (3, 16)
    torch.testing.assert_close(a @ a.T, torch.eye(3), atol=1e-4, rtol=0)
    assert torch.count_nonzero(model.layers["a"].lora_B.weight) == 0
    data, plan = text_data(), BatchPlan(64, 8, seed=0)
    ids = torch.cat([collate([data[i] for i in plan.indices(k)], 0)["input_ids"].flatten()
                     for k in range(report.details["batches_used"])])
    mask = torch.cat([collate([data[i] for i in plan.indices(k)], 0)["attention_mask"].flatten().bool()
                      for k in range(report.details["batches_used"])])
    x = tables["a"][ids[mask]]  # exactly the rows the layer saw
    top = torch.linalg.svd(x - x.mean(0), full_matrices=False)[2][:3]  # batch SVD of the centred data
    assert torch.linalg.svdvals(a @ top.T).min() >= 0.99  # cosines of the principal angles


def test_redistribution_rule_matches_the_threshold_equation():
    ratios = {"a": torch.tensor([0.50, 0.30, 0.02]), "b": torch.tensor([0.40, 0.20, 0.10]), "c": torch.tensor([0.05, 0.04, 0.01])}
    assert redistribute(ratios, budget=4) == {"a": 2, "b": 2, "c": 0}
    g = torch.Generator().manual_seed(0)
    ratios = {name: torch.rand(6, generator=g).sort(descending=True).values for name in "abcd"}
    for budget in (1, 5, 12, 24):
        threshold = torch.cat(list(ratios.values())).sort(descending=True).values[budget - 1]  # the budget-th largest xi
        assert redistribute(ratios, budget) == {n: int((r >= threshold).sum()) for n, r in ratios.items()}


def test_low_rank_inputs_get_less_rank_and_budget_is_kept():
    model, report = eva_toy({"iso": table([1.0] * 16, seed=2), "low": table([1.0, 0.8], seed=3)}, rank=4)
    ranks = report.details["ranks"]
    assert ranks["layers.low"] == 2 < ranks["layers.iso"] == 6
    assert sum(ranks.values()) == 2 * 4 and max(ranks.values()) <= round(2.0 * 4)
    for name, layer in lf.adapter_layers(model).items():
        assert layer.rank == ranks[name] and layer.scaling == pytest.approx(2.0, abs=1e-7)  # s_l = alpha / r


def test_layer_given_rank_zero_loses_its_adapter(tmp_path):
    tables = {"a": table([1.0, 0.9], seed=4), "b": table([1.0, 0.9], seed=5), "c": table([1.0] * 16, seed=6)}
    model, report = eva_toy(tables, rank=1)
    assert report.details["ranks"]["layers.c"] == 0 and isinstance(model.layers["c"], nn.Linear)
    assert sorted(model.loraforge_targets) == ["layers.a", "layers.b"]
    lf.save_adapter(model, tmp_path / "a")
    reloaded = lf.load_adapter(Toy(tables), tmp_path / "a")
    assert sorted(lf.adapter_layers(reloaded)) == ["layers.a", "layers.b"]


def llama_batches(n_batches: int):
    data = from_records([{"prompt": f"question {i} " + "xy" * (i % 4), "completion": f"answer {i % 5} " + "z" * (i % 3)}
                         for i in range(64)], tiny_tokenizer())
    plan = BatchPlan(len(data), 8, seed=0)
    return data, [collate([data[i] for i in plan.indices(k)], pad_id=0) for k in range(n_batches)]


def test_rho_one_keeps_every_rank_and_shared_inputs_share_components():
    data, _ = llama_batches(0)
    model = lf.attach(tiny_llama(), lf.AdapterConfig(init="eva", rank=2, options={"eva_rho": 1.0}))
    before = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    report = lf.initialize(model, data, batches=10, batch_size=8, progress=False)
    assert set(report.details["ranks"].values()) == {2} and not model.loraforge_config.rank_pattern
    assert torch.equal(model(input_ids=torch.tensor([[5, 6, 7]])).logits, before)  # B = 0
    attn = model.model.layers[0].self_attn  # q, k, v read the same tensor: one PCA
    assert torch.equal(attn.q_proj.lora_A.weight, attn.k_proj.lora_A.weight)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_ranks_and_directions_equal_peft(tmp_path):
    data, batches = llama_batches(20)
    ours = lf.attach(tiny_llama(), lf.AdapterConfig(init="eva", rank=2, alpha=4))
    report = lf.initialize(ours, data, batches=20, batch_size=8, progress=False)
    assert not report.details["not_converged"]
    theirs = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules="all-linear",
                                                     init_lora_weights="eva", eva_config=EvaConfig(rho=2.0, tau=0.99)))
    initialize_lora_eva_weights(theirs, dataloader=batches, show_progress_bar=False)
    assert ours.loraforge_config.rank_pattern == theirs.peft_config["default"].rank_pattern != {}
    assert ours.loraforge_config.alpha_pattern == theirs.peft_config["default"].alpha_pattern
    for name, layer in lf.adapter_layers(ours).items():
        a, b = layer.lora_A.weight, theirs.base_model.model.get_submodule(name).lora_A["default"].weight
        assert (a * b).sum(1).abs().min() >= 0.999, name
    lf.save_adapter(ours, tmp_path / "a")  # plain LoRA with rank_pattern: PEFT builds the same shapes
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a")
    assert loaded.base_model.model.model.layers[0].mlp.down_proj.lora_A["default"].weight.shape == (3, 64)


def test_bad_settings():
    with pytest.raises(lf.AdapterError, match="eva_rho.*at least 1"):
        eva_toy({"a": table([1.0], seed=0)}, rank=1, eva_rho=0.5)
    with pytest.raises(lf.AdapterError, match="layers.a: EVA needs round.*= 32 components of 16-d inputs"):
        eva_toy({"a": table([1.0], seed=0)}, rank=16)
