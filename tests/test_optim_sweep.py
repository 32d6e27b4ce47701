"""The learning-rate sweep of `bench methods --lrs` (loraforge/bench/sweep.py): rule names map to their
TrainConfig field, every (method, rule, lr) runs, and the summary's best and width follow their definition."""

import pytest

import loraforge as lf
from loraforge.bench.methods import BenchRun, all_runs, rule_fields
from loraforge.bench.sweep import summarise


def test_rule_names_map_to_their_field():
    assert rule_fields("lora-pro") == {"optimizer": "lora-pro"}
    assert rule_fields("glad") == {"regularizer": "glad"}
    assert rule_fields("lisa") == {"select": "lisa"}
    with pytest.raises(lf.LoraforgeError, match="unknown rule"):
        rule_fields("adam-w")


def test_every_method_rule_and_rate_runs():
    runs = all_runs(BenchRun(), ["lora", "dora"], ["adamw", "lora-plus"], [1e-4, 1e-3, 1e-2])
    assert len(runs) == 12
    assert {(r.method, r.rule, r.lr) for r in runs} == {(m, r, lr) for m in ("lora", "dora") for r in ("adamw", "lora-plus")
                                                         for lr in (1e-4, 1e-3, 1e-2)}


def test_pairs_run_only_the_named_combinations():
    from loraforge.bench.cli import _pairs

    pairs = _pairs("lora/adamw, dora/adamw,lora/lisa")
    assert pairs == [("lora", "adamw"), ("dora", "adamw"), ("lora", "lisa")]
    runs = all_runs(BenchRun(), None, lrs=[1e-4, 1e-3], pairs=pairs)
    assert [(r.method, r.rule, r.lr) for r in runs] == [(m, rule, lr) for m, rule in pairs for lr in (1e-4, 1e-3)]
    with pytest.raises(SystemExit, match="'lora' is not METHOD/RULE"):
        _pairs("lora/adamw,lora")
    with pytest.raises(lf.LoraforgeError, match="not both"):
        all_runs(BenchRun(), ["lora"], pairs=pairs)
    with pytest.raises(lf.LoraforgeError, match="unknown rule"):
        all_runs(BenchRun(), None, pairs=[("lora", "lisaa")])


def test_bench_methods_runs_every_method_then_lora_under_each_initialiser_at_its_own_rate():
    runs = all_runs(BenchRun(lr=2e-3), None, method_lrs={"full": 1e-4, "pissa": 5e-4})
    starts = [(r.method, r.init) for r in runs]
    assert starts[: len(lf.methods())] == [(m.name, "default") for m in lf.methods()]
    assert {("lora", "pissa"), ("lora", "lora-ga"), ("lora", "eva")} <= set(starts)
    rate = {(r.method, r.init): r.lr for r in runs}
    assert rate["full", "default"] == 1e-4 and rate["lora", "pissa"] == 5e-4 and rate["lora", "eva"] == 2e-3
    # A subset of methods runs only those, unless initialisers are named too.
    assert [(r.method, r.init) for r in all_runs(BenchRun(), ["dora"])] == [("dora", "default")]
    assert [(r.method, r.init) for r in all_runs(BenchRun(), ["dora"], inits=["pissa"])] == [("dora", "default"),
                                                                                         ("lora", "pissa")]
    with pytest.raises(lf.LoraforgeError, match="unknown method"):
        all_runs(BenchRun(), ["dorra"])


def test_a_finished_run_is_kept_and_not_run_again(tmp_path, monkeypatch):
    from loraforge.bench import methods

    calls = []

    def fake_run(args, **kw):
        calls.append(args)
        return type("Done", (), {"returncode": 0, "stdout": '{"method": "lora", "dev_accuracy": 0.9}\n'})()

    monkeypatch.setattr(methods.subprocess, "run", fake_run)
    run = BenchRun(out=str(tmp_path), steps=3)
    assert methods.run_in_process(run) == {"method": "lora", "dev_accuracy": 0.9}
    assert methods.run_in_process(run) == {"method": "lora", "dev_accuracy": 0.9}
    assert len(calls) == 1
    methods.run_in_process(BenchRun(out=str(tmp_path), steps=4))  # another budget is another run
    assert len(calls) == 2


def test_summary_best_and_width_within_one_point():
    def row(rule, lr, acc):
        return {"method": "lora", "rule": rule, "lr": lr, "dev_accuracy": acc, "dev_loss": 1.0,
                "step_s": 2.0 if rule == "lora-pro" else 1.0 + lr, "peak_rss_mb": 300.0 if rule == "lora-pro" else 100.0}

    results = [row("adamw", 1e-4, 0.80), row("adamw", 1e-3, 0.905), row("adamw", 1e-2, 0.90),
               row("lora-pro", 1e-4, 0.70), row("lora-pro", 1e-3, 0.91), row("lora-pro", 1e-2, 0.50),
               {"method": "lora", "rule": "allora", "lr": 1e-3, "error": "boom"}]
    summary = {s["rule"]: s for s in summarise(results)}
    assert summary["adamw"]["best"] == 0.905 and summary["adamw"]["best_lr"] == 1e-3
    assert summary["adamw"]["width_decades"] == pytest.approx(1.0)  # 1e-3 .. 1e-2 within 0.01 of the best
    assert summary["lora-pro"]["width_decades"] == 0.0
    assert summary["adamw"]["step_s"] == 1.0 + 1e-3 and summary["lora-pro"]["peak_rss_mb"] == 300.0  # medians: the overhead
    assert summary["allora"]["error"] == "boom"


def test_loss_summary_prefers_the_lowest_loss():
    results = [{"method": "lora", "rule": "adamw", "lr": lr, "dev_accuracy": None, "dev_loss": loss, "step_s": 1.0,
                "peak_rss_mb": 1.0}
               for lr, loss in ((1e-4, 2.0), (1e-3, 1.5), (1e-2, 1.505))]
    (summary,) = summarise(results)
    assert summary["best"] == 1.5 and summary["best_lr"] == 1e-3 and summary["width_decades"] == pytest.approx(1.0)


def test_the_benchmark_reports_what_each_selector_chose():
    from loraforge.bench.methods import selection_summary

    assert selection_summary(None) is None
    assert selection_summary({"method": "flexora", "layers": [0, 3], "gate_logits": {"0": 0.2}}) == "layers [0, 3]"
    assert selection_summary({"method": "diffora", "modules": ["a.q", "b.v"]}) == "2 modules: a.q, b.v"
    colora = selection_summary({"method": "colora", "ranks": {"a": 2, "b": 12, "c": 6, "d": 4}, "contribution": {}})
    assert colora == "ranks 2 to 12 over 4 modules, highest: b (12), c (6), d (4)"


def test_figures_of_benchmarks_run_in_the_same_second_do_not_overwrite_each_other(tmp_path):
    from loraforge.bench import figure_name

    first = figure_name("bench-fed", tmp_path)
    (tmp_path / first).write_bytes(b"png")
    second = figure_name("bench-fed", tmp_path)
    if second.count("-") == first.count("-"):  # the clock moved on to the next second: a new name anyway
        assert second != first
    else:
        assert second == first.removesuffix(".png") + "-2.png"
