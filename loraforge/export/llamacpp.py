"""llama.cpp's GGUF files for a Llama-family base (SmolLM2 included): a LoRA adapter, or a merged model.

LoRA adapter (what llama.cpp's convert_lora_to_gguf.py writes, and `--lora FILE` / `lora_path` load):

    general.architecture = llama    general.type = adapter    adapter.type = lora    adapter.lora.alpha = alpha
    <base tensor>.lora_a  (r, d_in)  = PEFT's A      e.g. blk.0.attn_q.weight.lora_a    (ggml ne = [d_in, r])
    <base tensor>.lora_b  (d_out, r) = PEFT's B      e.g. blk.0.attn_q.weight.lora_b    (ggml ne = [r, d_out])

llama.cpp scales every pair by alpha / r with r = that pair's own rank, so where a layer's scale s
is not alpha / r (rsLoRA, alpha_pattern) B carries the difference: B' = B s r / alpha. Base tensor
names are gguf's own HF -> GGUF map for the llama architecture (gguf.TensorNameMap). llama.cpp's
converter stores the rows of q_proj and k_proj permuted (RoPE's two halves of each head become
interleaved pairs), so B of those layers is permuted the same way; A, acting on the input, is not.
Every shape is checked against the base before anything is written: llama.cpp crashes on a
misshapen adapter instead of refusing it.

Merged model: every weight of the (merged) model under its GGUF name, in f32 or f16 (norms stay f32,
as llama.cpp's converter keeps 1-D tensors); a tied output head is left out (llama.cpp reuses
token_embd). Metadata and tokenizer are copied from the base's own GGUF file when it came from one
(the embedded SmolLM2), else written from the HF config and tokenizer.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import gguf
import numpy as np
import torch
from torch import nn

from loraforge.adapters.io import read_adapter
from loraforge.core.errors import AdapterError

ARCH = "llama"
DTYPES = {"f32": (np.float32, gguf.LlamaFileType.ALL_F32), "f16": (np.float16, gguf.LlamaFileType.MOSTLY_F16)}
# Metadata a copied GGUF header must not pass on: the writer's own, and what describes the old tensors.
NOT_COPIED = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version")


def check_llama(config: Any) -> gguf.TensorNameMap:
    """gguf's HF -> GGUF tensor-name map for this model; refuses what llama.cpp's llama arch cannot run."""
    if config.model_type != ARCH:
        raise AdapterError(f"GGUF export covers the Llama family (SmolLM2 included), not {config.model_type!r}")
    rope = _rope(config)
    if rope.get("rope_type", "default") != "default":
        raise AdapterError(f"GGUF export writes plain RoPE only, not {rope.get('rope_type')!r} scaling ({rope})")
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)


def _rope(config: Any) -> dict[str, Any]:
    """RoPE's settings: transformers 5 keeps them (theta too) in rope_parameters, earlier ones in rope_scaling."""
    return dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})


