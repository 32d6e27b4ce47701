"""Federated aggregation: the checks of shared/methods/flora.md and lora-fair.md, PEFT loading,
the `fed aggregate` command, and bad input."""

import argparse
import dataclasses
import itertools
import json
import os

import pytest
import safetensors.torch
import torch
from peft import PeftModel

import loraforge as lf
from loraforge.cli import main
from loraforge.federated import ClientAdapter, aggregate, lora_modules, read_client
from loraforge.federated.cli import add_parser
from loraforge.testing import assert_same_outputs, tiny_bert, tiny_llama, tiny_tokenizer

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matrices: on the busy shared CPU a second intra-op thread's spin-waits made these tests ~10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_client(path, seed: int, rank: int = 4, alpha: float = 8, use_rslora: bool = False, targets=TARGETS,
                base: str | None = None, rank_pattern: dict | None = None) -> str:
    model = tiny_llama()
    cfg = lf.AdapterConfig(rank=rank, alpha=alpha, init="random", seed=seed, target_modules=targets,
                           use_rslora=use_rslora, base_model_name_or_path=base, rank_pattern=rank_pattern or {})
    lf.attach(model, cfg)
    lf.save_adapter(model, path / f"client{seed}")
    return str(path / f"client{seed}")


def exact_update(clients: list[ClientAdapter], weights: list[float], module: str) -> torch.Tensor:
    return sum(p * c.delta_weight(module) for p, c in zip(weights, clients))  # (d_out, d_in)


