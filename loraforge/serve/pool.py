"""The adapter pool: every adapter of a folder known by name, the hot ones in compute slots.

    host store   name -> {module: HostUpdate (A (r, d_in), s·B (d_out, r); DoRA's gain g (d_out,);
                 or a dense dW (d_out, d_in))}     read and checked once, kept (serve/updates.py:
                 every method that merges, each in the cheapest exact form)
    compute      per module: A (N+1, r_max, d_in), s·Bᵀ (N+1, r_max, d_out), rank (N+1,), g (N+1, d_out),
                 and the dense dW of the slots that have one
                 slot 0 is "no adapter" (all zeros, g = 1); slots 1..N hold at most `max_loaded` adapters;
                 per slot also its own FFN (MixLoRA) and its own rows of the embedding and output head
                 (modules_to_save: an id -> row index (V,), the ids and their rows)

An adapter enters a slot when a request that names it is admitted (a miss), or earlier, into an empty
slot, while its request waits in the queue (prefetch); it leaves only when no running request holds
it and its slot is the least recently used one that is needed (LRU). Ranks
differ between adapters: a slot is zero-padded to `max_rank`, which is exact (zero rows add
nothing), and the segment kernel slices each adapter back to its own rank so padding costs nothing.

The low-rank path for a batch of tokens X (T, d_in) whose token t uses slot a(t) (S-LoRA eq.):
    Y_t += s_a(t) · (X_t A_a(t)ᵀ) B_a(t)ᵀ
with s folded into B when a slot is filled, and B kept transposed, so that a slot's first r rows
are one contiguous block (twice as fast to stream through a batched matmul as a transposed view).
Tokens come sorted by slot, so each adapter's tokens are one segment. Three kernels compute the path,
each reading an adapter's factors once per segment and adding into the base output:
    native   lowrank.c (serve/native.py): per group of projections, every segment's x Aᵀ and its
             products with each Bᵀ and DoRA's gain in one call, straight from the pool's buffers. The
             default wherever it builds (float32 on the CPU, a C compiler at hand); then the two below
    segment  two matmuls per segment, each cut to the adapter's own rank: for long segments (prefill)
    padded   tokens scattered into (slots, longest segment, d_in), then two batched matmuls over
             a contiguous run of slots, cut to the largest rank among the run's (views of the pool,
             nothing copied): for many short segments (decode over many adapters), where the loop's
             fixed cost per call dominates. Each step cuts the slots in use into the runs that read
             the fewest factor bytes (a decode step is bound by them: 32 adapters' factors weigh
             nearly what the base's weights do), and the pool places wide adapters from the top slot
             down and narrow ones from the bottom up, so that rank-8 adapters are not read at rank 16
The padded layout replaced a per-token gather (BGMV), which copied each token's A and B and was
slower on every decode mix measured on CPU; the native kernel then replaced both torch layouts on the
CPU, as it spends nothing around the products (the padded layout's scatter, permute and gather were
a third of a decode step's low-rank time). A Triton kernel for GPUs is not written yet.
"""

from __future__ import annotations

import ctypes
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from loraforge.adapters.io import read_adapter
from loraforge.core.config import CONFIG_NAME, AdapterConfig
from loraforge.core.errors import AdapterError
from loraforge.serve import native
from loraforge.serve.updates import HostUpdate, read_updates, read_whole_modules

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
HostAdapter = dict[str, HostUpdate]


class UnknownAdapterError(AdapterError):
    """A request names an adapter the pool does not know (HTTP 404)."""


class AdapterBusyError(AdapterError):
    """An adapter cannot be unloaded while requests use it (HTTP 409)."""


# An extra padded run's fixed cost (one more scatter, two batched matmuls and a gather per group, some
# 50 us on CPU), in slot-ranks of factors streamed: 48 rank rows of a q, k, v group of SmolLM2 are 48 x
# 2,688 floats, 516 KB, about 45 us at the 11.6 GB/s a decode step's matmuls reach on the 2-core machine.
RUN_COST = 48
# Adapters of rank <= NARROW (PEFT's default, and most adapters') fill slots from the bottom up, wider ones
# from the top down. A constant, not a share of max_rank, so that a pool's layout, and so its sums to the
# last bit, does not depend on how wide it was made.
NARROW = 8


