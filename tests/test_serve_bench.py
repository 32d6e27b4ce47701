"""`loraforge bench serve` on a tiny Llama: the workload, every system on the same requests, the
issue's JSON, and the HTTP load test (zero errors, engine idle after)."""

import json

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("fastapi")

import loraforge as lf  # noqa: E402
from loraforge.bench.serve import ServeBench, bench_serve, make_adapters, targets, workload  # noqa: E402
from loraforge.testing import tiny_llama, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-serve")
    tiny_llama().save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    return root


def settings(root, **kw) -> ServeBench:
    return ServeBench(**(dict(model=str(root / "model"), adapters="1,3", distributions="uniform,power", requests=6,
                              prompt_min=3, prompt_max=9, max_tokens=4, ranks="2,4", max_batch=4,
                              out=str(root / "runs")) | kw))


def test_adapters_are_made_once_with_the_ranks_asked(model_dir, tmp_path):
    names = make_adapters(str(model_dir / "model"), 3, [2, 4], tmp_path)
    assert names == ["a000", "a001", "a002"]
    ranks = [json.loads((tmp_path / n / "adapter_config.json").read_text())["r"] for n in names]
    assert ranks == [2, 4, 2]
    stamp = (tmp_path / "a000" / "adapter_model.safetensors").stat().st_mtime_ns
    make_adapters(str(model_dir / "model"), 4, [2, 4], tmp_path)  # adds a003 only
    assert (tmp_path / "a003").is_dir() and (tmp_path / "a000" / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    adapter = lf.load_adapter(tiny_llama(), tmp_path / "a001")
    assert all(0 < float(layer.lora_B.weight.abs().max()) < 0.05 for layer in lf.adapter_layers(adapter).values())


def test_workload_is_seeded_bounded_and_skewed_under_the_power_law(model_dir):
    bench = settings(model_dir, requests=400, prompt_min=5, prompt_max=9, max_tokens=8)
    names = [f"a{i:03d}" for i in range(8)]
    uniform = workload(bench, names, "uniform", 256)
    assert [w.prompt for w in uniform] == [w.prompt for w in workload(bench, names, "uniform", 256)]
    assert all(5 <= len(w.prompt) <= 9 and 2 <= w.new_tokens <= 8 for w in uniform)
    power = workload(bench, names, "power", 256)
    first = sum(w.adapter == "a000" for w in power) / len(power)
    assert first > 0.25 > sum(w.adapter == "a000" for w in uniform) / len(uniform)  # 1/H_8 = 0.37 vs 1/8
    assert {w.adapter for w in workload(bench, None, "uniform", 256)} == {None}


def test_every_system_runs_the_same_requests_and_the_json_has_the_issues_keys(model_dir, tmp_path):
    report = bench_serve(settings(model_dir, json=str(tmp_path / "serve.json")))
    saved = json.loads((tmp_path / "serve.json").read_text())
    assert saved == json.loads(json.dumps(report)) and saved["machine"]
    assert [(r["adapters"], r["distribution"]) for r in saved["runs"]] == [
        (1, "uniform"), (1, "power"), (3, "uniform"), (3, "power")]
    for run in saved["runs"]:
        for key in ("loraforge_tok_s", "peft_switch_tok_s", "peft_mixed_tok_s", "merge_swap_tok_s", "base_tok_s"):
            assert run[key] > 0, key
        assert run["p50_ms"] <= run["p99_ms"]


def test_targets_compare_against_the_baselines():
    row = {"loraforge_tok_s": 100.0, "peft_switch_tok_s": 20.0, "peft_mixed_tok_s": 120.0, "base_tok_s": 120.0}
    assert targets(row) == ["at least 4x PEFT switching: 5.0x, met", "above PEFT mixed batches: 0.83x, not met",
                            "within 1.3x of the base-model ceiling: 1.20x below it, met"]


def test_load_test_passes_with_zero_errors_and_an_idle_engine_after(model_dir):
    torch.manual_seed(0)
    result = bench_serve(settings(model_dir, load=True, load_requests=24, load_concurrency=4, load_adapters=3,
                                  load_max_tokens=4))
    assert result["passed"] and result["errors"] == 0 and result["engine_idle_after"]
    assert result["requests"] == 24 and result["p50_ms"] <= result["p99_ms"]


def test_soak_gets_no_5xx_every_hostile_kind_a_4xx_and_the_engine_back_to_idle(model_dir):
    from loraforge.bench.serve_soak import KINDS

    torch.manual_seed(0)
    result = bench_serve(settings(model_dir, soak=True, load_requests=120, load_concurrency=8, load_adapters=3,
                                  load_max_tokens=4))
    assert result["passed"] and result["server_errors_5xx"] == 0 and result["engine_idle_after"]
    assert result["kv_free_after"] == result["kv_free_before"] == result["kv_blocks"]
    by_kind = result["by_kind"]
    assert set(KINDS) - {"reload"} <= set(by_kind) and {"unload", "load"} <= set(by_kind)
    for kind in ("oversized", "nested", "bad_utf8", "huge_max_tokens", "negative_max_tokens", "traversal",
                 "wrong_type"):
        assert set(by_kind[kind]) <= {"400", "413", "422"}, (kind, by_kind[kind])
    assert by_kind["valid"] == {"200": sum(by_kind["valid"].values())}
    assert result["client_errors_4xx"] >= sum(sum(by_kind[k].values()) for k in ("oversized", "nested", "bad_utf8"))


@pytest.mark.parametrize("change, message", [
    (dict(distributions="zipf"), "uniform and power"),
    (dict(adapters="0"), "positive"),
    (dict(prompt_min=10, prompt_max=5), "prompt-min"),
])
def test_bad_settings_are_refused(model_dir, change, message):
    with pytest.raises(lf.LoraforgeError, match=message):
        bench_serve(settings(model_dir, **change))