def random_client(seed: int, rank: int, shape=(12, 10), scale_alpha: float = 8.0) -> ClientAdapter:
    """Random factors of a trained adapter's size (entries ~0.1) for one module, no model: for the algebra."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"m.lora_A.weight": 0.1 * torch.randn(rank, shape[1], generator=g),
               "m.lora_B.weight": 0.1 * torch.randn(shape[0], rank, generator=g)}
    config = lf.AdapterConfig(rank=rank, alpha=scale_alpha, target_modules=["m"])
    return ClientAdapter(f"c{seed}", config, ["m"], tensors)


def probe_logits(model) -> torch.Tensor:
    ids = torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


# ---- FLoRA ---------------------------------------------------------------------------------------
FLORA_CASES = {  # name: (ranks, alphas, use_rslora per client; client 0's rank_pattern)
    "homogeneous": ([4, 4, 4], [8, 8, 8], [False] * 3, {}),
    "heterogeneous": ([2, 4, 8], [4, 3, 16], [False] * 3, {}),
    "rslora-mix": ([2, 8, 4], [2, 8, 5], [True, False, True], {}),
    "per-module ranks": ([4, 8, 2], [8, 8, 4], [False] * 3, {"v_proj": 2}),  # the aggregate needs rank_pattern
}


@pytest.mark.parametrize("case", FLORA_CASES)
def test_flora_is_exact_and_loads_in_loraforge_and_peft(tmp_path, case):
    ranks, alphas, rslora, pattern = FLORA_CASES[case]
    dirs = [save_client(tmp_path, k, r, a, s, rank_pattern=pattern if k == 0 else None)
            for k, (r, a, s) in enumerate(zip(ranks, alphas, rslora))]
    weights = [0.2, 0.3, 0.5]
    aggregate("flora", dirs, weights, out=tmp_path / "agg")
    clients, agg = [read_client(d) for d in dirs], read_client(tmp_path / "agg")
    for module in lora_modules(agg.tensors):
        stacked = sum(c.tensors[f"{module}.lora_A.weight"].shape[0] for c in clients)
        assert agg.tensors[f"{module}.lora_A.weight"].shape[0] == stacked  # check 3: stacked rank = sum r_k
        torch.testing.assert_close(agg.delta_weight(module), exact_update(clients, weights, module), atol=1e-6, rtol=0)
    # check 6: the aggregate on a fresh model == base weights + sum p_k dW_k, in loraforge and in PEFT
    expected = tiny_llama()
    with torch.no_grad():
        for module in lora_modules(agg.tensors):
            expected.get_submodule(module).weight += exact_update(clients, weights, module)
    ours = lf.load_adapter(tiny_llama(), tmp_path / "agg")
    torch.testing.assert_close(probe_logits(ours), probe_logits(expected), atol=1e-5, rtol=0)
    assert_same_outputs(ours, PeftModel.from_pretrained(tiny_llama(), tmp_path / "agg").eval(), probe_logits)


def test_aggregate_drops_the_clients_start_and_its_options():
    clients = [random_client(seed, rank=2) for seed in (0, 1)]
    for client in clients:  # clients that started with EVA, whose option is EVA's, not LoRA's
        client.config = dataclasses.replace(client.config, init="eva", options={"eva_rho": 1.5})
    config = aggregate("fedavg", clients).config
    assert (config.init, config.options) == ("default", {})
    assert lf.AdapterConfig.from_dict(config.to_dict()) == config  # a config that reloads


def test_flora_one_client_is_that_client_and_order_does_not_matter():
    clients, weights = [random_client(k, r) for k, r in enumerate([3, 5, 2])], [0.5, 0.25, 0.25]
    alone = aggregate("flora", clients[:1], [1.0])
    torch.testing.assert_close(alone.delta_weight("m"), clients[0].delta_weight("m"), atol=1e-6, rtol=0)
    reference = aggregate("flora", clients, weights).delta_weight("m")
    for order in itertools.permutations(range(3)):  # check 4
        permuted = aggregate("flora", [clients[i] for i in order], [weights[i] for i in order])
        torch.testing.assert_close(permuted.delta_weight("m"), reference, atol=1e-6, rtol=0)
    assert torch.linalg.matrix_rank(reference) <= min(10, 12, 3 + 5 + 2)


# ---- FedAvg (FedIT) --------------------------------------------------------------------------------
def test_fedavg_differs_from_the_exact_update_by_the_cross_terms():
    clients = [random_client(k, 4, scale_alpha=a) for k, a in enumerate([8.0, 8.0, 8.0])]
    weights = [0.2, 0.3, 0.5]
    avg = aggregate("fedavg", clients, weights)
    exact = exact_update(clients, weights, "m")
    s = clients[0].scale("m")
    factors = [c.factors("m") for c in clients]
    pairs = itertools.product(zip(weights, factors), repeat=2)
    all_terms = sum(p * q * s * b @ a for (p, (_, b)), (q, (a, _)) in pairs)  # sum_kj p_k p_j s B_k A_j
    torch.testing.assert_close(avg.delta_weight("m") - exact, all_terms - exact, atol=1e-5, rtol=0)
    assert (avg.delta_weight("m") - exact).norm() > 1e-2  # check 2: not exact for K >= 2
    same = aggregate("fedavg", [clients[0]] * 3, weights)  # degenerate case: identical clients are exact
    torch.testing.assert_close(same.delta_weight("m"), clients[0].delta_weight("m"), atol=1e-5, rtol=0)


def test_fedavg_needs_one_rank_unless_padded():
    clients, weights = [random_client(0, 2), random_client(1, 4)], [0.5, 0.5]
    with pytest.raises(lf.AdapterError, match=r"c1: key 'm.lora_A.weight' has rank 4.*--pad"):
        aggregate("fedavg", clients, weights)
    padded = aggregate("fedavg", clients, weights, pad=True)  # check 5: the zero-padding baseline
    (a0, b0), (a1, b1) = clients[0].factors("m"), clients[1].factors("m")
    a_pad = 0.5 * torch.cat([a0, torch.zeros(2, 10)]) + 0.5 * a1
    # scales 4 and 2 differ, so they are folded into B and the aggregate has scale 1
    b_pad = 0.5 * 4 * torch.cat([b0, torch.zeros(12, 2)], 1) + 0.5 * 2 * b1
    torch.testing.assert_close(padded.delta_weight("m"), b_pad @ a_pad, atol=1e-5, rtol=0)
    assert (padded.delta_weight("m") - exact_update(clients, weights, "m")).norm() > 1e-2


# ---- LoRA-FAIR -------------------------------------------------------------------------------------
def fair_setup():
    clients, weights = [random_client(k, 4) for k in range(3)], [0.2, 0.3, 0.5]
    a_bar = sum(p * c.factors("m")[0] for p, c in zip(weights, clients)).double()  # (4, 10)
    b_bar = sum(p * c.factors("m")[1] for p, c in zip(weights, clients)).double()  # (12, 4)
    return clients, weights, a_bar, b_bar, exact_update(clients, weights, "m").double() / clients[0].scale("m")


def test_lora_fair_identical_clients_need_no_residual():  # check 1
    client = random_client(0, 4)
    fair = aggregate("lora-fair", [client] * 3, [0.2, 0.3, 0.5], lam=0.01)
    for key in ("m.lora_A.weight", "m.lora_B.weight"):
        torch.testing.assert_close(fair.tensors[key], client.tensors[key], atol=1e-6, rtol=0)


def test_lora_fair_limit_is_the_least_squares_closed_form():  # checks 2 and 6
    clients, weights, a_bar, b_bar, target = fair_setup()
    fair = aggregate("lora-fair", clients, weights, lam=0.0)
    b_ls = target @ a_bar.T @ torch.linalg.inv(a_bar @ a_bar.T)  # B' = dW A^T (A A^T)^-1
    torch.testing.assert_close(fair.tensors["m.lora_B.weight"].double(), b_ls, atol=1e-5, rtol=0)
    projector = a_bar.T @ torch.linalg.inv(a_bar @ a_bar.T) @ a_bar  # (10, 10)
    residual = (fair.factors("m")[1].double() @ a_bar - target).norm()
    torch.testing.assert_close(residual, (target @ (torch.eye(10, dtype=torch.float64) - projector)).norm(),
                               atol=1e-5, rtol=0)
    assert residual <= (b_bar @ a_bar - target).norm()
    assert residual > 1e-3  # not exact: rank 4 < min(12, 10)


def test_lora_fair_never_worse_than_fedavg_and_lam_shrinks_the_residual():  # checks 3, 4, 5
    clients, weights, _, _, _ = fair_setup()
    exact = exact_update(clients, weights, "m")
    fedavg_error = (aggregate("fedavg", clients, weights).delta_weight("m") - exact).norm()
    b_bar = aggregate("fedavg", clients, weights).tensors["m.lora_B.weight"]
    residual_norms = []
    for lam in [0.0, 0.01, 0.1, 1.0, 10.0]:
        fair = aggregate("lora-fair", clients, weights, lam=lam)
        assert (fair.delta_weight("m") - exact).norm() <= fedavg_error + 1e-6
        assert sum(t.numel() for t in fair.tensors.values()) == 4 * (12 + 10)  # one rank-r pair, like FedIT
        residual_norms.append((fair.tensors["m.lora_B.weight"] - b_bar).norm().item())
    assert residual_norms == sorted(residual_norms, reverse=True) and residual_norms[-1] < residual_norms[0]


# ---- every strategy on real adapter folders ------------------------------------------------------
@pytest.mark.parametrize("strategy", ["fedavg", "lora-fair"])
def test_averaged_aggregates_load_in_loraforge_and_peft(tmp_path, strategy):
    dirs = [save_client(tmp_path, 0, 4, 8), save_client(tmp_path, 1, 4, 4)]  # scales 2 and 1: folded, scale 1
    agg = aggregate(strategy, dirs, [0.4, 0.6], out=tmp_path / "agg")
    assert agg.config.rank == 4
    expected = tiny_llama()
    with torch.no_grad():
        for module in lora_modules(agg.tensors):
            expected.get_submodule(module).weight += agg.delta_weight(module)
    ours = lf.load_adapter(tiny_llama(), tmp_path / "agg")
    torch.testing.assert_close(probe_logits(ours), probe_logits(expected), atol=1e-5, rtol=0)
    assert_same_outputs(ours, PeftModel.from_pretrained(tiny_llama(), tmp_path / "agg").eval(), probe_logits)


# ---- bad input: a clear error naming the adapter and the key, nothing written ---------------------
BAD_INPUTS = {  # name: (client kwargs per adapter, weights, message)
    "other targets": ([{}, {"targets": ["q_proj"]}], [0.5, 0.5], r"client1.*'target_modules'"),
    "other base": ([{"base": "a"}, {"base": "b"}], [0.5, 0.5], r"client1: key 'base_model_name_or_path' is 'b'"),
    "nan weight": ([{}, {}], [float("nan"), 1.0], r"weight nan for adapter .*client0"),
    "inf weight": ([{}, {}], [float("inf"), 0.0], r"weight inf for adapter .*client0"),
    "negative weight": ([{}, {}], [-0.5, 1.5], r"weight -0.5 for adapter .*client0.*non-negative"),
    "weights not summing to 1": ([{}, {}], [0.3, 0.3], r"weights sum to 0.6, not 1"),
    "one weight too few": ([{}, {}], [1.0], r"1 weights for 2 adapters"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_refused_and_nothing_written(tmp_path, case):
    kwargs, weights, message = BAD_INPUTS[case]
    dirs = [save_client(tmp_path, k, **kw) for k, kw in enumerate(kwargs)]
    with pytest.raises(lf.AdapterError, match=message):
        aggregate("flora", dirs, weights, out=tmp_path / "agg")
    assert not (tmp_path / "agg").exists()


def test_adapter_for_another_shape_or_with_nan_tensors_is_refused(tmp_path):
    with pytest.raises(lf.AdapterError, match=r"c1: key 'm.lora_A.weight' has shape \(4, 11\).*another base model"):
        aggregate("flora", [random_client(0, 4), random_client(1, 4, shape=(12, 11))])
    bad = save_client(tmp_path, 0)
    tensors = safetensors.torch.load_file(f"{bad}/adapter_model.safetensors")
    key = next(iter(tensors))
    tensors[key][0, 0] = float("nan")
    safetensors.torch.save_file(tensors, f"{bad}/adapter_model.safetensors")
    with pytest.raises(lf.AdapterError, match=f"{key}.*NaN"):
        aggregate("fedavg", [bad, save_client(tmp_path, 1)], out=tmp_path / "agg")
    assert not (tmp_path / "agg").exists()


# ---- `loraforge fed aggregate` -----------------------------------------------------------------------
def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["fed", "aggregate", *argv])
    return args.run(args)


def test_cli_aggregates_and_merges_into_the_base(tmp_path):
    dirs = [save_client(tmp_path, k, r, 2 * r) for k, r in enumerate([2, 4, 8])]
    assert run_cli(["--strategy", "flora", "--adapters", *dirs, "--weights", "0.2,0.3,0.5", "--out",
                    str(tmp_path / "agg")]) == 0
    assert json.loads((tmp_path / "agg" / "adapter_config.json").read_text())["r"] == 14
    tiny_llama().save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    assert run_cli(["--strategy", "flora", "--adapters", *dirs, "--weights", "0.2,0.3,0.5",
                    "--merge-into", str(tmp_path / "base"), "--out", str(tmp_path / "merged")]) == 0
    merged = type(tiny_llama()).from_pretrained(tmp_path / "merged").eval()
    expected = lf.load_adapter(tiny_llama(), tmp_path / "agg")
    torch.testing.assert_close(probe_logits(merged), probe_logits(expected), atol=1e-5, rtol=0)
    with pytest.raises(lf.AdapterError, match="weights sum to 1.1"):
        run_cli(["--strategy", "fedavg", "--adapters", *dirs[:2], "--weights", "0.5,0.6", "--out", str(tmp_path / "x")])
    with pytest.raises(lf.AdapterError, match="--pad is for fedavg"):
        run_cli(["--strategy", "flora", "--pad", "--adapters", *dirs, "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


# ---- strategies are plug-ins -------------------------------------------------------------------------
@pytest.fixture
def first_client_strategy(monkeypatch):
    """A strategy defined here, in no file of the package (the first client's adapter is the aggregate);
    the registry forgets it after the test."""
    from loraforge.federated.strategies import STRATEGIES, Strategy

    STRATEGIES.names()  # the package's own strategies, registered before the copy is taken
    monkeypatch.setattr(STRATEGIES, "_builders", dict(STRATEGIES._builders))

    class FirstClient(Strategy, name="first-client"):
        title = "First client"

        def aggregate(self, clients, weights):
            return clients[0]

    return FirstClient


def test_a_strategy_defined_anywhere_reaches_aggregate_the_cli_and_fed_run(tmp_path, first_client_strategy):
    dirs = [save_client(tmp_path, k) for k in range(2)]
    assert aggregate("first-client", dirs).name == dirs[0]
    assert run_cli(["--strategy", "first-client", "--adapters", *dirs, "--out", str(tmp_path / "agg")]) == 0
    assert read_client(tmp_path / "agg").tensors.keys() == read_client(dirs[0]).tensors.keys()
    with pytest.raises(lf.AdapterError, match="--lam is for lora-fair; first-client takes none of these flags"):
        run_cli(["--strategy", "first-client", "--lam", "0.1", "--adapters", *dirs, "--out", str(tmp_path / "x")])
    pytest.importorskip("flwr")
    from loraforge.federated.flower import FedRunConfig

    cfg = FedRunConfig(model="m", data="d", strategy="first-client", ranks="2,4")
    assert isinstance(cfg.rule(), first_client_strategy)
    with pytest.raises(lf.LoraforgeError, match="heterogeneous ranks need --strategy flora"):
        cfg.rank_list()  # its clients train the global adapter: one rank


# ---- `fed run` on Flower ---------------------------------------------------------------------------
@pytest.fixture
def fed_setup(tmp_path):
    """A tiny classifier folder and a 60-row TSV whose label shows in the words."""
    tiny_bert().save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    rows = [("good nice fine " if i % 2 else "bad poor awful ") + "abc"[i % 3] for i in range(60)]
    (tmp_path / "data.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(rows)))
    return tmp_path


class LocalGrid:
    """Flower's Grid contract in this process (each message goes straight to the ClientApp's
    function), with some nodes broken: fast tests of the server's logic without Ray."""

    def __init__(self, nodes: int, broken: dict):
        from loraforge.federated.flower import client_train

        self.nodes, self.broken, self.client_train = list(range(1, nodes + 1)), broken, client_train

    def get_node_ids(self):
        return self.nodes

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Context, Error, Message, RecordDict

        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            context = Context(run_id=1, node_id=node, node_config={"partition-id": node - 1}, state=RecordDict(),
                              run_config={})
            try:
                replies.append(self.broken.get(node, self.client_train)(msg, context))
            except Exception as exc:  # what Flower does with a ClientApp that raises
                replies.append(Message(Error(code=0, reason=str(exc)), reply_to=msg))
        return replies


