"""`loraforge bench serve` on a tiny Llama: the workload, every system on the same requests, the
issue's JSON, and the HTTP load test (zero errors, engine idle after)."""

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

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
    row = {"loraforge_tok_s": 100.0, "peft_switch_tok_s": 20.0, "peft_mixed_tok_s": 60.0, "base_tok_s": 120.0,
           "loraforge_mixable_tok_s": 110.0, "llamacpp_tok_s": 125.0}
    assert targets(row) == ["at least 6x PEFT switching: 5.0x, not met", "at least 2x PEFT mixed batches: 1.83x, not met",
                            "within 1.15x of the no-adapter ceiling: 1.20x below it, not met",
                            "faster than llama.cpp one adapter at a time: 0.80x, not met"]
    row |= {"peft_switch_tok_s": 10.0, "loraforge_mixable_tok_s": 130.0, "base_tok_s": 110.0, "llamacpp_tok_s": 50.0}
    assert [t.rsplit(", ", 1)[1] for t in targets(row)] == ["met"] * 4


def test_mixed_kinds_each_adapter_as_its_method_saves_it(model_dir, tmp_path):
    """lora, dora, lora-xs, mts cycled: DoRA with a magnitude of its own, LoRA-XS saved as its LoRA
    (A, B R), mts a LoRA with `mts_rows` rows of the tied head trained."""
    from loraforge.adapters.io import read_adapter

    names = make_adapters(str(model_dir / "model"), 5, [2, 4], tmp_path, kinds=["lora", "dora", "lora-xs", "mts"],
                          mts_rows=7)
    configs = [read_adapter(tmp_path / n) for n in names]
    assert [c[0].method for c in configs] == ["lora", "dora", "lora", "lora", "lora"]
    assert [c[0].modules_to_save for c in configs] == [None, None, None, ["lm_head"], None]
    base = tiny_llama()
    head = configs[3][2]["lm_head.weight"]
    assert int((head != base.lm_head.weight).any(1).sum()) == 7
    dora = lf.load_adapter(tiny_llama(), tmp_path / names[1])
    layer = next(iter(lf.adapter_layers(dora).values()))
    gain = layer.lora_magnitude_vector / layer._row_norm()
    assert 0 < float((gain - 1).abs().max()) < 0.2  # a gain that acts, of a trained adapter's size
    xs = lf.load_adapter(tiny_llama(), tmp_path / names[2])
    for name, layer in lf.adapter_layers(xs).items():
        ratio = float(layer.delta_weight().norm() / layer._w0().norm())
        assert abs(ratio - 0.02) < 1e-4, name


def test_mixed_kinds_run_peft_mixed_on_what_peft_can_mix(model_dir, tmp_path):
    report = bench_serve(settings(model_dir, adapters="4", distributions="uniform", requests=8,
                                  methods="lora,dora,lora-xs,mts", mts_rows=5, repeats=2, out=str(tmp_path)))
    row = report["runs"][0]
    mixable = row["peft_mixed_requests"]
    assert 0 < mixable < row["requests"] == row["peft_switch_requests"] == row["base_requests"]
    assert row["loraforge_mixable_requests"] == mixable and row["loraforge_mixable_tok_s"] > 0
    assert len(row["loraforge_tok_s_rounds"]) == 2 and row["loraforge_tok_s"] in row["loraforge_tok_s_rounds"]
    assert (tmp_path / "adapters-model-lora+dora+lora-xs+mts-mts5" / "a003").is_dir()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_llama_cpp_serves_each_request_with_its_own_adapter(tmp_path):
    """llama.cpp on SmolLM2 as GGUF f32, its adapter set per request: plain LoRA adapters give the
    engine's greedy tokens, a DoRA adapter goes through its rank-R conversion, a modules_to_save one
    through its merged GGUF, and the next request's adapter is never the last one's."""
    from loraforge.bench.serve import Work
    from loraforge.bench.serve_llamacpp import LlamaCpp, prepare_gguf
    from loraforge.serve import Engine, SamplingParams

    names = make_adapters("smollm2-135m", 4, [8], tmp_path, kinds=["lora", "dora", "lora", "mts"], mts_rows=64)
    weights = tmp_path / "a002" / "adapter_model.safetensors"  # one adapter strong enough to change greedy tokens
    save_file({k: v * 60 if "lora_B" in k else v for k, v in load_file(str(weights)).items()}, str(weights))
    base, tokenizer = lf.load_model("smollm2-135m")
    base_file, loras, merged, errors = prepare_gguf("smollm2-135m", base, tokenizer, tmp_path, names, 8)
    assert set(loras) == {"a000", "a001", "a002"} and set(merged) == {"a003"} and set(errors) == {"a001"}
    prompt = tokenizer.encode("<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n")
    order = ["a000", "a002", None, "a000", "a003", "a001", "a002"]
    work = [Work(prompt, name, 8) for name in order]
    llama = LlamaCpp(base_file, loras, merged, n_ctx=128, threads=2)
    try:
        assert len(llama.run(work)) == len(work)
    finally:
        llama.close()
    engine = Engine(base, tokenizer, adapters_dir=str(tmp_path), max_loaded=4, max_rank=8)
    reqs = engine.generate([prompt] * len(order), order, SamplingParams(max_tokens=8, ignore_eos=True))
    ours = {name: r.output_ids for name, r in zip(order, reqs)}
    got = dict(zip(order, llama.outputs))
    for name in ("a000", "a002", None, "a003"):
        assert got[name] == ours[name], name
    assert got["a002"] != got[None]  # the adapter acts: llama.cpp applied it, and cleared it for the base
    assert llama.outputs[0] == llama.outputs[3]  # a000 again after others: the same tokens


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
    (dict(systems="loraforge,vllm"), "--systems takes loraforge"),
    (dict(systems="peft_switch"), "--systems takes loraforge"),
    (dict(methods="lora,bone"), "--methods takes lora, dora, lora-xs, mts"),
    (dict(repeats=0), "--repeats"),
])
def test_bad_settings_are_refused(model_dir, change, message):
    with pytest.raises(lf.LoraforgeError, match=message):
        bench_serve(settings(model_dir, **change))