@dataclass
class PaddedRun:
    """Slots first..last in the padded layout: tokens start..end (those slots' tokens, in slot order)
    scattered into (last - first + 1, longest, d_in), then two batched matmuls over views of the pool."""

    first: int
    last: int
    start: int
    end: int
    longest: int  # tokens in the run's longest segment
    slots: list[int]  # the slots its tokens use: the matmuls are cut to the largest rank among them
    rows: torch.Tensor  # (end - start,) each token's row of the layout flattened: (slot - first) * longest + offset


@dataclass
class LoRABatch:
    """Which slot each token of one step uses, in both layouts; built once per step, used by every
    adapted linear of every layer."""

    token_slots: torch.Tensor  # (T,) slot of each token, sorted
    segments: list[tuple[int, int, int]]  # (slot, start, end): runs of tokens that share a slot
    runs: list[PaddedRun]  # the padded layout's runs of slots; slots without low-rank factors need none
    table: torch.Tensor  # (segments, 3) int64 on the host: the segments as the native kernel reads them

    @classmethod
    def build(cls, segments: list[tuple[int, int, int]], device: torch.device | str = "cpu",
              slot_ranks: list[int] | None = None) -> "LoRABatch":
        """`slot_ranks`: each slot's largest rank (the pool's `slot_rank`); None: one run over every slot."""
        if any(a[0] >= b[0] for a, b in zip(segments, segments[1:])):
            raise ValueError("segments must come in increasing slot order, one per slot")
        slots = torch.tensor([slot for slot, start, end in segments for _ in range(start, end)], device=device)
        if slot_ranks is None:
            spans = [(segments[0][0], segments[-1][0])]
        else:
            spans = _plan_runs([slot for slot, _, _ in segments if slot_ranks[slot]], slot_ranks)
        return cls(slots, segments, [_padded_run(segments, first, last, device) for first, last in spans],
                   torch.tensor(segments, dtype=torch.int64).view(-1, 3))

    def prefers_padded(self) -> bool:
        """Many short segments: the loop's fixed cost per matmul call outweighs the padding
        (measured on CPU: padded wins from 3 segments of 8 or fewer tokens on average)."""
        return len(self.segments) >= 3 and len(self.token_slots) <= 8 * len(self.segments)


def _padded_run(segments: list[tuple[int, int, int]], first: int, last: int, device: torch.device | str) -> PaddedRun:
    inside = [seg for seg in segments if first <= seg[0] <= last]
    longest = max(end - start for _, start, end in inside)
    rows = [(slot - first) * longest + i for slot, start, end in inside for i in range(end - start)]
    return PaddedRun(first, last, inside[0][1], inside[-1][2], longest, [slot for slot, _, _ in inside],
                     torch.tensor(rows, device=device))


def _plan_runs(slots: list[int], slot_ranks: list[int]) -> list[tuple[int, int]]:
    """Cut the used slots (sorted) into runs (first, last) that stream the fewest factor rows: a run reads
    (last - first + 1) slots at its largest rank, plus RUN_COST. Exact dynamic programme over the cut
    points (a decode step has at most max_batch slots). Rank-8 adapters beside rank-16 ones then stop
    being read at rank 16, when the pool placed them apart (`AdapterPool._free_slot`)."""
    best, cut = [0.0] + [math.inf] * len(slots), [0] * (len(slots) + 1)
    for j in range(1, len(slots) + 1):
        rank = 0
        for i in range(j - 1, -1, -1):  # the last run is slots[i:j]
            rank = max(rank, slot_ranks[slots[i]])
            cost = best[i] + (slots[j - 1] - slots[i] + 1) * rank + RUN_COST
            if cost < best[j]:
                best[j], cut[j] = cost, i
    spans, j = [], len(slots)
    while j:
        spans.append((slots[cut[j]], slots[j - 1]))
        j = cut[j]
    return spans[::-1]