@pytest.fixture
def flower_identity():
    pytest.importorskip("flwr")
    from flwr.supercore.task_identity import TaskIdentity

    saved = TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0  # what run_simulation sets
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def nan_client(msg, context):
    from flwr.app import ArrayRecord

    from loraforge.federated.flower import client_train

    reply = client_train(msg, context)
    poisoned = reply.content["arrays"].to_torch_state_dict()
    next(iter(poisoned.values()))[0] = float("nan")
    reply.content["arrays"] = ArrayRecord(poisoned)
    return reply


def failing_client(msg, context):
    raise RuntimeError("out of memory on this client")


# lora-fair's client and server paths are fedavg's plus the residual: one of the two is enough here
@pytest.mark.parametrize("strategy,ranks", [("flora", "2,4,4,8"), ("lora-fair", "4")])
def test_fed_rounds_drop_bad_clients_checkpoint_and_resume(fed_setup, flower_identity, strategy, ranks, capsys,
                                                           caplog):
    from loraforge.federated.flower import FedRunConfig, prepare, server_main

    cfg = FedRunConfig(model=str(fed_setup / "base"), data=str(fed_setup / "data.tsv"), out=str(fed_setup / "run"),
                       clients=4, partition="dirichlet:0.5", rounds=1, local_steps=2, strategy=strategy, ranks=ranks,
                       batch_size=4, eval_fraction=0.2)
    grid = LocalGrid(4, {3: failing_client, 4: nan_client})
    prepare(cfg)
    server_main(grid, None, cfg)
    resumed = dataclasses.replace(cfg, rounds=2, resume=True)
    prepare(resumed)
    server_main(grid, None, resumed)
    rows = [json.loads(line) for line in (fed_setup / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["clients"] == 2 and 0 <= r["eval_accuracy"] <= 1 for r in rows)
    reasons = list(rows[1]["dropped"].values())  # an error reply and a reply with NaN tensors
    assert "out of memory on this client" in reasons[0] and "NaN" in reasons[1]
    assert "dropped node 3: out of memory" in caplog.text
    assert "resuming after round 1" in capsys.readouterr().out
    glob = read_client(fed_setup / "run" / "global")
    rank = glob.tensors["bert.encoder.layer.0.attention.self.query.lora_A.weight"].shape[0]
    assert rank == (2 * (2 + 4) if strategy == "flora" else 4)  # flora: two rounds of clients 1 and 2 stacked
    lf.load_adapter(tiny_bert(), fed_setup / "run" / "global")  # the checkpointed global fits the base
    with pytest.raises(lf.LoraforgeError, match="other settings .*local_steps"):
        prepare(dataclasses.replace(resumed, local_steps=3))
    with pytest.raises(lf.LoraforgeError, match="not empty"):
        prepare(cfg)


def test_flora_stacks_rounds_exactly():
    from loraforge.federated.strategies.flora import stack_onto

    rounds = [aggregate("flora", [random_client(2 * t, 2), random_client(2 * t + 1, 3)], [0.4, 0.6]) for t in range(3)]
    glob = None
    for agg in rounds:
        glob = stack_onto(glob, agg)
    torch.testing.assert_close(glob.delta_weight("m"), sum(a.delta_weight("m") for a in rounds), atol=1e-6, rtol=0)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LORAFORGE_RAY_TESTS") != "1",
                    reason="starts a Ray cluster (35 s idle, minutes on a busy CPU): LORAFORGE_RAY_TESTS=1 runs it")
