"""Serving many LoRA adapters on one base model (S-LoRA): engine, adapter pool, paged KV cache, HTTP server.

    from loraforge.serve import Engine, SamplingParams
    engine = Engine(model, tokenizer, adapters_dir="adapters/", max_loaded=8)
    engine.generate(["Hi", "Hello"], ["support-bot", None], SamplingParams(max_tokens=32))

The HTTP server (loraforge/serve/server.py) needs the `serve` extra (fastapi, uvicorn).
"""

from loraforge.serve.engine import Engine, Request, RequestError, SamplingParams
from loraforge.serve.kv_cache import BlockPool
from loraforge.serve.pool import AdapterBusyError, AdapterPool, UnknownAdapterError

__all__ = ["AdapterBusyError", "AdapterPool", "BlockPool", "Engine", "Request", "RequestError", "SamplingParams",
           "UnknownAdapterError"]
