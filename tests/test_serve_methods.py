"""Serving every method in one mixed batch: low-rank updates as factors, DoRA through its gain after
the LoRA path, higher-rank updates dense, MixLoRA's own FFN on its tokens; each request's greedy
tokens are its adapter's alone. Adapters that train whole modules (modules_to_save) too."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import loraforge as lf
from loraforge.cli import main
from loraforge.serve import Engine, SamplingParams
from loraforge.serve.updates import serving_path
from loraforge.testing import tiny_llama, tiny_tokenizer

METHODS = ["lora", "dora", "lora-xs", "loldu", "block-lora", "comp-lora", "bone", "bone-bat", "randlora", "mixlora"]
PROMPTS = ["Hello there", "A", "The quick brown fox", "x = 1 + 2;", "ok", "Lorem ipsum dolor", "#!", "Why?", "42", "z",
           "Quo vadis"]


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    for i, method in enumerate(METHODS):
        init = "default" if method == "loldu" else "random"  # loldu starts from W0's LU factors
        options = {"num_experts": 4, "top_k": 2, "router_init_std": 1.0} if method == "mixlora" else {}  # routes that differ
        model = lf.attach(tiny_llama(), lf.AdapterConfig(method=method, rank=4, alpha=4, init=init, seed=i, options=options))
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():  # move every trained tensor, so that each adapter changes the output its own way
            for name, param in model.named_parameters():
                if param.requires_grad:
                    param.add_(0.3 * param.abs().mean() * torch.randn(param.shape, generator=generator))
        lf.save_adapter(model, root / method)
    full = lf.attach(tiny_llama(), lf.AdapterConfig(method="full"))
    lf.save_adapter(full, root / "full")
    return root


def alone(adapters_dir, adapter: str | None, prompt: str, n: int) -> list[int]:
    """The reference: the adapter's own layers on the base, greedy by full recomputation."""
    model = tiny_llama()
    if adapter is not None:
        lf.load_adapter(model, adapters_dir / adapter)
    ids = tiny_tokenizer().encode(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    return ids[-n:]


def test_serving_paths_follow_the_rank_of_each_methods_update():
    paths = {m.name: serving_path(m.name) for m in lf.methods()}
    assert {m: paths[m] for m in METHODS} == {**dict.fromkeys(METHODS, "native"), "bone-bat": "dense", "randlora": "dense"}
    assert paths["full"] == "no"


@pytest.mark.parametrize("kernel", ["segment", "padded", "native"])
def test_a_batch_mixing_every_method_gives_each_its_own_greedy_tokens(adapters_dir, kernel):
    names = [*METHODS, None]
    engine = Engine(tiny_llama(), tiny_tokenizer(), adapters_dir=adapters_dir, max_loaded=4, max_rank=8, block_size=4,
                    lora_kernel=kernel)  # 9 adapters in 4 slots: slots are refilled, dense and gain ones included
    reqs = engine.generate(PROMPTS, names, SamplingParams(max_tokens=8, ignore_eos=True))
    outputs = {}
    for req, name, prompt in zip(reqs, names, PROMPTS):
        assert req.output_ids == alone(adapters_dir, name, prompt, 8), (name, prompt)
        outputs[name] = req.output_ids
    base = {name: alone(adapters_dir, None, prompt, 8) for name, prompt in zip(names, PROMPTS)}
    assert sum(outputs[m] != base[m] for m in METHODS) >= len(METHODS) - 1  # the adapters really act
    assert engine.pool.evictions > 0 and engine.kv.free_blocks == engine.kv.num_blocks


def test_same_prompt_under_every_method_in_one_batch(adapters_dir):
    """One prompt, ten requests: ten segments of the same tokens, each through its own adapter's path."""
    names = [*METHODS, None]
    engine = Engine(tiny_llama(), tiny_tokenizer(), adapters_dir=adapters_dir, max_loaded=len(METHODS), block_size=4)
    reqs = engine.generate([PROMPTS[2]] * len(names), names, SamplingParams(max_tokens=6, ignore_eos=True))
    for req, name in zip(reqs, names):
        assert req.output_ids == alone(adapters_dir, name, PROMPTS[2], 6), name
    assert engine.pool.dense  # the dense updates sit in their slots
    assert any(any(flags) for flags in engine.pool.gained.values())  # and DoRA's gain in its
    assert all(len(own) == 1 for own in engine.pool.block.values())  # and MixLoRA's FFN in every layer


def test_full_fine_tuning_is_refused_with_its_reason(adapters_dir):
    engine = Engine(tiny_llama(), tiny_tokenizer(), adapters_dir=adapters_dir)
    with pytest.raises(lf.AdapterError, match="'full' adapter, which retrains the base itself"):
        engine.add_request("hi", "full")


def test_methods_json_says_how_each_method_serves(capsys):
    assert main(["methods", "--json"]) == 0
    out = capsys.readouterr().out
    listed = {m["name"]: m["serves"] for m in json.loads(out[out.index("{"):])["methods"]}
    assert listed["dora"] == listed["mixlora"] == "native" and listed["randlora"] == "dense" and listed["full"] == "no"


def llama(tied: bool) -> LlamaForCausalLM:
    model = tiny_llama()
    if tied:
        return model
    untied = LlamaForCausalLM(LlamaConfig(**{**model.config.to_dict(), "tie_word_embeddings": False})).eval()
    untied.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        untied.lm_head.weight.copy_(torch.randn(untied.lm_head.weight.shape, generator=torch.Generator().manual_seed(9)))
    return untied


WHOLE = {  # name: (method, modules_to_save, rows or None for a whole Linear)
    "head": ("lora", ["lm_head"], range(5, 60)),
    "embed": ("dora", ["model.embed_tokens"], range(30, 105)),
    "proj": ("lora", ["model.layers.1.self_attn.o_proj"], None),
}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_modules_to_save_are_per_adapter_rows_and_projections_in_a_mixed_batch(tmp_path, tied):
    """The embedding and head rows an adapter trained (both, where tied), and a whole projection it
    trained, apply to its own tokens and logits only, beside plain adapters and the base."""
    generator = torch.Generator().manual_seed(0)
    for name, (method, whole, rows) in WHOLE.items():
        model = lf.attach(llama(tied), lf.AdapterConfig(method=method, rank=4, init="random", seed=1,
                                                        target_modules=["q_proj", "v_proj"], modules_to_save=whole))
        weight = model.get_submodule(whole[0]).weight
        with torch.no_grad():
            if rows is None:
                weight += torch.randn(weight.shape, generator=generator) * weight.std()
            else:
                weight[list(rows)] += torch.randn(len(rows), weight.shape[1], generator=generator) * weight.std()
        lf.save_adapter(model, tmp_path / name)
    lf.save_adapter(lf.attach(llama(tied), lf.AdapterConfig(rank=4, init="random", seed=2)), tmp_path / "plain")
    names = [*WHOLE, "plain", None]
    engine = Engine(llama(tied), tiny_tokenizer(), adapters_dir=tmp_path, max_loaded=4, block_size=4)
    reqs = engine.generate(PROMPTS[:len(names)], names, SamplingParams(max_tokens=8, ignore_eos=True))
    for req, name, prompt in zip(reqs, names, PROMPTS):
        model = llama(tied)
        if name is not None:
            lf.load_adapter(model, tmp_path / name)
        ids = tiny_tokenizer().encode(prompt)
        with torch.no_grad():
            for _ in range(8):
                ids.append(int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
        assert req.output_ids == ids[-8:], (name, prompt)
    head, embed = engine.pool.rows["lm_head"], engine.pool.rows["model.embed_tokens"]
    assert len(head) == len(embed) == (2 if tied else 1)  # tied: an override of one is one of both