def test_fed_run_in_flowers_simulation_engine(fed_setup):
    pytest.importorskip("flwr")
    assert main(["fed", "run", "--model", str(fed_setup / "base"), "--data", str(fed_setup / "data.tsv"),
                 "--clients", "2", "--rounds", "1", "--local-steps", "1", "--strategy", "flora",
                 "--ranks", "2,4", "--batch-size", "4", "--out", str(fed_setup / "run")]) == 0
    assert json.loads((fed_setup / "run" / "metrics.jsonl").read_text())["clients"] == 2
    assert (fed_setup / "run" / "accuracy.png").is_file()


# ---- the Flower app `flwr run` deploys -------------------------------------------------------------
def test_pyproject_declares_a_valid_flower_app_whose_config_is_fed_runs():
    pytest.importorskip("flwr")
    from pathlib import Path

    import tomllib
    from flwr.common.config import validate_config

    from loraforge.federated.app import config_from_run_config
    from loraforge.federated.flower import FedRunConfig

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    valid, errors, _ = validate_config(pyproject, check_module=True)  # imports the two components
    assert valid, errors
    defaults = pyproject["tool"]["flwr"]["app"]["config"]
    # Flower accepts --run-config overrides only for keys the app declares: every setting is declared.
    assert {k.replace("-", "_") for k in defaults} == {f.name for f in dataclasses.fields(FedRunConfig)} - {"num_labels"}
    cfg = config_from_run_config(defaults)
    assert cfg.local_steps == defaults["local-steps"] and cfg.lr == defaults["lr"] and cfg.resume is False


