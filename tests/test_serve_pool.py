"""The adapter pool: LRU slots, reference counts, validation at load, PEFT adapters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loraforge as lf
from loraforge.serve import AdapterPool, Engine, SamplingParams, UnknownAdapterError, native
from loraforge.testing import tiny_llama, tiny_tokenizer

NATIVE = ("native",) if native.library() is not None else ()  # where lowrank.c builds (a C compiler at hand)


def save(root, name, **config):
    model = tiny_llama()
    lf.attach(model, lf.AdapterConfig(init="random", **config))
    return lf.save_adapter(model, root / name)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    for i, rank in enumerate([4, 8, 4, 8]):
        save(root, f"n{i}", rank=rank, seed=i)
    return root


def pool_for(root, **kw) -> AdapterPool:
    return Engine(tiny_llama(), tiny_tokenizer(), adapters_dir=root, **kw).pool


def test_lru_eviction_only_of_idle_adapters(root):
    pool = pool_for(root, max_loaded=2)
    assert pool.acquire("n0") == 1 and pool.acquire("n1") == 2
    assert pool.acquire("n2") is None  # both slots held by running requests
    pool.release("n0")
    pool.release("n1")
    pool.acquire("n1"), pool.release("n1")  # n1 is now the most recently used
    assert pool.acquire("n2") == 1  # evicts n0, the least recently used
    assert list(pool.slot_of) == ["n1", "n2"] and (pool.hits, pool.misses, pool.evictions) == (1, 3, 1)
    module = "model.layers.1.mlp.down_proj"
    assert pool.rank[module][1] == 4 and pool.rank[module][2] == 8
    assert torch.equal(pool.A[module][1, 4:], torch.zeros(12, 64))  # rank 4 in a rank-16 slot: zero rows
    with pytest.raises(UnknownAdapterError, match="'n9'"):
        pool.acquire("n9")


def test_queued_requests_prefetch_their_adapter_into_an_empty_slot(root):
    engine = Engine(tiny_llama(), tiny_tokenizer(), adapters_dir=root, max_loaded=2, max_batch=1)
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    first, queued = engine.add_request("abc", "n0", params), engine.add_request("abc", "n1", params)
    engine.step()
    assert engine.running == [first] and "n1" in engine.pool.slot_of and not engine.pool.refs.get("n1")
    while engine.has_work():
        engine.step()
    assert (engine.pool.hits, engine.pool.misses) == (1, 2) and queued.finish_reason == "length"


def test_more_adapters_than_slots_in_one_batch_stay_exact(root):
    """Spec check 5: with capacity 2, four adapters are served in turn and results are unchanged."""
    names = ["n0", "n1", "n2", "n3", None]
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    small = Engine(tiny_llama(), tiny_tokenizer(), adapters_dir=root, max_loaded=2)
    large = Engine(tiny_llama(), tiny_tokenizer(), adapters_dir=root, max_loaded=4)
    got = [r.output_ids for r in small.generate(["abc", "de", "fghij", "k", "lm"], names, params)]
    assert got == [r.output_ids for r in large.generate(["abc", "de", "fghij", "k", "lm"], names, params)]
    assert small.pool.evictions >= 2 and not any(small.pool.refs.values())


def test_peft_lora_adapter_is_served_like_its_merge(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                                                               init_lora_weights=False))
    model.save_pretrained(tmp_path / "peft-a")
    merged = model.merge_and_unload()
    engine = Engine(tiny_llama(), tiny_tokenizer(), adapters_dir=tmp_path)
    out = engine.generate(["hello"], ["peft-a"], SamplingParams(max_tokens=5, ignore_eos=True))[0].output_ids
    ids = tiny_tokenizer().encode("hello")
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(merged(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    assert out == ids[-5:]


def test_an_adapter_unloaded_while_queued_fails_only_its_request(root):
    engine = Engine(tiny_llama(), tiny_tokenizer(), adapters_dir=root)
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    doomed, other = engine.add_request("abc", "n0", params), engine.add_request("abc", "n1", params)
    engine.pool.unregister("n0")
    while not other.done.is_set():
        engine.step()
    assert doomed.finish_reason.startswith("refused: unknown adapter 'n0'") and other.finish_reason == "length"
    assert engine.kv.free_blocks == engine.kv.num_blocks


@pytest.mark.parametrize("case, match", [
    ("full", "'full' adapter, which retrains the base itself"),
    ("dora-rank", "rank 32 > max rank 16"),
    ("norm", "modules_to_save 'model.norm' is neither the embedding, the output head nor a projection"),
    ("rank", "rank 32 > max rank 16"),
    ("stray-key", "key 'model.embed_tokens.lora_A.weight' has no place"),
    ("no-B", "lacks its lora_B"),
])
def test_invalid_adapters_are_refused_at_load_naming_the_problem(tmp_path, case, match):
    if case == "full":
        save(tmp_path, case, method="full")
    elif case == "dora-rank":
        save(tmp_path, case, method="dora", rank=32, seed=0)
    elif case == "norm":
        save(tmp_path, case, rank=4, seed=0, target_modules=["q_proj"], modules_to_save=["model.norm"])
    elif case == "rank":
        save(tmp_path, case, rank=32, seed=0)
    else:
        folder = save(tmp_path, case, rank=4, seed=0, target_modules=["q_proj"])
        tensors = load_file(folder / "adapter_model.safetensors")
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
        if case == "stray-key":
            tensors["base_model.model.model.embed_tokens.lora_A.weight"] = tensors[key].clone()
        else:
            del tensors[key]
        save_file(tensors, folder / "adapter_model.safetensors")
    pool = pool_for(tmp_path)
    with pytest.raises(lf.AdapterError, match=match):
        pool.check(case)


def test_padded_and_segment_layouts_give_the_same_low_rank_path():
    """S-LoRA's eq. per token, Y_t = s_a(t) (X_t A_a(t)^T) B_a(t)^T, by both layouts, against a
    per-token loop; adapters of ranks 2 and 5, one of them with DoRA's gain g (Y_t = g (W0 X_t + ...)),
    a dense update and the base (slot 0) in one batch."""
    from loraforge.serve.pool import LoRABatch
    from loraforge.serve.updates import HostUpdate

    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 7, bias=False)
    pool = AdapterPool({"m": linear}, max_loaded=4, max_rank=5)
    factors = {1: (torch.randn(2, 6), torch.randn(7, 2), 0.5), 2: (torch.randn(5, 6), torch.randn(7, 5), 2.0),
               3: (torch.randn(2, 6), torch.randn(7, 2), 1.0)}
    gain, dense = torch.rand(7) + 0.5, torch.randn(7, 6)
    for slot, (a, b, s) in factors.items():
        pool._fill(slot, {"m": HostUpdate(a, b * s, gain=gain if slot == 3 else None)})
    pool._fill(4, {"m": HostUpdate(dense=dense)})
    batch = LoRABatch.build([(0, 0, 2), (1, 2, 3), (2, 3, 7), (3, 7, 9), (4, 9, 10)])
    (run,) = batch.runs  # no ranks given: one run over every slot, 4 rows a slot
    assert batch.token_slots.tolist() == [0, 0, 1, 2, 2, 2, 2, 3, 3, 4] and run.rows.tolist()[3:7] == [8, 9, 10, 11]
    x, base = torch.randn(10, 6), torch.randn(10, 7)
    want = []
    for t, slot in enumerate(batch.token_slots.tolist()):
        if slot == 0:
            want.append(base[t])
        elif slot == 4:
            want.append(base[t] + dense @ x[t])
        else:
            a, b, s = factors[slot]
            row = base[t] + s * (x[t] @ a.T) @ b.T
            want.append(gain * row if slot == 3 else row)
    planned = LoRABatch.build(batch.segments, slot_ranks=pool.slot_rank)  # slots 0 and 4 have no factors
    assert [(r.first, r.last) for r in planned.runs] == [(1, 3)]
    for kernel, b in (("segment", batch), ("padded", batch), ("padded", planned), *((k, batch) for k in NATIVE)):
        y = base.clone()
        pool.add_delta("m", x, y, b, kernel=kernel)
        torch.testing.assert_close(y, torch.stack(want), atol=1e-5, rtol=1e-5)
    y = base.clone()
    pool.add_delta("m", x, y, LoRABatch.build([(0, 0, 10)]))  # no adapter: y untouched
    assert torch.equal(y, base)
    pool._fill(4, {})  # a slot refilled without a dense update drops the old one
    assert not pool.dense["m"]
    with pytest.raises(ValueError, match="increasing slot order"):
        LoRABatch.build([(2, 0, 1), (1, 1, 2)])


def test_a_group_of_modules_matches_each_module_alone():
    """Modules that read one x (q, k, v) share one A buffer and one gain buffer: their fused path, in
    both layouts, gives each module what it gives alone (ranks 2 and 3 of different widths, DoRA's
    gain on one module of one adapter, a bias, and the base slot in the batch)."""
    from loraforge.serve.pool import LoRABatch
    from loraforge.serve.updates import HostUpdate

    torch.manual_seed(1)
    modules = {"q": torch.nn.Linear(6, 7), "k": torch.nn.Linear(6, 3, bias=False)}
    grouped = AdapterPool(modules, max_loaded=3, max_rank=4, groups=[("q", "k")])
    alone = AdapterPool(modules, max_loaded=3, max_rank=4)
    updates = {1: {"q": HostUpdate(torch.randn(2, 6), torch.randn(7, 2), gain=torch.rand(7) + 0.5),
                   "k": HostUpdate(torch.randn(3, 6), torch.randn(3, 3))},
               2: {"k": HostUpdate(torch.randn(2, 6), torch.randn(3, 2), gain=torch.rand(3) + 0.5)},
               3: {"q": HostUpdate(torch.randn(3, 6), torch.randn(7, 3))}}
    for pool in (grouped, alone):
        for slot, update in updates.items():
            pool._fill(slot, update)
    batch = LoRABatch.build([(0, 0, 1), (1, 1, 3), (2, 3, 4), (3, 4, 6)])
    x = torch.randn(6, 6)
    for kernel in ("segment", "padded", *NATIVE):
        ys = tuple(m(x) for m in modules.values())
        grouped.add_deltas(("q", "k"), x, ys, batch, kernel=kernel)
        for name, y in zip(modules, ys):
            want = modules[name](x)
            alone.add_delta(name, x, want, batch, kernel=kernel)
            torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
        assert not torch.equal(ys[0][1:3], modules["q"](x)[1:3])  # the adapters did act


def test_the_native_kernel_gives_each_token_its_own_adapter_at_any_shape():
    """lowrank.c against S-LoRA's eq. token by token: a group of three modules whose widths and input
    are no multiple of its vector lanes, ranks that leave its 4-row blocks part-filled (1, 3, 5, 7),
    segments of 1 to 11 tokens (its 4-token chunks and their remainders), DoRA's gain with and without
    a bias, the base slot, and auto choosing it."""
    from loraforge.serve.pool import LoRABatch
    from loraforge.serve.updates import HostUpdate

    if not NATIVE:
        pytest.skip(f"lowrank.c cannot be built here: {native.load()[1]}")
    torch.manual_seed(3)
    modules = {"q": torch.nn.Linear(37, 20), "k": torch.nn.Linear(37, 3, bias=False), "v": torch.nn.Linear(37, 33)}
    pool = AdapterPool(modules, max_loaded=5, max_rank=7, groups=[("q", "k", "v")])
    updates = {}
    for slot, ranks in {1: (1, 3, 5), 2: (7, 7, 7), 3: (5, 0, 2), 4: (3, 1, 0)}.items():
        updates[slot] = {m: HostUpdate(torch.randn(r, 37), torch.randn(lin.out_features, r),
                                       gain=torch.rand(lin.out_features) + 0.5 if (slot + i) % 3 == 0 else None)
                         for i, ((m, lin), r) in enumerate(zip(modules.items(), ranks)) if r}
        pool._fill(slot, updates[slot])
    segments = [(0, 0, 2), (1, 2, 13), (2, 13, 14), (3, 14, 19), (4, 19, 23)]
    batch = LoRABatch.build(segments)
    x = torch.randn(23, 37)
    ys = tuple(m(x) for m in modules.values())
    pool.add_deltas(("q", "k", "v"), x, ys, batch, kernel="native")
    for (name, linear), y in zip(modules.items(), ys):
        for slot, start, end in segments:
            update = updates.get(slot, {}).get(name)
            want = linear(x[start:end])
            if update is not None:
                want = want + x[start:end] @ update.a.T @ update.b.T
                if update.gain is not None:
                    bias = 0 if linear.bias is None else linear.bias
                    want = update.gain * (want - bias) + bias
            torch.testing.assert_close(y[start:end], want, atol=1e-5, rtol=1e-5)
    auto = tuple(m(x) for m in modules.values())  # auto takes it wherever it builds: the very same sums
    pool.add_deltas(("q", "k", "v"), x, auto, batch)
    assert all(torch.equal(a, y) for a, y in zip(auto, ys))


def test_without_the_native_kernel_auto_falls_back_and_native_says_why(monkeypatch, tmp_path, root):
    """A machine without a working C compiler (here CC=false) keeps the torch layouts; asking for the
    kernel there is refused with the compiler's reason, and no half-built library is left in the cache."""

    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    monkeypatch.delenv("LORAFORGE_NATIVE", raising=False)
    native.load.cache_clear()
    try:
        lib, why = native.load()
        assert lib is None and "false failed on lowrank.c" in why
        assert not any((tmp_path / "kernels").iterdir())
        assert not native.usable(torch.zeros(2, 3), (torch.zeros(2, 4),), 8)
        with pytest.raises(lf.LoraforgeError, match="lora_kernel 'native' cannot run here: false failed"):
            pool_for(root, lora_kernel="native")
        monkeypatch.setenv("LORAFORGE_NATIVE", "0")
        native.load.cache_clear()
        assert native.load() == (None, "LORAFORGE_NATIVE=0 turns it off")
        engine = Engine(tiny_llama(), tiny_tokenizer(), adapters_dir=root, block_size=4)
        out = engine.generate(["a b c"], ["n1"], SamplingParams(max_tokens=3, ignore_eos=True))[0].output_ids
        assert len(out) == 3  # auto ran the torch layouts (the native path raises where it cannot run)
    finally:
        native.load.cache_clear()