class AdapterPool:
    def __init__(self, modules: dict[str, nn.Linear], adapters_dir: str | Path | None = None, max_loaded: int = 8,
                 max_rank: int = 16, base_name: str = "the base model", blocks: dict[str, nn.Module] | None = None,
                 tables: dict[str, nn.Module] | None = None, groups: list[tuple[str, ...]] | None = None):
        if max_loaded < 1:
            raise AdapterError(f"max_loaded must be at least 1, got {max_loaded}")
        if max_rank < 1:
            raise AdapterError(f"max_rank must be at least 1, got {max_rank}")
        self.modules, self.max_loaded, self.max_rank, self.base_name = modules, max_loaded, max_rank, base_name
        self.blocks = blocks or {}  # paths the engine runs as one module (FFNs): an adapter may replace them whole
        self.block: dict[str, dict[int, nn.Module]] = {n: {} for n in self.blocks}  # slot -> the adapter's module
        self.tables = tables or {}  # the input embedding and output head: modules_to_save change rows of them
        # slot -> (id -> row index or -1 (V,), the ids (k,), their rows (k, H))
        self.rows: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {n: {} for n in self.tables}
        self.adapters_dir = Path(adapters_dir).resolve() if adapters_dir is not None else None
        self.known: dict[str, Path] = {}
        self.host: dict[str, HostAdapter] = {}
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self.refs: dict[str, int] = {}
        self.hits = self.misses = self.evictions = 0
        self._lock = threading.RLock()
        w = next(iter(modules.values())).weight
        slots = max_loaded + 1
        # modules that read one input share one buffer of A rows, (slots, max_rank * G, d_in), rank-major:
        # row k G + i is rank k of module i, so the first r G rows of a slot are ranks < r of all G
        # modules, and one matmul over that prefix gives all their x Aᵀ
        grouped = [tuple(g) for g in groups or []]
        if sorted(m for g in grouped for m in g) != sorted({m for g in grouped for m in g}) or \
                not {m for g in grouped for m in g} <= set(modules):
            raise AdapterError("each module goes in at most one group, and groups name the pool's modules")
        self.groups = grouped + [(n,) for n in modules if not any(n in g for g in grouped)]
        if any(len({modules[m].in_features for m in g}) > 1 for g in self.groups):
            raise AdapterError("the modules of a group must share their input width")
        self.group_of = {m: (g, i) for g in self.groups for i, m in enumerate(g)}
        self.A_group = {g: w.new_zeros(slots, max_rank * len(g), modules[g[0]].in_features) for g in self.groups}
        self.A = {m: self.A_group[g].view(slots, max_rank, len(g), -1)[:, :, i]  # (slots, max_rank, d_in), a view
                  for g in self.groups for i, m in enumerate(g)}
        self.Bt = {n: w.new_zeros(slots, max_rank, m.out_features) for n, m in modules.items()}  # s·Bᵀ
        self.rank = {n: [0] * slots for n in modules}
        self.slot_rank = [0] * slots  # each slot's largest rank over modules: LoRABatch plans its runs by it
        # DoRA's m / n, 1 for others: one buffer per group, its modules' columns side by side, so that
        # in decode one gather gives every token its gains for the whole group
        self.gain_group = {g: w.new_ones(slots, sum(modules[m].out_features for m in g)) for g in self.groups}
        self.gain = {}  # (slots, d_out) each, a view of its group's buffer
        for g in self.groups:
            for m, part in zip(g, self.gain_group[g].split([modules[m].out_features for m in g], dim=1)):
                self.gain[m] = part
        self.gained = {n: [False] * slots for n in modules}
        # the same ranks and DoRA flags as tables per group, (G, slots), for the native kernel
        self.rank_table = {g: torch.zeros(len(g), slots, dtype=torch.int64) for g in self.groups}
        self.gained_table = {g: torch.zeros(len(g), slots, dtype=torch.uint8) for g in self.groups}
        self._native_args: dict[tuple[str, ...], tuple] = {}  # per group: its Bᵀ, widths and gains for the kernel
        self.dense: dict[str, dict[int, torch.Tensor]] = {n: {} for n in modules}  # slot -> dW (d_out, d_in)
        if self.adapters_dir is not None:
            if not self.adapters_dir.is_dir():
                raise AdapterError(f"adapters folder {adapters_dir} does not exist")
            for sub in sorted(self.adapters_dir.iterdir()):
                if (sub / CONFIG_NAME).is_file() and NAME_RE.fullmatch(sub.name):
                    # as the load endpoint: nothing served from outside the folder, a link included
                    if not sub.resolve().is_relative_to(self.adapters_dir):
                        raise AdapterError(f"adapter {sub.name!r} links outside the adapters folder {adapters_dir}")
                    self.known[sub.name] = sub

    # ---- names and the host store ---------------------------------------------------------------
    def register(self, name: str, path: str | Path) -> None:
        """Make adapter `name` servable from `path` (inside the adapters folder), checked now."""
        if not NAME_RE.fullmatch(name or ""):
            raise AdapterError(f"bad adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
        if self.adapters_dir is None:
            raise AdapterError("no adapters folder was given: adapters cannot be loaded")
        try:
            resolved = (self.adapters_dir / path).resolve()
            if not resolved.is_relative_to(self.adapters_dir):
                raise AdapterError(f"adapter path {str(path)!r} is outside the adapters folder")
            host = self._read(name, resolved)
        except (OSError, ValueError) as exc:  # a NUL byte, a name too long for the file system
            raise AdapterError(f"adapter path {str(path)[:200]!r} cannot be read: {exc}") from exc
        with self._lock:
            if name in self.known and self.refs.get(name):
                raise AdapterBusyError(f"adapter {name!r} is in use by running requests")
            self._drop(name)
            self.known[name], self.host[name] = resolved, host

    def unregister(self, name: str) -> None:
        with self._lock:
            if name not in self.known:
                raise UnknownAdapterError(f"unknown adapter {name!r}")
            if self.refs.get(name):
                raise AdapterBusyError(f"adapter {name!r} is in use by running requests")
            self._drop(name)
            del self.known[name]

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self.known)

    def check(self, name: str) -> None:
        """Known and valid (read into the host store on first use); raises otherwise."""
        with self._lock:
            if name not in self.known:
                raise UnknownAdapterError(f"unknown adapter {name!r}")
            if name in self.host:
                return
            path = self.known[name]
        host = self._read(name, path)
        with self._lock:
            self.host.setdefault(name, host)

    def _read(self, name: str, path: Path) -> HostAdapter:
        config, _, state = read_adapter(path)
        label = f"adapter {name!r}"
        whole = read_whole_modules(config, state, self.modules, self.tables, self.max_rank, label)
        if config.method != "lora":
            host = read_updates(self.modules, self.blocks, self.tables, path, config, self.max_rank, label)
        else:
            saved = tuple(m + "." for m in config.modules_to_save or ())
            host = self._read_lora(name, config, {k: v for k, v in state.items() if not k.startswith(saved)})
        for module, update in whole.items():
            if module in host:
                raise AdapterError(f"{label}: {module!r} is both adapted and trained whole")
            host[module] = update
        return host

    def _read_lora(self, name: str, config: AdapterConfig, state: dict[str, torch.Tensor]) -> HostAdapter:
        factors: dict[str, dict[str, torch.Tensor]] = {}
        for key in sorted(state):
            module, sep, tensor = key.rpartition(".lora_")
            if not sep or tensor not in ("A.weight", "B.weight") or module not in self.modules:
                raise AdapterError(f"adapter {name!r}: key {key!r} has no place in {self.base_name} "
                                   "(adapter for another base model?)")
            rank, linear = config.rank_for(module), self.modules[module]
            want = (rank, linear.in_features) if tensor == "A.weight" else (linear.out_features, rank)
            if tuple(state[key].shape) != want:
                raise AdapterError(f"adapter {name!r}: key {key!r} has shape {tuple(state[key].shape)}, "
                                   f"{self.base_name} expects {want} (adapter for another base model?)")
            if rank > self.max_rank:
                raise AdapterError(f"adapter {name!r}: key {key!r} has rank {rank} > max rank {self.max_rank}")
            factors.setdefault(module, {})[tensor[0]] = state[key].to(linear.weight.dtype)
        host = {}
        for module, ab in factors.items():
            if len(ab) != 2:
                raise AdapterError(f"adapter {name!r}: module {module!r} lacks its lora_{'B' if 'A' in ab else 'A'}")
            rank, alpha = config.rank_for(module), config.alpha_for(module)
            host[module] = HostUpdate(ab["A"], ab["B"] * (alpha / (math.sqrt(rank) if config.use_rslora else rank)))
        return host

    # ---- compute slots --------------------------------------------------------------------------
    def acquire(self, name: str | None) -> int | None:
        """The slot of `name` (0 for the base), loading it on a miss; None when every slot is held."""
        if name is None:
            return 0
        with self._lock:
            self.check(name)
            if name in self.slot_of:
                self.hits += 1
                self.slot_of.move_to_end(name)
            else:
                slot = self._free_slot(rank=_rank_of(self.host[name]))
                if slot is None:
                    return None
                self.misses += 1
                self._fill(slot, self.host[name])
                self.slot_of[name] = slot
            self.refs[name] = self.refs.get(name, 0) + 1
            return self.slot_of[name]

    def prefetch(self, name: str | None) -> None:
        """Load a queued request's adapter into an empty slot ahead of time (never evicts, holds no reference)."""
        with self._lock:
            if name is None or name in self.slot_of or name not in self.host:
                return
            slot = self._free_slot(evict=False, rank=_rank_of(self.host[name]))
            if slot is not None:
                self.misses += 1
                self._fill(slot, self.host[name])
                self.slot_of[name] = slot

    def release(self, name: str | None) -> None:
        if name is not None:
            with self._lock:
                self.refs[name] -= 1

    def _free_slot(self, evict: bool = True, rank: int = 0) -> int | None:
        """An empty slot: the lowest for an adapter of rank <= NARROW, the highest for a wider one, so that
        the padded layout reads each kind in its own run at its own rank (`_plan_runs`)."""
        used = set(self.slot_of.values())
        free = [s for s in range(1, self.max_loaded + 1) if s not in used]
        if free or not evict:
            return (free[-1] if rank > NARROW else free[0]) if free else None
        idle = next((n for n in self.slot_of if not self.refs.get(n)), None)  # LRU order
        if idle is None:
            return None
        self.evictions += 1
        return self.slot_of.pop(idle)

    def _drop(self, name: str) -> None:
        self.host.pop(name, None)
        slot = self.slot_of.pop(name, None)
        if slot is not None:
            self._fill(slot, {})

    def _fill(self, slot: int, host: HostAdapter) -> None:
        for module in self.modules:
            update = host.get(module, HostUpdate())
            self.A[module][slot].zero_()
            self.Bt[module][slot].zero_()
            r = 0 if update.a is None else update.a.shape[0]
            if r:
                self.A[module][slot, :r] = update.a
                self.Bt[module][slot, :r] = update.b.T  # the scale is in B already
            self.rank[module][slot] = r
            self.gain[module][slot] = 1.0 if update.gain is None else update.gain
            self.gained[module][slot] = update.gain is not None
            group, i = self.group_of[module]
            self.rank_table[group][i, slot], self.gained_table[group][i, slot] = r, update.gain is not None
            if update.dense is None:
                self.dense[module].pop(slot, None)
            else:
                self.dense[module][slot] = update.dense.to(self.A[module].device)
        self.slot_rank[slot] = _rank_of(host)  # the rank that placed it (`_free_slot`)
        for path, slots in self.block.items():
            update = host.get(path)
            if update is None:
                slots.pop(slot, None)
            else:
                slots[slot] = update.block
        for path, slots in self.rows.items():
            update = host.get(path)
            if update is None:
                slots.pop(slot, None)
                continue
            weight = self.tables[path].weight
            ids, values = update.rows
            index = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)  # (V,) id -> row or -1
            index[ids.to(weight.device)] = torch.arange(len(ids), device=weight.device)
            slots[slot] = (index, ids.to(weight.device), values.to(weight.device))

    # ---- the low-rank path ----------------------------------------------------------------------
    def add_delta(self, module: str, x: torch.Tensor, y: torch.Tensor, batch: LoRABatch, kernel: str = "auto") -> None:
        """y += s·(x Aᵀ) Bᵀ row by row, each token with its own adapter, in place (no (T, d_out)
        temporary: in prefill that traffic cost more than the low-rank matmuls). x: (T, d_in), y: (T, d_out).
        kernel: auto (native where it builds, else segment or padded by the batch's shape) | native | segment |
        padded. Then dense updates, and DoRA's gain last: y_t = g ⊙ (W0 x_t + s B A x_t)
        (+ bias, which the gain leaves alone)."""
        self.add_deltas((module,), x, (y,), batch, kernel)

    def add_deltas(self, modules: tuple[str, ...], x: torch.Tensor, ys: tuple[torch.Tensor, ...], batch: LoRABatch,
                   kernel: str = "auto") -> None:
        """`add_delta` for modules that read the same x (q, k, v; gate, up): when they are one group of
        the pool, x Aᵀ of all of them is one matmul per segment (one batched matmul when padded), or the
        native kernel's one call; modules that are not one group run the torch layouts."""
        take_native = kernel == "native" or (kernel == "auto" and native.usable(x, ys, self.max_rank))
        if take_native and modules in self.A_group:
            self._native(modules, x, ys, batch)  # the low-rank path and DoRA's gain in one call
            self._add_dense(modules, x, ys, batch)  # never on a DoRA slot's module: the gain's order is kept
            return
        padded = kernel == "padded" or (kernel == "auto" and batch.prefers_padded())
        if len(modules) > 1 and modules in self.A_group:
            (self._fused_padded if padded else self._fused_segments)(modules, x, ys, batch)
        else:
            for module, y in zip(modules, ys):
                if any(self.rank[module][slot] for slot, _, _ in batch.segments):
                    self._add_low_rank(module, x, y, batch, padded)
        self._add_dense(modules, x, ys, batch)
        self._apply_gain(modules, ys, batch, padded)

    def _add_dense(self, modules: tuple[str, ...], x: torch.Tensor, ys: tuple[torch.Tensor, ...],
                   batch: LoRABatch) -> None:
        """The dense updates of the slots that have one (a rank above max_rank), segment by segment."""
        for module, y in zip(modules, ys):
            for slot, start, end in batch.segments:
                if slot in self.dense[module]:
                    y[start:end].addmm_(x[start:end], self.dense[module][slot].T)  # (n, d_in) @ (d_in, d_out)

    def _apply_gain(self, modules: tuple[str, ...], ys: tuple[torch.Tensor, ...], batch: LoRABatch, padded: bool) -> None:
        gained = [any(self.gained[m][slot] for slot, _, _ in batch.segments) for m in modules]
        if not any(gained):
            return
        if padded:  # many short segments: one gather of each token's gain, (T, Σ d_out) for a group
            if modules in self.gain_group:
                per_token = self.gain_group[modules][batch.token_slots].split([y.shape[1] for y in ys], dim=1)
            else:
                per_token = [self.gain[m][batch.token_slots] for m in modules]
        for i, (module, y) in enumerate(zip(modules, ys)):
            if not gained[i]:
                continue
            bias = self.modules[module].bias
            if bias is not None:
                y.sub_(bias)
            if padded:
                y.mul_(per_token[i])
            else:  # long segments: each DoRA segment scaled in place, the others untouched
                for slot, start, end in batch.segments:
                    if self.gained[module][slot]:
                        y[start:end].mul_(self.gain[module][slot])
            if bias is not None:
                y.add_(bias)

    def _fused_segments(self, modules: tuple[str, ...], x: torch.Tensor, ys: tuple[torch.Tensor, ...],
                        batch: LoRABatch) -> None:
        A, n = self.A_group[modules], len(modules)
        for slot, start, end in batch.segments:
            ranks = [self.rank[m][slot] for m in modules]
            r = max(ranks)
            if not r:
                continue
            xa = x[start:end] @ A[slot, :r * n].T  # (T_s, d_in) @ (d_in, r G) -> (T_s, r G), column k G + i
            for i, (module, y, r_i) in enumerate(zip(modules, ys, ranks)):
                if r_i:
                    y[start:end].addmm_(xa[:, i::n][:, :r_i], self.Bt[module][slot, :r_i])  # += (T_s, r_i) @ (r_i, d_out)

    def _fused_padded(self, modules: tuple[str, ...], x: torch.Tensor, ys: tuple[torch.Tensor, ...],
                      batch: LoRABatch) -> None:
        A, n = self.A_group[modules], len(modules)
        for run in batch.runs:
            ranks = [max(map(self.rank[m].__getitem__, run.slots)) for m in modules]  # padding past them is never read
            r = max(ranks)
            if not r:
                continue
            lo, hi = run.first, run.last + 1
            xa = torch.bmm(_scatter(x, run), A[lo:hi, :r * n].transpose(1, 2))  # (S, L, d_in) @ (S, d_in, r G)
            # (G, S, L, r): each module's columns contiguous (bmm on a strided operand was 4x slower)
            xa = xa.view(*xa.shape[:2], r, n).permute(3, 0, 1, 2).contiguous()
            for module, y, r_i, part in zip(modules, ys, ranks, xa):
                if r_i:  # (S, L, r_i) @ (S, r_i, d_out), one row per token
                    y[run.start:run.end] += _gather(torch.bmm(part[:, :, :r_i], self.Bt[module][lo:hi, :r_i]), run)

    def _native(self, modules: tuple[str, ...], x: torch.Tensor, ys: tuple[torch.Tensor, ...],
                batch: LoRABatch) -> None:
        """The group's low-rank path and DoRA's gain through lowrank.c: each segment reads its slot's
        factors straight from the pool's buffers, in prefill and decode alike."""
        if not native.usable(x, ys, self.max_rank):
            why = native.load()[1] or ("it takes contiguous float32 tensors on the CPU and ranks up to "
                                       f"{native.MAX_RANK} (got {x.dtype} on {x.device}, max rank {self.max_rank})")
            raise AdapterError(f"the native low-rank kernel cannot run: {why}; use lora_kernel='auto'")
        pointers = ctypes.c_void_p * len(modules)
        if modules not in self._native_args:  # the pool's own buffers never move: their addresses are kept
            widths = [self.modules[m].out_features for m in modules]
            offsets = [sum(widths[:i]) for i in range(len(modules))]
            gains = self.gain_group[modules]  # (slots, Σ d_out): a module's gain is a column range of it
            self._native_args[modules] = (
                pointers(*(self.Bt[m].data_ptr() for m in modules)), (ctypes.c_int64 * len(modules))(*widths),
                pointers(*(gains.data_ptr() + o * gains.element_size() for o in offsets)), gains.shape[1])
        bt, widths, gains, gain_stride = self._native_args[modules]
        # the biases are the model's own tensors: their addresses are read at each call
        biases = pointers(*(None if self.modules[m].bias is None else self.modules[m].bias.data_ptr() for m in modules))
        native.library().lowrank_group(
            len(batch.segments), batch.table.data_ptr(), x.data_ptr(), x.shape[1], self.A_group[modules].data_ptr(),
            self.max_rank, len(modules), self.rank_table[modules].shape[1], bt,
            pointers(*(y.data_ptr() for y in ys)), widths, self.rank_table[modules].data_ptr(),
            gains, gain_stride, self.gained_table[modules].data_ptr(), biases, torch.get_num_threads())

    def _add_low_rank(self, module: str, x: torch.Tensor, y: torch.Tensor, batch: LoRABatch, padded: bool) -> None:
        rank = self.rank[module]
        A, Bt = self.A[module], self.Bt[module]
        if padded:
            for run in batch.runs:
                r = max(map(rank.__getitem__, run.slots))
                if r:
                    lo, hi = run.first, run.last + 1
                    xa = torch.bmm(_scatter(x, run), A[lo:hi, :r].transpose(1, 2))  # (S, L, d_in) @ (S, d_in, r)
                    y[run.start:run.end] += _gather(torch.bmm(xa, Bt[lo:hi, :r]), run)  # (S, L, r) @ (S, r, d_out)
            return
        for slot, start, end in batch.segments:
            r = rank[slot]
            if r:
                xa = x[start:end] @ A[slot, :r].T  # (n, d_in) @ (d_in, r) -> (n, r)
                y[start:end].addmm_(xa, Bt[slot, :r])  # += (n, r) @ (r, d_out)


def _rank_of(host: HostAdapter) -> int:
    """An adapter's widest rank over its modules (0: none has low-rank factors)."""
    return max((u.a.shape[0] for u in host.values() if u.a is not None), default=0)


def _scatter(x: torch.Tensor, run: PaddedRun) -> torch.Tensor:
    """The run's tokens of x in (slots of the run, longest segment, d_in). The padding rows are left
    unset: a row of a matmul's product depends on that row of its input alone, and _gather never reads
    theirs (zeroing them was 8% of the low-rank path's time in decode)."""
    padded = x.new_empty(run.last + 1 - run.first, run.longest, x.shape[1])  # (S, L, d_in)
    padded.view(-1, x.shape[1]).index_copy_(0, run.rows, x[run.start:run.end])  # _gather's inverse
    return padded


def _gather(padded: torch.Tensor, run: PaddedRun) -> torch.Tensor:
    """Each of the run's tokens' row of a padded (S, L, d) result: (end - start, d). One index_select on
    the flattened rows (twice as fast as indexing with the slot and offset tensors)."""
    return padded.view(-1, padded.shape[-1]).index_select(0, run.rows)