def gguf_name(names: gguf.TensorNameMap, key: str) -> str:
    """'model.layers.0.self_attn.q_proj.weight' -> 'blk.0.attn_q.weight'."""
    name = names.get_name(key, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise AdapterError(f"tensor {key!r} has no GGUF name in llama.cpp's llama architecture")
    return name


def llama_permute(rows: torch.Tensor, key: str, config: Any) -> torch.Tensor:
    """Rows of q_proj / k_proj (weight or LoRA B, (d_out, ...)) in llama.cpp's order: each head's
    two RoPE halves [x0..x(h/2-1) | y0..] become pairs (x0 y0 x1 y1 ...), as convert_hf_to_gguf does."""
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    kind = key.removesuffix(".weight").removesuffix(".bias").rsplit(".", 1)[-1]
    if kind not in heads:
        return rows
    n = heads[kind]
    return rows.reshape(n, 2, rows.shape[0] // n // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def lora_tensors(model: nn.Module, adapter_dir: str | Path) -> tuple[float, dict[str, torch.Tensor]]:
    """(alpha, {GGUF name: tensor}) of a plain LoRA adapter for `model`, every shape checked."""
    config, _, state = read_adapter(adapter_dir)
    if config.method != "lora":
        raise AdapterError(f"{adapter_dir}: a {config.method!r} adapter; llama.cpp loads plain LoRA only: "
                           f"convert it first (loraforge convert --to lora --rank R {adapter_dir} --out DIR)")
    if config.modules_to_save:
        raise AdapterError(f"{adapter_dir}: trains whole modules ({config.modules_to_save}), which a llama.cpp LoRA "
                           "cannot carry: export the merged model instead (--merged)")
    names = check_llama(model.config)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    tensors = {}
    for key, tensor in sorted(state.items()):
        module, sep, part = key.rpartition(".lora_")
        if not sep or part not in ("A.weight", "B.weight") or module not in linears:
            raise AdapterError(f"{adapter_dir}: key {key!r} has no place in this {ARCH} model (adapter for another base?)")
        rank, linear = config.rank_for(module), linears[module]
        want = (rank, linear.in_features) if part == "A.weight" else (linear.out_features, rank)
        if tuple(tensor.shape) != want:
            raise AdapterError(f"{adapter_dir}: key {key!r} has shape {tuple(tensor.shape)}, the base expects {want} "
                               "(adapter for another base model?)")
        base = gguf_name(names, module + ".weight")
        if part == "A.weight":
            tensors[base + ".lora_a"] = tensor.float()
        else:
            alpha = config.alpha_for(module)
            scale = alpha / (rank ** 0.5 if config.use_rslora else rank)
            tensors[base + ".lora_b"] = llama_permute(tensor.float() * (scale * rank / config.alpha), module, model.config)
    for base in sorted({name.rsplit(".", 1)[0] for name in tensors}):
        if f"{base}.lora_a" not in tensors or f"{base}.lora_b" not in tensors:
            raise AdapterError(f"{adapter_dir}: {base} has only one of lora_a / lora_b")
    return config.alpha, tensors


def write_lora_gguf(model: nn.Module, adapter_dir: str | Path, out: str | Path, dtype: str = "f32") -> Path:
    alpha, tensors = lora_tensors(model, adapter_dir)
    with _gguf_file(out) as writer:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        writer.add_name(f"{Path(adapter_dir).name} (LoRA, loraforge)")
        for name, tensor in tensors.items():
            writer.add_tensor(name, np.ascontiguousarray(tensor.numpy()).astype(DTYPES[dtype][0]))
    return Path(out)


@torch.no_grad()
def model_tensors(model: nn.Module, dtype: str = "f32") -> dict[str, np.ndarray]:
    """{GGUF name: array} of a plain (merged) model, q/k rows permuted, 1-D tensors in f32."""
    names = check_llama(model.config)
    tied = model.config.tie_word_embeddings
    out = {}
    for key, tensor in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue
        array = np.ascontiguousarray(llama_permute(tensor.float().cpu(), key, model.config).numpy())
        out[gguf_name(names, key)] = array if array.ndim == 1 else array.astype(DTYPES[dtype][0])
    return out


def write_merged_gguf(model: nn.Module, tokenizer: Any, out: str | Path, dtype: str = "f32",
                      source_gguf: str | None = None) -> Path:
    """A whole-model GGUF of `model` (merge the adapter first); metadata from `source_gguf` if given."""
    tensors = model_tensors(model, dtype)
    with _gguf_file(out) as writer:
        if source_gguf is not None:
            _copy_metadata(writer, source_gguf)
        else:
            writer.add_type(gguf.GGUFType.MODEL)
            _write_llama_metadata(writer, model.config)
            _write_tokenizer(writer, tokenizer, model.config.vocab_size)
        writer.add_file_type(DTYPES[dtype][1])
        for name, array in tensors.items():
            writer.add_tensor(name, array)
    return Path(out)


@contextmanager
def _gguf_file(out: str | Path) -> Iterator[gguf.GGUFWriter]:
    """A GGUFWriter on a temp file beside `out`, renamed into place only once the file is whole."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, ARCH)
    try:
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _copy_metadata(writer: gguf.GGUFWriter, source: str) -> None:
    reader = gguf.GGUFReader(source)
    for key, field in reader.fields.items():
        if key.startswith(NOT_COPIED):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)


def _write_llama_metadata(writer: gguf.GGUFWriter, config: Any) -> None:
    """The hyperparameters llama.cpp's llama arch reads (convert_hf_to_gguf's LlamaModel)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(_rope(config).get("rope_theta") or getattr(config, "rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _write_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int) -> None:
    """A byte-level BPE ("gpt2") vocabulary from an HF fast tokenizer; ids past its end are padding,
    as llama.cpp's converter fills them."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_tokens)
    added = set(tokenizer.get_added_vocab())
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        tokens.append(token if token is not None else f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED if token is None else gguf.TokenType.CONTROL if token in special
                     else gguf.TokenType.USER_DEFINED if token in added else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") == "BPE":
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    for add, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id), (writer.add_eos_token_id, tokenizer.eos_token_id),
                          (writer.add_unk_token_id, tokenizer.unk_token_id), (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if token_id is not None:
            add(token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
