"""A continuous-batching generation engine serving many LoRA adapters on one base model (S-LoRA,
"S-LoRA: Serving Thousands of Concurrent LoRA Adapters", arXiv 2311.03285).

Each step runs one forward pass over a flat batch of tokens from every scheduled request: whole
prompts of requests joining now (prefill) and the last token of requests already running (decode).
Requests join and leave at token boundaries. Inside every adapted linear of the base model

    Y = X W0ᵀ  +  s_a(t) · (X_t A_a(t)ᵀ) B_a(t)ᵀ     (row t; adapter a(t) of token t, never merged)

the base matmul runs once for all T tokens and the low-rank path per token with its own adapter
(AdapterPool.add_delta); requests are ordered by adapter slot so that equal adapters form segments.
Adapters of other methods take the same path (serve/updates.py): a low-rank update as its factors,
DoRA with its per-output gain applied after the LoRA path, a higher-rank update as a dense dW, and
an adapter's own FFN (MixLoRA's router and experts) on its own tokens in place of the base FFN, and
its own rows of the embedding and output head (modules_to_save) for its tokens and its logits.
Keys and values live in a paged BlockPool; attention gathers each request's own blocks.

The forward pass is written here over the Hugging Face Llama modules (embeddings, norms, rotary
embedding, projections and MLP are theirs), so only the Llama family is served (SmolLM2 is Llama).
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from loraforge.core.errors import AdapterError, LoraforgeError
from loraforge.serve import native
from loraforge.serve.kv_cache import BlockPool
from loraforge.serve.pool import AdapterPool, LoRABatch

SERVED_MODEL_TYPES = ("llama",)
LORA_KERNELS = ("auto", "segment", "padded", "native")  # AdapterPool.add_delta; auto: native where it builds
QKV, GATE_UP = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")
SHARED_INPUT = (QKV, GATE_UP)  # projections of one Llama layer that read the same input
SINGLE = (("self_attn.o_proj",), ("mlp.down_proj",))


class RequestError(LoraforgeError):
    """A request that cannot be served as asked (HTTP 400)."""


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # a request's own generator: its samples do not depend on its batch
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise RequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise RequestError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if any(not isinstance(s, str) or not s for s in self.stop) or len(self.stop) > 16:
            raise RequestError("stop must be at most 16 non-empty strings")
        if self.seed is not None and not -(1 << 63) <= self.seed < 1 << 64:  # torch's seed range
            raise RequestError(f"seed must be in [-2**63, 2**64), got {self.seed}")


@dataclass(eq=False)
class Request:
    id: str
    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    on_event: Callable[["Request", str], None] | None = None  # (request, new text), from the engine thread
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # text sent so far (a stop string and anything after it never is)
    decoded: str = ""  # output_ids[:read_offset] as text, grown token by token (`detokenize`)
    prefix_offset: int = 0
    read_offset: int = 0
    finish_reason: str | None = None  # "stop", "length", "abort", "refused: ..." or "error: ..."
    slot: int = 0
    blocks: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose keys/values are in the cache
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    done: threading.Event = field(default_factory=threading.Event)
    generator: torch.Generator = field(default_factory=torch.Generator)


class Engine:
    def __init__(self, model: nn.Module, tokenizer: Any, adapters_dir: str | None = None, max_loaded: int = 8,
                 max_rank: int = 16, block_size: int = 16, max_kv_tokens: int = 16384, max_batch: int = 32,
                 max_batch_tokens: int = 4096, lora_kernel: str = "auto", model_name: str = "base"):
        if getattr(model, "loraforge_config", None) is not None:
            raise AdapterError("the model has an adapter attached: serve the bare base model (adapters come from the pool)")
        if model.config.model_type not in SERVED_MODEL_TYPES or not hasattr(model, "lm_head"):
            raise AdapterError(f"the engine serves causal LMs of the Llama family, not {model.config.model_type!r}")
        if lora_kernel not in LORA_KERNELS:
            raise LoraforgeError(f"lora_kernel must be one of {', '.join(LORA_KERNELS)}, got {lora_kernel!r}")
        if lora_kernel == "native" and native.library() is None:
            raise LoraforgeError(f"lora_kernel 'native' cannot run here: {native.load()[1]}")
        self.model, self.tokenizer, self.model_name = model.eval(), tokenizer, model_name
        self.max_batch, self.max_batch_tokens, self.lora_kernel = max_batch, max_batch_tokens, lora_kernel
        self.max_model_len = model.config.max_position_embeddings
        cfg, w = model.config, model.lm_head.weight
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.layer_modules = [{n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
                              for layer in model.model.layers]
        modules = {f"model.layers.{i}.{n}": m for i, mods in enumerate(self.layer_modules) for n, m in mods.items()}
        # the projections that read one input, each group's x Aᵀ one matmul (AdapterPool.add_deltas)
        self.paths = [{group: tuple(f"model.layers.{i}.{n}" for n in group) for group in SHARED_INPUT + SINGLE}
                      for i in range(len(self.layer_modules))]
        self.pool = AdapterPool(modules, adapters_dir, max_loaded, max_rank, base_name=model_name,
                                blocks={f"model.layers.{i}.mlp": layer.mlp for i, layer in enumerate(model.model.layers)},
                                tables={"model.embed_tokens": model.model.embed_tokens, "lm_head": model.lm_head},
                                groups=[paths[g] for paths in self.paths for g in SHARED_INPUT])
        self.kv = BlockPool(cfg.num_hidden_layers, cfg.num_key_value_heads, self.head_dim,
                            -(-max_kv_tokens // block_size), block_size, w.dtype, w.device)
        eos = {tokenizer.eos_token_id, *_as_list(model.generation_config.eos_token_id)}
        self.eos_ids = {e for e in eos if e is not None}
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self._inbox: collections.deque[Request] = collections.deque()  # appended by other threads
        self._aborts: collections.deque[Request] = collections.deque()
        self._ids = itertools.count()
        self.generated_tokens, self.preemptions = 0, 0
        self.recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=256)  # (time, tokens) per step

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], adapter: str | None = None, params: SamplingParams | None = None,
                    on_event: Callable[[Request, str], None] | None = None) -> Request:
        """Check and queue a request (thread-safe); it joins the batch at the next step."""
        params = params or SamplingParams()
        if isinstance(prompt, str) and not is_utf8(prompt):
            raise RequestError("the prompt is not valid Unicode (a lone surrogate such as \\ud800)")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise RequestError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise RequestError(f"the prompt has {len(ids)} tokens; the context holds {self.max_model_len}")
        if len(ids) + params.max_tokens > self.max_model_len:  # refused as vLLM does, not cut: the client asked for it
            raise RequestError(f"{len(ids)} prompt + {params.max_tokens} new tokens exceed the context of "
                               f"{self.max_model_len} tokens: lower max_tokens")
        if self.kv.blocks_for(len(ids) + params.max_tokens) > self.kv.num_blocks:
            raise RequestError(f"{len(ids)} prompt + {params.max_tokens} new tokens do not fit the KV cache")
        if adapter is not None and adapter != self.model_name:
            self.pool.check(adapter)  # unknown or invalid adapters are refused now, not in the batch
        else:
            adapter = None
        req = Request(f"req-{next(self._ids)}", ids, adapter, params, on_event)
        if params.seed is not None:
            req.generator.manual_seed(params.seed)
        else:
            req.generator.seed()
        self._inbox.append(req)
        return req

    def abort(self, req: Request) -> None:
        """Stop a request and free its blocks and adapter slot at the next step (thread-safe)."""
        self._aborts.append(req)

    def has_work(self) -> bool:
        return bool(self._inbox or self._aborts or self.waiting or self.running)

    def generate(self, prompts: list[str | list[int]], adapters: list[str | None],
                 params: SamplingParams | None = None) -> list[Request]:
        """Run these requests to the end in one continuous batch (for scripts and tests)."""
        reqs = [self.add_request(p, a, params) for p, a in zip(prompts, adapters, strict=True)]
        while not all(r.done.is_set() for r in reqs):
            self.step()
        return reqs

    # ---- one iteration --------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> int:
        """Admit, run one forward pass, sample one token per scheduled request. Returns how many ran."""
        while self._inbox:
            self.waiting.append(self._inbox.popleft())
        while self._aborts:
            req = self._aborts.popleft()
            if req in self.waiting:
                self.waiting.remove(req)
            self._finish(req, "abort")
        batch = self._schedule()
        if not batch:
            return 0
        logits = self._forward(batch).float().cpu()  # (B, vocab); sampling runs on the host
        for req, row in zip(batch, logits):
            req.num_cached = len(req.prompt_ids) + len(req.output_ids)
            self._append(req, self._sample(req, row))
        self.generated_tokens += len(batch)
        self.recent.append((time.monotonic(), len(batch)))
        return len(batch)

    def _schedule(self) -> list[Request]:
        for req in list(self.running):  # each running request writes one more token
            while req in self.running and not self.kv.grow(req.blocks, req.num_cached + 1):
                youngest = max(self.running, key=lambda r: r.arrival)
                self._preempt(youngest)  # it recomputes its keys when blocks free up (vLLM's recompute)
        budget = self.max_batch_tokens - len(self.running)
        while self.waiting and len(self.running) < self.max_batch:
            req = self.waiting[0]
            n = len(req.prompt_ids) + len(req.output_ids)
            if (n > budget and self.running) or not self.kv.grow(req.blocks, n):
                break
            try:
                slot = self.pool.acquire(req.adapter)
            except AdapterError as exc:  # unloaded or changed on disk since it was queued: only this one fails
                self.kv.release(self.waiting.popleft().blocks)
                self._finish(req, f"refused: {exc}")  # the client's doing (HTTP 409), not a server fault
                continue
            if slot is None:  # every adapter slot is held by running requests
                self.kv.release(req.blocks)
                break
            req.slot, budget = slot, budget - n
            self.running.append(self.waiting.popleft())
        for req in itertools.islice(self.waiting, self.pool.max_loaded):
            self.pool.prefetch(req.adapter)
        self.running.sort(key=lambda r: r.slot)  # equal adapters become one segment
        return list(self.running)

    def _preempt(self, req: Request) -> None:
        self.preemptions += 1
        self.running.remove(req)
        self.kv.release(req.blocks)
        self.pool.release(req.adapter)
        req.num_cached = 0
        self.waiting.appendleft(req)

    def _finish(self, req: Request, reason: str) -> None:
        if req.finish_reason is not None:
            return
        if req in self.running:
            self.running.remove(req)
            self.kv.release(req.blocks)
            self.pool.release(req.adapter)
        req.finish_reason = reason
        self._notify(req, "")
        req.done.set()

    def fail_all(self, message: str) -> None:
        for req in list(self.running) + list(self.waiting):
            self._finish(req, f"error: {message}")
        self.waiting.clear()

    # ---- the forward pass -----------------------------------------------------------------------
    def _forward(self, batch: list[Request]) -> torch.Tensor:
        ids, positions, segments, groups, last = [], [], [], [], []
        decode = {"q": [], "tables": [], "pos": []}
        for req in batch:
            seq = req.prompt_ids + req.output_ids
            start, n = len(ids), len(seq) - req.num_cached
            pos = list(range(req.num_cached, len(seq)))
            ids += seq[req.num_cached:]
            positions += pos
            if segments and segments[-1][0] == req.slot:
                segments[-1] = (req.slot, segments[-1][1], start + n)
            else:
                segments.append((req.slot, start, start + n))
            last.append(start + n - 1)
            if n == 1:  # decode requests share one attention call, prefills get their own
                decode["q"].append([start]), decode["tables"].append(req.blocks), decode["pos"].append(pos)
            else:
                groups.append(_attention_group([list(range(start, start + n))], [req.blocks], [pos], self.kv.block_size))
        if decode["q"]:
            groups.append(_attention_group(decode["q"], decode["tables"], decode["pos"], self.kv.block_size))
        dev = self.kv.k.device  # indices are built on the host, then moved once
        ids_t, pos_t = torch.tensor(ids, device=dev), torch.tensor(positions, device=dev)
        write_slots = torch.cat([self.kv.slots(r.blocks, torch.arange(r.num_cached, len(r.prompt_ids) + len(r.output_ids)))
                                 for r in batch]).to(dev)  # (T,)
        groups = [tuple(t.to(dev) for t in group) for group in groups]
        lora = LoRABatch.build(segments, dev, self.pool.slot_rank)
        inner = self.model.model
        x = inner.embed_tokens(ids_t)  # (T, H)
        for slot, start, end in segments:  # adapters with embedding rows of their own (modules_to_save)
            if slot in self.pool.rows["model.embed_tokens"]:
                index, _, rows = self.pool.rows["model.embed_tokens"][slot]
                at = index[ids_t[start:end]]  # (n,): the adapter's row of each token, -1 for the base's
                x[start:end][at >= 0] = rows[at[at >= 0]]
        cos, sin = inner.rotary_emb(x, pos_t[None])  # (1, T, hd) each
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)  # (T, H)
            q, k, v = (y.view(len(ids), -1, self.head_dim) for y in self._linear(i, QKV, h, lora))  # (T, nh | nkv, hd)
            q, k = apply_rotary_pos_emb(q, k, cos[0], sin[0], unsqueeze_dim=1)
            self.kv.write(i, write_slots, k, v)
            out = torch.empty_like(q)  # (T, nh, hd)
            for group in groups:
                self._attend(i, attn.scaling, q, out, *group)
            x = x + self._linear(i, SINGLE[0], out.flatten(1), lora)[0]  # (T, H)
            h = layer.post_attention_layernorm(x)
            gate, up = self._linear(i, GATE_UP, h, lora)
            ffn = self._linear(i, SINGLE[1], layer.mlp.act_fn(gate) * up, lora)[0]  # (T, H)
            own = self.pool.block[f"model.layers.{i}.mlp"]  # slot -> an adapter's own FFN (MixLoRA)
            for slot, start, end in lora.segments:
                if slot in own:
                    ffn[start:end] = own[slot](h[start:end])  # its tokens only; the base FFN's rows are dropped
            x = x + ffn
        h = inner.norm(x[last])  # (B, H)
        logits = self.model.lm_head(h)  # (B, vocab)
        for b, req in enumerate(batch):  # adapters with output-head rows of their own (modules_to_save)
            if req.slot in self.pool.rows["lm_head"]:
                _, ids, rows = self.pool.rows["lm_head"][req.slot]
                logits[b, ids] = h[b] @ rows.T  # (k,): its own logits of the ids it changed
        return logits

    def _linear(self, layer: int, names: tuple[str, ...], x: torch.Tensor, lora: LoRABatch) -> tuple[torch.Tensor, ...]:
        """The projections `names` of one layer on the same input x: base matmuls (all T tokens at once), then
        each token's own adapter."""
        ys = tuple(self.layer_modules[layer][name](x) for name in names)
        self.pool.add_deltas(self.paths[layer][names], x, ys, lora, kernel=self.lora_kernel)
        return ys

    def _attend(self, layer: int, scale: float, q: torch.Tensor, out: torch.Tensor, q_index: torch.Tensor,
                q_valid: torch.Tensor, tables: torch.Tensor, mask: torch.Tensor) -> None:
        """Attention of one group of requests over their own cached keys: q_index (G, Tq) flat token
        rows, tables (G, nb) block tables, mask (G, 1, Tq, nb * block_size) True where a query may look."""
        k, v = self.kv.read(layer, tables)  # (G, L, nkv, hd)
        qg = q[q_index].transpose(1, 2)  # (G, nh, Tq, hd)
        # grouped-query attention: SDPA maps each kv head to its query heads without copying it
        o = F.scaled_dot_product_attention(qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale,
                                           enable_gqa=True)  # (G, nh, Tq, hd)
        out[q_index[q_valid]] = o.transpose(1, 2)[q_valid]

    # ---- sampling and stopping ------------------------------------------------------------------
    def _sample(self, req: Request, logits: torch.Tensor) -> int:
        p = req.params
        if p.temperature == 0.0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / p.temperature, dim=-1)  # (vocab,)
        if p.top_p < 1.0:  # nucleus: the smallest set of top tokens whose mass reaches top_p
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < p.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=req.generator))

    def _append(self, req: Request, token: int) -> None:
        if req.first_token_at is None:
            req.first_token_at = time.monotonic()
        if token in self.eos_ids and not req.params.ignore_eos:  # send what was held back for a stop string
            self._emit(req, self.tokenizer.decode(req.output_ids, skip_special_tokens=True))
            return self._finish(req, "stop")
        req.output_ids.append(token)
        text = detokenize(self.tokenizer, req)
        hits = [i for i in (text.find(s) for s in req.params.stop) if i >= 0]
        full = len(req.output_ids) >= req.params.max_tokens or req.num_cached + 1 >= self.max_model_len
        if hits or full:  # the last text whole, a half character included, decoded once
            self._emit(req, text[:min(hits)] if hits else self.tokenizer.decode(req.output_ids, skip_special_tokens=True))
            return self._finish(req, "stop" if hits else "length")
        held = max((k for s in req.params.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self._emit(req, text[:len(text) - held])

    def _emit(self, req: Request, visible: str) -> None:
        delta, req.text = visible[len(req.text):], visible
        if delta:
            self._notify(req, delta)

    def _notify(self, req: Request, delta: str) -> None:
        if req.on_event is None:
            return
        try:
            req.on_event(req, delta)
        except Exception:  # noqa: BLE001  a listener that is gone (closed event loop) loses its request only
            req.on_event = None
            self.abort(req)

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self.recent) if now - t <= window]
        return sum(n for _, n in recent) / window


