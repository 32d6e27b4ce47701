"""`loraforge export --format gguf`: llama.cpp LoRA adapters and merged models, read back with gguf's reader."""

import importlib.util

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import loraforge as lf
from loraforge.cli import main
from loraforge.export.llamacpp import llama_permute, model_tensors, write_lora_gguf, write_merged_gguf
from loraforge.testing import tiny_llama, tiny_tokenizer

LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


def lora_adapter(path, **config) -> str:
    model = lf.attach(tiny_llama(), lf.AdapterConfig(rank=4, alpha=8, init="random", seed=0, **config))
    lf.save_adapter(model, path)
    return str(path)


def fields(reader: gguf.GGUFReader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def tensors(reader: gguf.GGUFReader) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.data) for t in reader.tensors}


@pytest.mark.parametrize("config", [{}, {"use_rslora": True, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 3.0}}],
                         ids=["plain", "rslora-patterns"])
def test_lora_gguf_holds_each_layers_update_under_llama_cpp_names(tmp_path, config):
    """llama.cpp adds (alpha / r) B A with r each pair's own rank: that must be the layer's update,
    its rows in llama.cpp's q/k order; A and B in PEFT's shapes."""
    adapter = lora_adapter(tmp_path / "a", **config)
    out = write_lora_gguf(tiny_llama(), adapter, tmp_path / "a.gguf")
    reader = gguf.GGUFReader(out)
    meta = fields(reader)
    assert (meta["general.architecture"], meta["general.type"], meta["adapter.type"]) == ("llama", "adapter", "lora")
    assert meta["adapter.lora.alpha"] == 8.0
    got = tensors(reader)
    model = lf.load_adapter(tiny_llama(), adapter)
    layers = lf.adapter_layers(model)
    blocks = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}
    assert set(got) == {f"blk.{i}.{b}.weight.lora_{ab}" for i in range(2) for b in blocks.values() for ab in "ab"}
    for i in range(2):
        for hf, name in blocks.items():
            layer = layers[f"model.layers.{i}.{hf}"]
            a, b = got[f"blk.{i}.{name}.weight.lora_a"], got[f"blk.{i}.{name}.weight.lora_b"]
            assert a.shape == tuple(layer.lora_A.weight.shape) and b.shape == tuple(layer.lora_B.weight.shape)
            update = torch.from_numpy(b @ a) * 8.0 / a.shape[0]
            want = llama_permute(layer.delta_weight().detach(), hf, model.config)
            torch.testing.assert_close(update, want, atol=1e-5, rtol=1e-5)
            if name in ("attn_q", "attn_k"):  # the permutation is not the identity: it really reorders rows
                assert not torch.allclose(want, layer.delta_weight().detach())


def test_llama_permute_pairs_the_rope_halves_of_each_head():
    config = tiny_llama().config  # 4 heads of 8 (q), 2 of 8 (k)
    rows = torch.arange(32.0)[:, None]
    q = llama_permute(rows, "model.layers.0.self_attn.q_proj.weight", config)[:8, 0]
    assert q.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    k = llama_permute(rows[:16], "model.layers.0.self_attn.k_proj", config)[8:, 0]
    assert k.tolist() == [8, 12, 9, 13, 10, 14, 11, 15]
    assert torch.equal(llama_permute(rows, "model.layers.0.self_attn.v_proj.weight", config), rows)


def test_misshapen_or_non_lora_adapters_are_refused_before_writing(tmp_path):
    adapter = lora_adapter(tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    state = load_file(str(weights))
    key = next(k for k in state if k.endswith("k_proj.lora_B.weight"))
    state[key] = torch.zeros(32, 4)  # q's width on k: llama.cpp would crash on it
    save_file(state, str(weights))
    with pytest.raises(lf.AdapterError, match=r"k_proj.lora_B.weight.*shape \(32, 4\).*\(16, 4\)"):
        write_lora_gguf(tiny_llama(), adapter, tmp_path / "bad.gguf")
    dora = lf.attach(tiny_llama(), lf.AdapterConfig(method="dora", rank=4))
    lf.save_adapter(dora, tmp_path / "dora")
    with pytest.raises(lf.AdapterError, match="loraforge convert --to lora"):
        write_lora_gguf(tiny_llama(), tmp_path / "dora", tmp_path / "dora.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_merged_gguf_holds_the_merged_weights_and_the_tokenizer(tmp_path, dtype):
    model = lf.merge_and_unload(lf.load_adapter(tiny_llama(), lora_adapter(tmp_path / "a")))
    out = write_merged_gguf(model, tiny_tokenizer(), tmp_path / "m.gguf", dtype)
    reader = gguf.GGUFReader(out)
    meta = fields(reader)
    assert meta["general.type"] == "model" and meta["general.file_type"] == (0 if dtype == "f32" else 1)
    assert (meta["llama.block_count"], meta["llama.embedding_length"], meta["llama.attention.head_count_kv"]) == (2, 32, 2)
    assert len(meta["tokenizer.ggml.tokens"]) == 128 and meta["tokenizer.ggml.tokens"][5:8] == ["0", "1", "2"]
    assert meta["tokenizer.ggml.eos_token_id"] == tiny_tokenizer().eos_token_id
    got = {t.name: t for t in reader.tensors}
    assert "output.weight" not in got  # tied to token_embd: llama.cpp reuses it
    assert got["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert got["blk.0.attn_q.weight"].tensor_type.name == dtype.upper()
    q = model.model.layers[1].self_attn.q_proj.weight.detach()
    want = llama_permute(q, "model.layers.1.self_attn.q_proj.weight", model.config).numpy()
    np.testing.assert_allclose(np.array(got["blk.1.attn_q.weight"].data, dtype=np.float32), want,
                               atol=0 if dtype == "f32" else 2e-3, rtol=0 if dtype == "f32" else 1e-3)
    assert len(got) == len(model.state_dict()) - 1


def test_transformers_reads_the_merged_gguf_back_to_the_same_model(tmp_path):
    """A second reader of GGUF (transformers' loader, which undoes llama.cpp's q/k order itself) gets
    the merged model back: the same logits, exactly at f32."""
    model = lf.merge_and_unload(lf.load_adapter(tiny_llama(), lora_adapter(tmp_path / "a")))
    write_merged_gguf(model, tiny_tokenizer(), tmp_path / "m.gguf", "f32")
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 33, 60, 71, 9, 44]])
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


