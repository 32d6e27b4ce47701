"""Analysis: the checks of shared/methods/intruder-dimensions.md, spectra, effective rank, subspace
similarity, whole-model sources (attached / adapter folder / full weights), `loraforge analyze`, bad input."""

import argparse
import json

import pytest
import torch
from safetensors.torch import save_file

import loraforge as lf
from loraforge.analysis import (
    analyze,
    effective_rank,
    find_intruders,
    intruder_scores,
    intruders,
    low_rank_factors,
    mitigate,
    mitigated_update,
    open_updates,
    singular_values,
    subspace_similarity,
)
from loraforge.analysis.cli import add_parser
from loraforge.testing import tiny_gpt2, tiny_llama, tiny_tokenizer


def orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=g))[0]


def base(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """W0 = U0 diag(S0) V0^T (n, n) with distinct singular values 10 > ... > 1; float32."""
    g = torch.Generator().manual_seed(seed)
    u0, v0 = orthogonal(n, g), orthogonal(n, g)
    s0 = torch.linspace(10, 1, n)
    return u0 @ torch.diag(s0) @ v0.T, u0, s0, v0


def spike(directions: bool = False):
    """Check 3: W0 (64 x 64) and dW = 10 s0_1 u v^T, u and v at |cos| = 1/8 from every base vector."""
    w0, u0, s0, v0 = base()
    u, v = u0.sum(1) / 8, v0.sum(1) / 8  # unit norm: 64 orthonormal columns summed
    return (w0, 10 * s0[0] * torch.outer(u, v)) + ((u, v) if directions else ())


# ---- checks 1, 2: only singular values change -> no intruders ------------------------------------
def with_spectrum(u0, s, v0):
    return u0 @ torch.diag(s) @ v0.T


@pytest.mark.parametrize("case, tuned", [
    ("identical", lambda w0, u0, s0, v0: w0),
    ("scaled up", lambda w0, u0, s0, v0: 3.0 * w0),
    ("scaled down", lambda w0, u0, s0, v0: 0.2 * w0),
    ("singular values changed (dW = U0 D V0^T)",
     lambda w0, u0, s0, v0: with_spectrum(u0, s0 + torch.linspace(5, 0, 64), v0)),
    ("singular values reordered", lambda w0, u0, s0, v0: with_spectrum(u0, s0.flip(0), v0)),
])
def test_no_intruders_when_only_singular_values_change(case, tuned):
    w0, u0, s0, v0 = base()
    found = find_intruders(w0, tuned(w0, u0, s0, v0), k=10, epsilon=0.5)
    assert found.count == 0 and found.indices == []
    torch.testing.assert_close(found.max_cosine, torch.ones(10), atol=1e-4, rtol=0)


def test_rank_one_spike_is_exactly_one_intruder_at_index_0():
    w0, delta = spike()
    found = find_intruders(w0, w0 + delta, k=10, epsilon=0.5)
    assert found.indices == [0]
    assert found.max_cosine[0] < 0.2 and (found.max_cosine[1:] > 0.5).all()
    assert found.similarity.shape == (10, 64)


def test_count_is_monotone_in_epsilon_and_k_and_at_most_k():
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(48, 32, generator=g)
    delta = 4 * torch.randn(48, 4, generator=g) @ torch.randn(4, 32, generator=g)
    counts = {(k, eps): find_intruders(w0, w0 + delta, k=k, epsilon=eps).count
              for k in (1, 3, 5, 10, 20, 32) for eps in (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)}
    assert max(counts.values()) > 0  # the update does bring intruders
    for (k, eps), n in counts.items():
        assert n <= k
        assert all(n <= m for (k2, e2), m in counts.items() if k2 >= k and e2 >= eps)


def test_sign_flips_of_singular_vectors_change_nothing():
    w0, delta = spike()
    u0 = torch.linalg.svd(w0)[0]
    u1 = torch.linalg.svd(w0 + delta)[0]
    g = torch.Generator().manual_seed(1)
    flip0, flip1 = (torch.randint(0, 2, (64,), generator=g) * 2 - 1 for _ in range(2))
    c, similarity = intruder_scores(u0, u1, k=10)
    c_flipped, similarity_flipped = intruder_scores(u0 * flip0, u1 * flip1, k=10)
    torch.testing.assert_close(c_flipped, c, atol=0, rtol=0)
    torch.testing.assert_close(similarity_flipped, similarity, atol=0, rtol=0)
    assert find_intruders(-w0, -(w0 + delta)).indices == [0]  # every pair flipped at once


# ---- check 6: mitigation ----------------------------------------------------------------------------
def test_mitigation_lambda_one_returns_the_update():
    w0, delta = spike()
    new_delta, index = mitigated_update(w0, delta, lam=1.0)
    assert index == [0]
    torch.testing.assert_close(new_delta, delta, atol=1e-5, rtol=0)
    lora_b, lora_a = low_rank_factors(new_delta, rank=1)
    assert lora_b.shape == (64, 1) and lora_a.shape == (1, 64)
    torch.testing.assert_close(lora_b @ lora_a, delta, atol=1e-5 * delta.abs().max().item(), rtol=0)


@pytest.mark.parametrize("rank", [1, 2])
def test_mitigation_lambda_zero_removes_the_spike(rank):
    w0, delta, u, v = spike(directions=True)
    new_delta, index = mitigated_update(w0, delta, lam=0.0)
    assert index == [0]
    lora_b, lora_a = low_rank_factors(new_delta, rank)
    assert find_intruders(w0, w0 + lora_b @ lora_a).count == 0
    # The whole direction leaves W' (the spike, and W0's own share of it): u^T W_mit v ~ 0, was 10 s0_1 + ...
    assert abs(u @ (w0 + lora_b @ lora_a) @ v) < 0.01 * (u @ delta @ v)


def test_low_rank_factors_pad_a_rank_above_the_matrix_size():
    lora_b, lora_a = low_rank_factors(torch.randn(6, 3, generator=torch.Generator().manual_seed(0)), rank=5)
    assert lora_b.shape == (6, 5) and lora_a.shape == (5, 3) and (lora_a[3:] == 0).all()


# ---- spectra, effective rank, subspace similarity -----------------------------------------------------
@pytest.mark.parametrize("shape, dtype", [((16, 16), torch.float32), ((20, 12), torch.float32), ((8, 30), torch.float64)])
def test_spectrum_is_svdvals(shape, dtype):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    assert torch.equal(singular_values(w), torch.linalg.svdvals(w))


@pytest.mark.parametrize("name, matrix, expected", [
    ("identity 1", torch.eye(1), 1.0),
    ("identity 7", torch.eye(7), 7.0),
    ("identity 32", torch.eye(32), 32.0),
    ("rank 1", torch.outer(torch.arange(1.0, 13.0), torch.linspace(-1, 2, 9)), 1.0),
    ("two equal directions", torch.diag(torch.tensor([3.0, 3.0, 0.0, 0.0])), 2.0),
    ("zero", torch.zeros(5, 4), 0.0),
    ("spectrum (1, 1, 2)", torch.diag(torch.tensor([1.0, 1.0, 2.0])), 2.0 ** 1.5),  # exp(H(1/4, 1/4, 1/2))
])
def test_effective_rank(name, matrix, expected):
    assert effective_rank(matrix) == pytest.approx(expected, rel=1e-4)
    assert effective_rank(torch.linalg.svdvals(matrix)) == pytest.approx(expected, rel=1e-4)


def test_subspace_similarity():
    g = torch.Generator().manual_seed(0)
    a1 = torch.randn(4, 200, generator=g)  # (r, d_in)
    assert subspace_similarity(a1, a1) == pytest.approx(1.0, abs=1e-5)
    mixed = torch.randn(4, 4, generator=g) @ a1  # another basis of the same row space
    assert subspace_similarity(a1, mixed) == pytest.approx(1.0, abs=1e-5)
    wider = torch.cat([mixed, torch.randn(4, 200, generator=g)])  # r = 8 containing a1's space
    assert subspace_similarity(a1, wider) == pytest.approx(1.0, abs=1e-5)
    eye = torch.eye(200)
    assert subspace_similarity(eye[:4], eye[4:12]) == pytest.approx(0.0, abs=1e-7)
    q = torch.linalg.qr(torch.cat([a1, torch.randn(4, 200, generator=g)]).T)[0].T  # 8 orthonormal rows
    assert subspace_similarity(q[:4], q[4:]) == pytest.approx(0.0, abs=1e-6)
    assert subspace_similarity(a1, torch.randn(4, 200, generator=g)) < 0.1  # random: about r / d_in
    # Updates s B A have the row space of A: phi on the updates equals phi on the A matrices.
    b = torch.randn(30, 4, generator=g)
    assert subspace_similarity(b @ a1, a1) == pytest.approx(1.0, abs=1e-4)


# ---- whole models -------------------------------------------------------------------------------------
def random_lora(model, seed: int = 0, **kw):
    return lf.attach(model, lf.AdapterConfig(rank=4, alpha=8, init="random", seed=seed, **kw))


@pytest.mark.parametrize("make, modules", [(tiny_llama, 14), (tiny_gpt2, 8)])  # gpt2: Conv1D, stored (d_in, d_out)
def test_attached_adapter_folder_and_full_weights_agree(tmp_path, make, modules):
    model = random_lora(make())
    attached = analyze(model)
    lf.save_adapter(model, tmp_path / "adapter")
    lf.merge_and_unload(model).save_pretrained(tmp_path / "full")  # a "full fine-tune": merged weights
    from_folder = analyze(make(), tmp_path / "adapter")
    from_weights = analyze(make(), tmp_path / "full")
    assert len(attached) == modules and from_folder.keys() == attached.keys() == from_weights.keys()
    assert sum(a.intruders.count for a in attached.values()) > 0  # a random LoRA does intrude
    for name, a in attached.items():
        for other in (from_folder[name], from_weights[name]):
            assert other.intruders.indices == a.intruders.indices
            torch.testing.assert_close(other.update_spectrum, a.update_spectrum, atol=1e-4, rtol=1e-4)
        assert 1 <= a.effective_rank <= 4  # dW has rank 4
    found = intruders(make(), tmp_path / "adapter", k=10, epsilon=0.5)
    assert {n: f.count for n, f in found.items()} == {n: a.intruders.count for n, a in attached.items()}


@pytest.mark.parametrize("name, make", [("llama", tiny_llama), ("gpt2", tiny_gpt2)])
def test_updates_are_d_out_by_d_in_and_sum_to_the_merged_weight(name, make):
    model = random_lora(make(), rank_pattern={"(c_attn|q_proj)": 2},
                        alpha_pattern={"(c_attn|q_proj)": 3.0}, use_rslora=True)
    with open_updates(model) as updates:
        pairs = {path: load() for path, load in updates.items()}
    lf.merge(model)
    for path, (w0, delta) in pairs.items():
        layer = model.get_submodule(path)
        merged = layer.base_layer.weight.T if layer.fan_in_fan_out else layer.base_layer.weight  # (d_out, d_in)
        assert w0.shape == (layer.out_features, layer.in_features)
        torch.testing.assert_close(w0 + delta, merged, atol=1e-5, rtol=0)
        if path.endswith(("c_attn", "q_proj")):  # rank_pattern / alpha_pattern honoured: s = 3 / sqrt(2)
            assert torch.linalg.matrix_rank(delta) == 2
            torch.testing.assert_close(delta, 3 / 2 ** 0.5 * layer.lora_B.weight @ layer.lora_A.weight)


# ---- the CLI ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    tiny_llama().save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    for seed in (0, 1):
        lf.save_adapter(random_lora(tiny_llama(), seed=seed), root / f"adapter{seed}")
    # Sources the analysis must refuse (test_bad_input).
    lf.save_adapter(random_lora(tiny_gpt2()), root / "gpt2-adapter")
    tiny_gpt2().save_pretrained(root / "gpt2-full")
    lf.save_adapter(lf.attach(tiny_llama(), lf.AdapterConfig(method="dora", rank=2)), root / "dora")
    lf.save_adapter(lf.attach(tiny_llama(), lf.AdapterConfig(method="mixlora", rank=2)), root / "mixlora")
    (root / "bad-shape").mkdir()
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(3, 3)}, root / "bad-shape" / "model.safetensors")
    return root