def test_auto_layout_pads_many_short_segments_and_loops_over_long_ones():
    from loraforge.serve.pool import LoRABatch

    decode = LoRABatch.build([(s, 2 * (s - 1), 2 * s) for s in range(1, 9)])  # 8 adapters, 2 tokens each
    prefill = LoRABatch.build([(1, 0, 200), (2, 200, 300), (3, 300, 400)])
    assert decode.prefers_padded() and not prefill.prefers_padded()
    assert not LoRABatch.build([(1, 0, 3), (2, 3, 5)]).prefers_padded()  # two segments: the loop is cheaper


def test_the_padded_layout_reads_narrow_and_wide_adapters_in_runs_of_their_own():
    """The pool places rank <= NARROW from the bottom slot up and wider adapters from the top down;
    a step then cuts its slots into the runs that stream the fewest factor rows (each run reads its slots
    at its largest rank, plus RUN_COST), and the result is the same as one run over every slot."""
    from loraforge.serve.pool import LoRABatch, _padded_run, _plan_runs
    from loraforge.serve.updates import HostUpdate

    assert _plan_runs([1, 2, 3, 4], [0, 8, 8, 16, 16]) == [(1, 4)]  # 4 x 16 < 2 x 8 + 2 x 16 + RUN_COST
    narrow, wide = [8] * 16, [16] * 16
    assert _plan_runs(list(range(1, 33)), [0] + narrow + wide) == [(1, 16), (17, 32)]
    assert _plan_runs([1, 2, 60], [0, 4, 4] + [0] * 57 + [4]) == [(1, 2), (60, 60)]  # a gap is not read
    assert _plan_runs([], [0]) == []

    torch.manual_seed(2)
    modules = {"q": torch.nn.Linear(6, 5), "k": torch.nn.Linear(6, 3, bias=False)}
    pool = AdapterPool(modules, max_loaded=6, max_rank=16, groups=[("q", "k")])
    for name, rank in (("n1", 1), ("w1", 16), ("n2", 8), ("w2", 9)):
        pool.host[name] = {m: HostUpdate(torch.randn(rank, 6), torch.randn(lin.out_features, rank))
                           for m, lin in modules.items()}
        pool.known[name] = Path(name)
    slots = {name: pool.acquire(name) for name in ("n1", "w1", "n2", "w2")}
    assert slots == {"n1": 1, "w1": 6, "n2": 2, "w2": 5} and pool.slot_rank == [0, 1, 8, 0, 0, 9, 16]
    segments = [(0, 0, 1), (1, 1, 3), (2, 3, 4), (5, 4, 6), (6, 6, 7)]
    planned = LoRABatch.build(segments, slot_ranks=pool.slot_rank)
    # 2 x 8 + 2 x 16 + 2 RUN_COST = 144 <= 6 x 16 + RUN_COST: narrow and wide each read in a run of their own
    assert [(r.first, r.last, r.start, r.end) for r in planned.runs] == [(1, 2, 1, 4), (5, 6, 4, 7)]
    x = torch.randn(7, 6)
    want = tuple(m(x) for m in modules.values())
    pool.add_deltas(("q", "k"), x, want, LoRABatch.build(segments), kernel="segment")
    for runs in ([(0, 6)], [(1, 2), (5, 6)], [(1, 1), (2, 2), (5, 5), (6, 6)]):  # any cut gives the same sums
        batch = LoRABatch.build(segments)
        batch.runs = [_padded_run(segments, first, last, "cpu") for first, last in runs]
        ys = tuple(m(x) for m in modules.values())
        pool.add_deltas(("q", "k"), x, ys, batch, kernel="padded")
        for y, w in zip(ys, want):
            torch.testing.assert_close(y, w, atol=1e-5, rtol=1e-5)