@pytest.mark.parametrize("run_config, message", [
    ({"model": "m", "data": "d", "local_step": 3}, "'local_step' is not a setting"),
    ({"model": "m", "data": "d", "rounds": "many"}, "'rounds' = 'many' is not a int"),
    ({"model": "m"}, "the run config lacks data"),
])
def test_run_config_errors_name_the_key(run_config, message):
    pytest.importorskip("flwr")
    from loraforge.federated.app import config_from_run_config

    with pytest.raises(lf.LoraforgeError, match=message):
        config_from_run_config(run_config)


def test_server_app_runs_rounds_from_flowers_run_config(fed_setup, flower_identity):
    from flwr.app import Context, RecordDict

    from loraforge.federated.app import serve_rounds

    run_config = {"model": str(fed_setup / "base"), "data": str(fed_setup / "data.tsv"), "out": str(fed_setup / "run"),
                  "clients": 2, "rounds": 1, "local-steps": 1, "strategy": "fedavg", "ranks": "2", "batch-size": 4,
                  "eval-fraction": 0.2}
    serve_rounds(LocalGrid(2, {}), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                           run_config=run_config))
    (row,) = [json.loads(line) for line in (fed_setup / "run" / "metrics.jsonl").read_text().splitlines()]
    assert row["clients"] == 2 and row["bytes_up"] > 0 and row["bytes_down"] > 0
    lf.load_adapter(tiny_bert(), fed_setup / "run" / "global")


