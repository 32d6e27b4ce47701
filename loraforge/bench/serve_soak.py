"""`loraforge bench serve --soak`: the HTTP server under hostile load (issue 19 item 11).

`load_requests` requests at `load_concurrency` on loopback, each drawn (seeded) from KINDS: valid
completions, streams the client drops after the first chunk, and hostile bodies (oversized, deeply
nested, invalid UTF-8, a huge or negative max_tokens, a path-traversal adapter load, a field of the
wrong type), while one adapter is unloaded and loaded again under the requests that name it. It
passes with zero 5xx and zero transport errors, every refusal a 4xx with a message, and, once the
load is over, the engine idle (no request, every KV block and adapter reference free) and resident
memory within MEMORY_SLACK of its level after an unmeasured warm-up pass.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import statistics
import time
from typing import Any

from loraforge.bench import release_freed_memory, status_mb

SWAP = "soak-swap"  # the adapter unloaded and loaded again while requests name it
KINDS = {  # kind: weight in the mix
    "valid": 6, "swap_adapter": 2, "disconnect": 2, "oversized": 1, "nested": 1, "bad_utf8": 1,
    "huge_max_tokens": 1, "negative_max_tokens": 1, "traversal": 1, "wrong_type": 1, "reload": 1,
}
BODY_LIMIT = 1 << 16  # the soak server's body limit: an oversized body is this plus one


def hostile_body(kind: str, adapter: str, prompt: str, max_tokens: int) -> tuple[str, bytes]:
    """(path, raw body) of one request of `kind`."""
    ok = {"model": adapter, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    raw = {
        "valid": ok,
        "swap_adapter": {**ok, "model": SWAP},
        "disconnect": {**ok, "max_tokens": max_tokens * 4, "stream": True, "ignore_eos": True},
        "huge_max_tokens": {**ok, "max_tokens": 10 ** 18},
        "negative_max_tokens": {**ok, "max_tokens": -7},
        "wrong_type": {**ok, "stream": {"yes": 1}, "temperature": "hot"},
    }
    if kind in raw:
        return "/v1/completions", json.dumps(raw[kind]).encode()
    if kind == "traversal":
        return "/v1/load_lora_adapter", json.dumps({"lora_name": "evil", "lora_path": "../../../etc"}).encode()
    if kind == "reload":  # unload then load: the load half is sent by `one` after this
        return "/v1/unload_lora_adapter", json.dumps({"lora_name": SWAP}).encode()
    return "/v1/completions", {
        "oversized": b'{"model": "x", "prompt": "' + b"x" * BODY_LIMIT + b'"}',
        "nested": b'{"model": "x", "prompt": "hi", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        "bad_utf8": b'{"model": "' + adapter.encode() + b'", "prompt": "\xc3\x28\xff"}',
    }[kind]


async def fire(url: str, plan: list[tuple[str, str, int]], concurrency: int, swap_path: str) -> dict[str, Any]:
    """Send the plan (kind, adapter, prompt, max_tokens); status counts per kind, latencies, failures."""
    import httpx

    gate = asyncio.Semaphore(concurrency)
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    latencies: list[float] = []
    failures: list[str] = []
    headers = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=url, timeout=600,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        def record(kind: str, resp: Any) -> None:
            counts[kind][resp.status_code] += 1
            if resp.status_code >= 500 or (resp.status_code >= 400 and not _has_message(resp)):
                failures.append(f"{kind} {resp.status_code}: {resp.text[:200]}")

        async def one(kind: str, adapter: str, prompt: str, max_tokens: int) -> None:
            path, body = hostile_body(kind, adapter, prompt, max_tokens)
            async with gate:
                t0 = time.perf_counter()
                try:
                    if kind == "disconnect":
                        async with client.stream("POST", path, content=body, headers=headers) as resp:
                            async for _ in resp.aiter_raw():
                                break  # leaving the block closes the connection mid-stream
                    else:
                        resp = await client.post(path, content=body, headers=headers)
                        if kind == "reload":
                            record("unload", resp)
                            kind = "load"
                            resp = await client.post("/v1/load_lora_adapter", headers=headers,
                                                     json={"lora_name": SWAP, "lora_path": swap_path})
                    record(kind, resp)
                except httpx.HTTPError as exc:
                    counts[kind]["transport"] += 1
                    failures.append(f"{kind} {type(exc).__name__}: {exc}")
                latencies.append((time.perf_counter() - t0) * 1000)

        await asyncio.gather(*(one(*p) for p in plan))
    return {"counts": counts, "latencies": sorted(latencies), "failures": failures}


def _has_message(resp: Any) -> bool:
    try:
        return bool(resp.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return False


def soak_plan(n: int, names: list[str], prompts: list[str], max_tokens: int, seed: int) -> list[tuple[str, str, int]]:
    """n seeded (kind, adapter, prompt, max_tokens) drawn by KINDS' weights."""
    rng = random.Random(seed)
    kinds = rng.choices(list(KINDS), weights=list(KINDS.values()), k=n)
    return [(k, rng.choice(names), rng.choice(prompts), max_tokens) for k in kinds]


def soak(engine: Any, url: str, plan: list[tuple[str, str, int]], concurrency: int, swap_path: str,
         slack: float) -> dict[str, Any]:
    """Warm up on the plan, then run it measured; the figures and whether it passed."""
    asyncio.run(fire(url, plan, concurrency, swap_path))
    _drain(engine)
    release_freed_memory()
    idle_mb, blocks_before = status_mb(), engine.kv.free_blocks
    t0 = time.perf_counter()
    run = asyncio.run(fire(url, plan, concurrency, swap_path))
    wall = time.perf_counter() - t0
    _drain(engine)
    release_freed_memory()
    after_mb = status_mb()
    counts = {kind: {str(k): v for k, v in sorted(c.items(), key=str)} for kind, c in sorted(run["counts"].items())}
    server_errors = sum(v for c in run["counts"].values() for k, v in c.items() if k == "transport" or k >= 500)
    idle = (not engine.has_work() and engine.kv.free_blocks == engine.kv.num_blocks
            and not any(engine.pool.refs.values()))
    result = {"requests": len(plan), "concurrency": concurrency, "seconds": round(wall, 1),
              "server_errors_5xx": server_errors, "by_kind": counts,
              "client_errors_4xx": sum(v for c in run["counts"].values() for k, v in c.items()
                                       if k != "transport" and 400 <= k < 500),
              "p50_ms": round(statistics.median(run["latencies"]), 1),
              "p99_ms": round(run["latencies"][max(0, round(0.99 * len(run["latencies"])) - 1)], 1),
              "idle_rss_mb": round(idle_mb, 1), "after_rss_mb": round(after_mb, 1),
              "kv_free_before": blocks_before, "kv_free_after": engine.kv.free_blocks,
              "kv_blocks": engine.kv.num_blocks, "engine_idle_after": idle, "first_failures": run["failures"][:3]}
    result["passed"] = not run["failures"] and idle and after_mb <= idle_mb * (1 + slack)
    print(json.dumps(result), flush=True)
    return result


def _drain(engine: Any, timeout: float = 30.0) -> None:
    """Wait for the engine to finish what the dropped streams and last requests left it."""
    deadline = time.monotonic() + timeout
    while engine.has_work() and time.monotonic() < deadline:
        time.sleep(0.05)