def run_analyze(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["analyze", *map(str, argv)])
    return args.run(args)


def test_analyze_writes_report(workspace, tmp_path):
    out = tmp_path / "report"
    assert run_analyze("--model", workspace / "model", "--adapter", workspace / "adapter0",
                       "--compare", workspace / "adapter1", workspace / "adapter0", "--out", out) == 0
    assert {"report.md", "report.json", "spectra.png", "intruders_per_layer.png", "intruders_vs_epsilon.png"} <= {
        p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    assert len(report["modules"]) == 14
    assert report["total_intruders"] == sum(m["intruders"] for m in report["modules"].values()) > 0
    module = report["modules"]["model.layers.0.self_attn.q_proj"]
    assert {"intruders", "intruder_indices", "max_cosine", "effective_rank", "counts_by_epsilon", "spectra"} <= set(module)
    assert len(module["max_cosine"]) == 10 and report["k"] == 10 and report["epsilon"] == 0.5
    counts = report["counts_by_epsilon"]
    assert counts == sorted(counts)
    labels = list(report["compare"])
    assert len(labels) == 2 and report["compare"][labels[1]]["total_intruders"] == report["total_intruders"]
    same, other = report["subspace_similarity"][labels[1]], report["subspace_similarity"][labels[0]]
    assert all(v == pytest.approx(1.0, abs=1e-4) for v in same.values())  # the adapter against itself
    assert all(0.0 <= v < 0.9 for v in other.values())  # another seed: another subspace
    text = (out / "report.md").read_text()
    assert "![intruders_vs_epsilon](intruders_vs_epsilon.png)" in text and "model.layers.1.mlp.down_proj" in text


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[5, 6, 7, 8, 9, 10]])).logits