# ---- `loraforge bench fed` ------------------------------------------------------------------------------
def test_bench_fed_runs_every_strategy_and_the_centralised_baseline(fed_setup, flower_identity):
    from loraforge.bench.fed import FedBench, bench_fed, orderings, write_section
    from loraforge.federated.flower import prepare, server_main

    def in_process(cfg, cpus):  # Flower's Grid contract without Ray: the server logic is what is measured here
        prepare(cfg)
        server_main(LocalGrid(cfg.clients, {}), None, cfg)

    bench = FedBench(models=str(fed_setup / "base"), data=str(fed_setup / "data.tsv"), clients=3, rounds=2,
                     local_steps=1, batch_size=4, rank=2, flora_ranks="2,4", out=str(fed_setup / "bench"))
    (result,) = bench_fed(bench, runner=in_process)
    curves = result["curves"]
    assert list(curves) == ["fedavg", "flora", "lora-fair", "centralised"]
    assert all([r["round"] for r in rows] == [1, 2] and 0 <= rows[-1]["eval_accuracy"] <= 1 for rows in curves.values())
    assert curves["centralised"][0]["bytes_up"] == 0 < curves["fedavg"][0]["bytes_up"]
    # FLoRA sends back fresh factors of ranks 2, 4, 2; FedAvg rank 2 each: more bytes up for FLoRA
    assert curves["flora"][0]["bytes_up"] > curves["fedavg"][0]["bytes_up"]
    lines = orderings(result)
    assert len(lines) == 4 and all(line.endswith((": held.", ": did not hold.", ").")) for line in lines)
    assert result["held_out"] > 0
    scores = {"fedavg": [0.60, 0.70, 0.80], "flora": [0.90, 0.85, 0.84], "lora-fair": [0.5, 0.81, 0.81],
              "centralised": [0.8, 0.9, 0.9]}  # last-third means: 0.80, 0.84, 0.81, 0.90
    made_up = {"task": "classification", "held_out": 400,  # one standard error: 0.025
               "curves": {name: [{"eval_accuracy": a} for a in accs] for name, accs in scores.items()}}
    assert orderings(made_up) == ["FLoRA above FedAvg (FLoRA paper): held.",
                                  "LoRA-FAIR above FedAvg (LoRA-FAIR paper): a tie (0.810 vs 0.800, within one "
                                  "standard error, 0.025).",
                                  "LoRA-FAIR above FLoRA (LoRA-FAIR paper): did not hold.",
                                  "centralised above every federated strategy (the usual upper bound): held."]
    losses = {"task": "causal-lm", "held_out": 40, "curves": {
        "fedavg": [{"eval_loss": 3.0576}], "flora": [{"eval_loss": 3.19}], "lora-fair": [{"eval_loss": 3.0574}],
        "centralised": [{"eval_loss": 1.24}]}}
    assert orderings(losses)[1] == "LoRA-FAIR above FedAvg (LoRA-FAIR paper): a tie (3.057 vs 3.058, within 0.010)."
    assert orderings(losses)[2].endswith(": held.")  # lower loss is better
    body = write_section(bench, [result], "cmd", plot_dir=fed_setup)
    assert "| centralised |" in body and list(fed_setup.glob("bench-fed-*.png"))
    # kept: the same command re-renders from results.json without training; other settings are refused
    assert bench_fed(bench, runner=lambda cfg, cpus: pytest.fail("trained again")) == [result]
    with pytest.raises(lf.LoraforgeError, match="other settings"):
        bench_fed(dataclasses.replace(bench, rounds=3), runner=in_process)
    (fed_setup / "bench" / "base" / "results.json").unlink()  # a run that was stopped part-way
    with pytest.raises(lf.LoraforgeError, match="not empty"):
        bench_fed(bench, runner=in_process)