def test_cli_exports_adapter_and_merged_model(tmp_path, capsys):
    tiny_llama().save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    adapter = lora_adapter(tmp_path / "a")
    common = ["export", "--format", "gguf", "--model", str(tmp_path / "model")]
    assert main(common + ["--adapter", adapter, "--out", str(tmp_path / "a.gguf")]) == 0
    assert main(common + ["--adapter", adapter, "--merged", "--dtype", "f16", "--out", str(tmp_path / "m.gguf")]) == 0
    assert fields(gguf.GGUFReader(tmp_path / "a.gguf"))["general.type"] == "adapter"
    assert fields(gguf.GGUFReader(tmp_path / "m.gguf"))["general.file_type"] == 1
    assert main(common + ["--out", str(tmp_path / "x.gguf")]) == 2
    assert "needs --adapter" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_export_matches_the_embedded_gguf():
    """The HF -> GGUF names and the q/k permutation are llama.cpp's: the embedded SmolLM2's own GGUF
    tensors, dequantised, are exactly what exporting its (dequantised) weights gives."""
    from loraforge.core.models import gguf_source

    model, _ = lf.load_model("smollm2-135m")
    ours = model_tensors(model)
    reader = gguf.GGUFReader(gguf_source("smollm2-135m"))
    theirs = {t.name: t for t in reader.tensors}
    assert set(ours) == set(theirs)
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.29.ffn_down.weight", "output_norm.weight"):
        t = theirs[name]
        np.testing.assert_array_equal(ours[name], gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours[name].shape))


@pytest.mark.slow
def test_merged_smollm2_gguf_loads_with_its_tokenizer_and_logits(tmp_path):
    """The merged SmolLM2 at f16, metadata and tokenizer copied from the embedded GGUF: transformers
    loads model and tokenizer from it, tokenizes as the original does and gives its logits to f16 rounding."""
    from loraforge.core.models import gguf_source

    model, tokenizer = lf.load_model("smollm2-135m")
    lf.attach(model, lf.AdapterConfig(rank=8, alpha=2, init="random", seed=0, target_modules=["q_proj", "k_proj", "down_proj"]))
    model = lf.merge_and_unload(model)
    write_merged_gguf(model, tokenizer, tmp_path / "m.gguf", "f16", gguf_source("smollm2-135m"))
    text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    back_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert back_tok(text, return_tensors="pt").input_ids.tolist() == ids.tolist()
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        got, want = back(ids).logits, model(ids).logits
    assert (got - want).norm() < 1e-2 * want.norm() and torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.slow
@pytest.mark.skipif(not LLAMA_CPP, reason="llama-cpp-python is not installed (pip install 'loraforge[llamacpp]'; "
                                          "it builds llama.cpp from source where no wheel fits)")
def test_llama_cpp_gives_loraforges_greedy_tokens(tmp_path):
    """On 8 prompts, llama.cpp with the exported LoRA on the exported f32 base, and with the merged
    model, greedily generates the tokens loraforge's adapted model does."""
    import llama_cpp

    from loraforge.core.models import gguf_source

    model, tokenizer = lf.load_model("smollm2-135m")
    lf.attach(model, lf.AdapterConfig(rank=8, alpha=2, init="random", seed=0))
    lf.save_adapter(model, tmp_path / "adapter")
    write_lora_gguf(lf.detach(model), tmp_path / "adapter", tmp_path / "a.gguf")
    write_merged_gguf(model, tokenizer, tmp_path / "base.gguf", "f32", gguf_source("smollm2-135m"))
    lf.load_adapter(model, tmp_path / "adapter")
    prompts = [f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n" for q in (
        "What is the capital of France?", "Name three colours.", "Count to five.", "What is 2 + 3?",
        "Say hello in Spanish.", "Why is the sky blue?", "Write a haiku about rain.", "What is a prime number?")]
    want = []
    with torch.no_grad():
        for p in prompts:
            ids = tokenizer(p, return_tensors="pt").input_ids
            want.append(model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist())
    write_merged_gguf(lf.merge_and_unload(model), tokenizer, tmp_path / "merged.gguf", "f32", gguf_source("smollm2-135m"))
    for files in ({"model_path": str(tmp_path / "base.gguf"), "lora_path": str(tmp_path / "a.gguf")},
                  {"model_path": str(tmp_path / "merged.gguf")}):
        llm = llama_cpp.Llama(**files, n_ctx=256, n_threads=1, verbose=False)
        for p, tokens in zip(prompts, want):
            llm.reset()
            ids = llm.tokenize(p.encode(), add_bos=False, special=True)
            got = []
            for token in llm.generate(ids, top_k=1, temp=0.0):
                got.append(token)
                if len(got) == len(tokens) or token == llm.token_eos():
                    break
            assert got == tokens[:len(got)] and len(got) in (len(tokens), tokens.index(got[-1]) + 1), (files, p)
