"""`loraforge serve`: the OpenAI-compatible multi-adapter server on the command line."""

from __future__ import annotations

import argparse
import ipaddress
import sys

from loraforge.core.errors import LoraforgeError

LOOPBACK = ("localhost",)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve many adapters (every method that merges) of one base model over an OpenAI-compatible API")
    p.add_argument("--model", default="smollm2-135m", help="base causal LM: embedded name, HF folder or .gguf file")
    p.add_argument("--adapters", default=None, help="folder whose sub-folders are adapters, served by folder name")
    p.add_argument("--host", default="127.0.0.1", help="listen address (loopback by default)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every request")
    p.add_argument("--max-loaded", type=int, default=8, help="adapters held in compute slots at once (LRU)")
    p.add_argument("--max-lora-rank", type=int, default=16, help="largest adapter rank accepted")
    p.add_argument("--max-batch", type=int, default=32, help="requests in the running batch")
    p.add_argument("--max-kv-tokens", type=int, default=16384, help="tokens the paged KV cache holds in all")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--engine", choices=["loraforge", "vllm"], default="loraforge",
                   help="vllm: start vLLM's OpenAI server on the same base and adapters (other methods converted "
                        "to LoRA of --max-lora-rank first); for GPUs")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="--engine vllm: GPUs to shard the model over")
    p.add_argument("--kb", default=None, help="knowledge base JSON (loraforge demo --kb schema): each chat request's "
                                              "last user message goes behind its BM25 top-k university pages")
    p.add_argument("--top-k", type=int, default=2, help="--kb: pages per request")
    p.set_defaults(run=cmd_serve)


POSITIVE = ("max_loaded", "max_lora_rank", "max_batch", "max_kv_tokens", "max_body_bytes", "tensor_parallel_size", "top_k")


def check_sizes(args: argparse.Namespace) -> None:
    """Refuse a size the server cannot run with, before the model loads or a port opens."""
    for name in POSITIVE:
        if getattr(args, name) < 1:
            raise LoraforgeError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0 <= args.port <= 65535:
        raise LoraforgeError(f"--port must be 0-65535, got {args.port}")


def cmd_serve(args: argparse.Namespace) -> int:
    check_sizes(args)
    if not _is_loopback(args.host) and args.api_key is None:
        print(f"loraforge: warning: listening on {args.host} without --api-key: anyone who can reach it may use it",
              file=sys.stderr)
    if args.engine == "vllm":
        if args.kb:
            raise LoraforgeError("--kb grounds requests in loraforge's own server: drop --engine vllm or --kb")
        return _exec_vllm(args)
    try:
        import uvicorn

        from loraforge.serve.server import create_app
    except ImportError as exc:
        raise LoraforgeError(f"`loraforge serve` needs the serve extra: pip install 'loraforge[serve]' ({exc})") from exc
    from loraforge.core.models import load_model
    from loraforge.serve.engine import Engine
    from loraforge.serve.grounding import Grounding, load_pages

    pages = load_pages(args.kb) if args.kb else None  # a bad file is refused before the model loads
    model, tokenizer = load_model(args.model, task="causal-lm")
    engine = Engine(model, tokenizer, adapters_dir=args.adapters, max_loaded=args.max_loaded,
                    max_rank=args.max_lora_rank, max_batch=args.max_batch, max_kv_tokens=args.max_kv_tokens,
                    model_name=args.model)
    app = create_app(engine, api_key=args.api_key, max_body_bytes=args.max_body_bytes)
    if args.kb:
        app = Grounding(app, pages, top_k=args.top_k)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def _exec_vllm(args: argparse.Namespace) -> int:
    import os
    import shlex

    from loraforge.serve.vllm import check_vllm, vllm_command

    check_vllm()
    argv, env = vllm_command(args.model, args.adapters, args.host, args.port, args.api_key, args.max_loaded,
                             args.max_lora_rank, args.tensor_parallel_size)
    print(f"loraforge: starting vLLM: {shlex.join(a if a != args.api_key else '***' for a in argv)}", file=sys.stderr)
    os.execve(argv[0], argv, env)  # vLLM takes over the process: its signals, its exit status


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in LOOPBACK