def _attention_group(q_rows: list[list[int]], tables: list[list[int]], positions: list[list[int]], block_size: int):
    """Padded index tensors for one attention call: query i (at position p_i) sees keys 0..p_i of its
    own request; tables are padded with block 0, whose keys no query's mask reaches."""
    tq, nb = max(map(len, q_rows)), max(map(len, tables))
    q_index = torch.zeros(len(q_rows), tq, dtype=torch.long)
    q_valid = torch.zeros(len(q_rows), tq, dtype=torch.bool)
    table = torch.zeros(len(q_rows), nb, dtype=torch.long)
    pos = torch.zeros(len(q_rows), tq, dtype=torch.long)  # padded queries sit at 0: they see key 0, no NaN
    for g, (rows, blocks, p) in enumerate(zip(q_rows, tables, positions)):
        q_index[g, :len(rows)], q_valid[g, :len(rows)] = torch.tensor(rows), True
        table[g, :len(blocks)], pos[g, :len(p)] = torch.tensor(blocks), torch.tensor(p)
    mask = torch.arange(nb * block_size)[None, None, :] <= pos[:, :, None]  # (G, Tq, L)
    return q_index, q_valid, table, mask[:, None]


def detokenize(tokenizer: Any, req: Request) -> str:
    """The output's text after its newest token, decoding only the last few tokens (vLLM's incremental
    detokenizer; decoding the whole output at every token cost O(n) per token, O(n^2) per request).
    The tokens from prefix_offset on are decoded with and without those past read_offset; the
    difference is new text once it does not end in half of a multi-byte character (U+FFFD), else it
    waits for the next token. The earlier tokens in the window give a token its context (a leading
    space, a byte it completes)."""
    ids = req.output_ids
    before = tokenizer.decode(ids[req.prefix_offset:req.read_offset], skip_special_tokens=True)
    after = tokenizer.decode(ids[req.prefix_offset:], skip_special_tokens=True)
    if len(after) > len(before) and not after.endswith("\ufffd"):
        req.decoded += after[len(before):]
        req.prefix_offset, req.read_offset = req.read_offset, len(ids)
    return req.decoded


def is_utf8(text: str) -> bool:
    """False for text with lone surrogates (JSON's "\\ud800"), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]