def test_the_flower_apps_default_data_is_a_name_read_under_LORAFORGE_DATA(tmp_path, monkeypatch):
    """pyproject's run config names its data set (`sst2`), never a path on one machine."""
    pytest.importorskip("flwr")
    from pathlib import Path

    import tomllib

    from loraforge.federated.app import config_from_run_config
    from loraforge.federated.flower import split_rows

    defaults = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    cfg = config_from_run_config(defaults)
    assert cfg.data == "sst2"
    monkeypatch.delenv("LORAFORGE_SHARED_DATA", raising=False)
    monkeypatch.delenv("LORAFORGE_DATA", raising=False)
    with pytest.raises(lf.LoraforgeError, match="set LORAFORGE_DATA"):
        split_rows(cfg)
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"row {i}\t{i % 2}\n" for i in range(40)))
    monkeypatch.setenv("LORAFORGE_DATA", str(tmp_path))
    held_out, shards = split_rows(cfg)
    assert len(held_out) == 4 and sum(len(s) for s in shards) == 36 and len(shards) == cfg.clients


@pytest.mark.parametrize("strategy,ranks", [("flora", "2,4"), ("fedavg", "2")])
def test_every_client_starts_a_round_from_the_model_the_server_evaluated(fed_setup, flower_identity, strategy, ranks):
    """FLoRA's clients merge the global adapter (stacked factors and the averaged head) into their base
    and attach a fresh LoRA; FedAvg's train the global adapter itself. Either way a client's starting
    model is the one the server scored (bench fed's FLoRA lag under label skew is not a lost update)."""
    import torch

    from loraforge.federated.flower import FedRunConfig, base_model, prepare, server_main, with_global

    cfg = FedRunConfig(model=str(fed_setup / "base"), data=str(fed_setup / "data.tsv"), out=str(fed_setup / "run"),
                       clients=2, partition="dirichlet:0.5", rounds=1, local_steps=3, strategy=strategy, ranks=ranks,
                       batch_size=4, eval_fraction=0.2, lr=5e-2)
    prepare(cfg)
    server_main(LocalGrid(2, {}), None, cfg)
    glob = read_client(fed_setup / "run" / "global")
    cfg.num_labels = 2
    client, tokenizer = with_global(cfg, glob, trainable=True)
    server, _ = with_global(cfg, glob, trainable=False)
    base, _ = base_model(cfg)
    batch = tokenizer(["good nice a", "bad poor b", "fine c"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ours, theirs, before = (m.eval()(**batch).logits for m in (client, server, base))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert (theirs - before).abs().max() > 1e-3  # the round changed the model