def test_mitigate_writes_a_loadable_adapter(workspace, tmp_path):
    original = logits(lf.load_adapter(tiny_llama(), workspace / "adapter0"))
    assert run_analyze("--model", workspace / "model", "--adapter", workspace / "adapter0", "--mitigate", "1.0",
                       "--out", tmp_path / "same") == 0
    torch.testing.assert_close(logits(lf.load_adapter(tiny_llama(), tmp_path / "same")), original, atol=1e-4, rtol=0)

    assert run_analyze("--model", workspace / "model", "--adapter", workspace / "adapter0", "--mitigate", "0",
                       "--out", tmp_path / "reduced") == 0
    config = json.loads((tmp_path / "reduced" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA"
    before = sum(f.count for f in intruders(tiny_llama(), workspace / "adapter0").values())
    after = sum(f.count for f in intruders(tiny_llama(), tmp_path / "reduced").values())
    assert after < before


@pytest.mark.parametrize("make_args, error, message", [
    (lambda ws, tmp: ["--adapter", tmp / "missing"], lf.AdapterError, "no such folder"),
    (lambda ws, tmp: ["--adapter", tmp], lf.AdapterError, "neither an adapter folder"),
    (lambda ws, tmp: ["--adapter", ws / "gpt2-adapter"], lf.AdapterError, "matches no Linear layer of LlamaForCausalLM"),
    (lambda ws, tmp: ["--adapter", ws / "gpt2-full"], lf.AdapterError, "no tensor matches a linear layer"),
    (lambda ws, tmp: ["--adapter", ws / "bad-shape"], lf.AdapterError, r"q_proj.weight' has shape \(3, 3\)"),
    (lambda ws, tmp: ["--adapter", ws / "mixlora"], lf.AdapterError, "does not merge"),
    (lambda ws, tmp: ["--adapter", ws / "adapter0", "--k", "0"], lf.LoraforgeError, "k must be"),
    (lambda ws, tmp: ["--adapter", ws / "adapter0", "--epsilon", "1.5"], lf.LoraforgeError, "epsilon"),
    (lambda ws, tmp: ["--adapter", ws / "adapter0", "--mitigate", "-1"], lf.LoraforgeError, "lambda"),
    (lambda ws, tmp: ["--adapter", ws / "model", "--mitigate", "0.5"], lf.LoraforgeError, "needs an adapter"),
    (lambda ws, tmp: ["--adapter", ws / "dora", "--mitigate", "0.5"], lf.AdapterError, "plain LoRA adapters only"),
])
def test_bad_input(workspace, tmp_path, make_args, error, message):
    with pytest.raises(error, match=message):
        run_analyze("--model", workspace / "model", *make_args(workspace, tmp_path), "--out", tmp_path / "out")


@pytest.mark.parametrize("lam", [0.0, 0.75])
def test_mitigation_matches_peft(workspace, tmp_path, lam):
    from peft import PeftModel
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    theirs = PeftModel.from_pretrained(tiny_llama(), workspace / "adapter0")
    reduce_intruder_dimension(theirs, top_k=10, threshold_epsilon=0.5, mitigation_lambda=lam, logging_sink=None)
    found = mitigate(tiny_llama(), workspace / "adapter0", tmp_path / "ours", lam=lam)
    assert sum(map(len, found.values())) > 0
    ours = lf.load_adapter(tiny_llama(), tmp_path / "ours")
    for name, layer in lf.adapter_layers(ours).items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.delta_weight(), peft_layer.get_delta_weight("intruder_reduced"),
                                   atol=1e-5, rtol=1e-4)
