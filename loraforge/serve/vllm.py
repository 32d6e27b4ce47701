"""`loraforge serve --engine vllm`: vLLM's OpenAI server on the same base and adapters folder, so
that users who outgrow a CPU box (GPUs, tensor parallelism) keep their adapters, API and commands.

vLLM serves plain PEFT LoRA only (no DoRA, no whole trained modules, rank at most --max-lora-rank,
one of its fixed sizes). So, before it starts, every other adapter of the folder that merges, and
every LoRA of a larger rank, is converted to a plain LoRA of rank --max-lora-rank
(adapters/convert.py: exact where the update's rank fits, its error reported otherwise) into
`<adapters>/.vllm/<name>`, reused while newer than its source; adapters vLLM cannot take at all
(an input-dependent update, modules_to_save) are left out with the reason. Every name keeps its
meaning: `model` in a request names the same adapter as under loraforge's own engine, and the
adapters folder, --max-loaded (vLLM's --max-loras), the API key, host and port carry over.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from loraforge.adapters.convert import convert_to_lora
from loraforge.core.config import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config
from loraforge.core.errors import AdapterError, LoraforgeError
from loraforge.core.registry import get_method
from loraforge.serve.pool import NAME_RE

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts
CONVERTED = ".vllm"


def check_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise LoraforgeError("--engine vllm needs vLLM, which is not installed here (pip install vllm, on a machine "
                             "with a GPU it supports); without --engine, `loraforge serve` serves the same adapters")


def vllm_command(model_name: str, adapters_dir: str | None, host: str, port: int, api_key: str | None,
                 max_loaded: int, max_rank: int, tensor_parallel: int = 1) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) that start vLLM's OpenAI server for this base and adapters folder,
    converting adapters first where vLLM needs it."""
    from loraforge.core.models import default_device, load_model

    if max_rank not in VLLM_RANKS:
        raise LoraforgeError(f"--max-lora-rank must be one of vLLM's {', '.join(map(str, VLLM_RANKS))}, got {max_rank}")
    model, tokenizer = load_model(model_name, task="causal-lm")
    base = os.path.abspath(model_name) if model_name.endswith(".gguf") else model.name_or_path
    model.to(default_device())
    modules = {}
    for folder in sorted(Path(adapters_dir).iterdir()) if adapters_dir else []:
        if not (folder / CONFIG_NAME).is_file() or not NAME_RE.fullmatch(folder.name):
            continue
        try:
            modules[folder.name] = _servable(folder, model, tokenizer, max_rank)
        except AdapterError as exc:
            print(f"loraforge: warning: adapter {folder.name!r} left out: {exc}", file=sys.stderr)
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base),
            "--served-model-name", model_name, "--host", host, "--port", str(port),
            "--tensor-parallel-size", str(tensor_parallel), "--enable-lora", "--max-lora-rank", str(max_rank),
            "--max-loras", str(max_loaded), "--max-cpu-loras", str(max(max_loaded, len(modules)))]
    if modules:
        argv += ["--lora-modules", *(f"{name}={path}" for name, path in modules.items())]
    if api_key is not None:
        argv += ["--api-key", api_key]
    # /v1/load_lora_adapter and /v1/unload_lora_adapter, as loraforge's own engine has them
    return argv, {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}


def _servable(folder: Path, model, tokenizer, max_rank: int) -> str:
    """The folder vLLM loads for this adapter: itself when it is a plain LoRA that fits, else its conversion."""
    config, _ = read_adapter_config(folder)
    if config.modules_to_save:
        raise AdapterError(f"it trains whole modules ({config.modules_to_save}), which vLLM does not load")
    largest = max([config.rank, *config.rank_pattern.values()])
    if config.method == "lora" and largest <= max_rank:
        return str(folder)
    method = get_method(config.method)
    if not method.merges or method.trains_base:  # full fine-tuning: serve its merged model instead
        raise AdapterError(f"a {config.method!r} adapter is no update of the base that a plain LoRA can hold")
    out = folder.parent / CONVERTED / folder.name
    if not out.is_dir() or (out / WEIGHTS_NAME).stat().st_mtime < (folder / WEIGHTS_NAME).stat().st_mtime:
        report = convert_to_lora(model, tokenizer, folder, max_rank, out)
        print(f"loraforge: {folder.name} ({config.method}, rank {largest}) converted to LoRA rank {max_rank}: "
              f"{report['exact_layers']}/{report['layers']} layers exact, logits error "
              f"{report['logits_relative_error']:.2e}", file=sys.stderr)
    return str(out)
