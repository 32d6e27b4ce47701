"""llama.cpp in `bench serve --systems ...,llamacpp`: the same base and the same adapters, as llama.cpp serves them.

    base        the benchmark's base written as GGUF f32 (export/llamacpp.py; metadata and tokenizer from
                the embedded model's own GGUF where it has one)
    LoRA        each adapter as a llama.cpp LoRA GGUF, all loaded once (llama_adapter_lora_init)
    not LoRA    converted first (`loraforge convert --to lora --rank R`: exact for LoRA-XS, whose saved
                form is a LoRA already; DoRA's update loses its tail past rank R, said in the row)
    whole modules  modules_to_save (trained embedding / head rows) cannot ride in a llama.cpp LoRA:
                such an adapter runs as its own merged GGUF f32, a second model kept loaded

One request at a time, as llama-cpp-python's `Llama` serves one sequence: its adapter is set on the
context (llama_set_adapters_lora, scale 1), the context reset, the prompt evaluated and
`new_tokens` tokens generated greedily (top_k = 1; EOS does not stop it, as in every other system).
The files are written once into the adapters folder (gguf/) and reused by later runs.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import json
import time
from pathlib import Path
from typing import Any

from loraforge.core.errors import LoraforgeError


def llama_cpp_module() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise LoraforgeError("--systems llamacpp needs llama-cpp-python (pip install 'loraforge[llamacpp]'; "
                             "it builds llama.cpp from source where no wheel fits)") from None
    return llama_cpp


def prepare_gguf(model_name: str, base: Any, tokenizer: Any, folder: Path, names: list[str],
                 rank: int) -> tuple[Path, dict[str, Path], dict[str, Path], dict[str, float]]:
    """(base GGUF, {name: LoRA GGUF}, {name: merged GGUF}, {name: relative logit error of a conversion})
    for the adapters `names` of `folder`, written into folder/gguf unless there already."""
    from loraforge.adapters.convert import REPORT_NAME, convert_to_lora
    from loraforge.adapters.inject import merge_and_unload
    from loraforge.adapters.io import load_adapter, read_adapter
    from loraforge.core.models import gguf_source
    from loraforge.export.llamacpp import write_lora_gguf, write_merged_gguf

    out = folder / "gguf"
    out.mkdir(parents=True, exist_ok=True)
    source = gguf_source(model_name)
    base_file = out / "base-f32.gguf"
    if not base_file.is_file():
        write_merged_gguf(base, tokenizer, base_file, "f32", source)
    loras, merged, errors = {}, {}, {}
    for name in names:
        config = read_adapter(folder / name)[0]
        if config.modules_to_save:
            merged[name] = out / f"{name}-merged-f32.gguf"
            if not merged[name].is_file():
                write_merged_gguf(merge_and_unload(load_adapter(copy.deepcopy(base), folder / name)), tokenizer,
                                  merged[name], "f32", source)
            continue
        lora_dir = folder / name
        if config.method != "lora":
            lora_dir = out / f"{name}-lora"
            if not (lora_dir / REPORT_NAME).is_file():
                convert_to_lora(base, tokenizer, folder / name, rank, lora_dir)
            errors[name] = json.loads((lora_dir / REPORT_NAME).read_text())["logits_relative_error"]
        loras[name] = out / f"{name}.gguf"
        if not loras[name].is_file():
            write_lora_gguf(base, lora_dir, loras[name])
    return base_file, loras, merged, errors


class LlamaCpp:
    """llama-cpp-python over the files of `prepare_gguf`, called like every system: run(work) -> completion
    times. Loaded adapters are freed with the model they were loaded on."""

    def __init__(self, base_file: Path, loras: dict[str, Path], merged: dict[str, Path], n_ctx: int, threads: int):
        self.lib = llama_cpp_module()
        self.stack = contextlib.ExitStack()
        settings = dict(n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
        self.base = self._open(base_file, settings)
        self.adapters = {}
        for name, path in loras.items():  # every adapter loaded before the timing, as PEFT's are
            adapter = self.lib.llama_adapter_lora_init(self.base._model.model, str(path).encode())
            if adapter is None:
                raise LoraforgeError(f"llama.cpp could not load the LoRA GGUF {path}")
            self.adapters[name] = adapter
        self.merged = {name: self._open(path, settings) for name, path in merged.items()}
        self.current: str | None = None
        self.outputs: list[list[int]] = []  # the last run's tokens, request by request

    def _open(self, path: Path, settings: dict[str, Any]) -> Any:
        llm = self.lib.Llama(model_path=str(path), **settings)
        self.stack.callback(llm.close)
        return llm

    def _use(self, name: str | None) -> Any:
        """The model that serves adapter `name`, its adapter set on the base's context (none for others)."""
        if name in self.merged:
            return self.merged[name]
        if name != self.current:
            ctx = self.base._ctx.ctx
            if name is None:
                failed = self.lib.llama_set_adapters_lora(ctx, None, 0, None)
            else:
                adapters = (self.lib.llama_adapter_lora_p_ctypes * 1)(self.adapters[name])
                failed = self.lib.llama_set_adapters_lora(ctx, adapters, 1, (ctypes.c_float * 1)(1.0))
            if failed:
                raise LoraforgeError(f"llama.cpp refused to set adapter {name!r} on its context")
            self.current = name
        return self.base

    def run(self, work: list[Any]) -> list[float]:
        done, self.outputs = [], []
        for w in work:
            llm = self._use(w.adapter)
            llm.reset()  # no prefix of the last request's cache is reused: it may be another adapter's
            tokens: list[int] = []
            for token in llm.generate(w.prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
                tokens.append(token)
                if len(tokens) == w.new_tokens:
                    break
            done.append(time.perf_counter())
            self.outputs.append(tokens)
        return done

    def close(self) -> None:
        self.stack.close()
