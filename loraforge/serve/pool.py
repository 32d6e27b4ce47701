"""The adapter pool: every adapter of a folder known by name, the hot ones in compute slots.

    host store   name -> {module: (A (r, d_in), B (d_out, r), s)}     read and checked once, kept
    compute      per module: A (N+1, r_max, d_in), B (N+1, d_out, r_max), rank (N+1,), s (N+1,)
                 slot 0 is "no adapter" (all zeros); slots 1..N hold at most `max_loaded` adapters

An adapter enters a slot when a request that names it is admitted (a miss), or earlier, into an empty
slot, while its request waits in the queue (prefetch); it leaves only when no running request holds
it and its slot is the least recently used one that is needed (LRU). Ranks
differ between adapters: a slot is zero-padded to `max_rank`, which is exact (zero rows add
nothing), and the segment kernel slices each adapter back to its own rank so padding costs nothing.

The low-rank path for a batch of tokens X (T, d_in) whose token t uses slot a(t) (S-LoRA eq.):
    Y_t += s_a(t) · (X_t A_a(t)ᵀ) B_a(t)ᵀ
computed either per segment of consecutive tokens that share an adapter (SGMV-like: each adapter
read once per step), or gathered per token with one batched matmul (BGMV-like: decode with about
one token per adapter). A Triton kernel for GPUs is not written yet: on CUDA both paths run as here.
"""

from __future__ import annotations

import math
import re
import threading
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from ..config import CONFIG_NAME
from ..errors import AdapterError
from ..io import read_adapter

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
HostAdapter = dict[str, tuple[torch.Tensor, torch.Tensor, float]]


class UnknownAdapterError(AdapterError):
    """A request names an adapter the pool does not know (HTTP 404)."""


class AdapterBusyError(AdapterError):
    """An adapter cannot be unloaded while requests use it (HTTP 409)."""


class AdapterPool:
    def __init__(self, modules: dict[str, nn.Linear], adapters_dir: str | Path | None = None, max_loaded: int = 8,
                 max_rank: int = 16, base_name: str = "the base model"):
        if max_loaded < 1:
            raise AdapterError(f"max_loaded must be at least 1, got {max_loaded}")
        self.modules, self.max_loaded, self.max_rank, self.base_name = modules, max_loaded, max_rank, base_name
        self.adapters_dir = Path(adapters_dir).resolve() if adapters_dir is not None else None
        self.known: dict[str, Path] = {}
        self.host: dict[str, HostAdapter] = {}
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self.refs: dict[str, int] = {}
        self.hits = self.misses = self.evictions = 0
        self._lock = threading.RLock()
        w = next(iter(modules.values())).weight
        slots = max_loaded + 1
        self.A = {n: w.new_zeros(slots, max_rank, m.in_features) for n, m in modules.items()}
        self.B = {n: w.new_zeros(slots, m.out_features, max_rank) for n, m in modules.items()}
        self.rank = {n: [0] * slots for n in modules}
        self.scale = {n: w.new_zeros(slots) for n in modules}
        if self.adapters_dir is not None:
            if not self.adapters_dir.is_dir():
                raise AdapterError(f"adapters folder {adapters_dir} does not exist")
            for sub in sorted(self.adapters_dir.iterdir()):
                if (sub / CONFIG_NAME).is_file() and NAME_RE.fullmatch(sub.name):
                    self.known[sub.name] = sub

    # ---- names and the host store ---------------------------------------------------------------
    def register(self, name: str, path: str | Path) -> None:
        """Make adapter `name` servable from `path` (inside the adapters folder), checked now."""
        if not NAME_RE.fullmatch(name or ""):
            raise AdapterError(f"bad adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
        if self.adapters_dir is None:
            raise AdapterError("no adapters folder was given: adapters cannot be loaded")
        resolved = (self.adapters_dir / path).resolve()
        if not resolved.is_relative_to(self.adapters_dir):
            raise AdapterError(f"adapter path {str(path)!r} is outside the adapters folder")
        host = self._read(name, resolved)
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
        if config.method != "lora":
            raise AdapterError(f"adapter {name!r} is a {config.method!r} adapter: only plain LoRA adapters can be served "
                               "(merge it into a base model with `loraforge merge` instead)")
        if config.modules_to_save:
            raise AdapterError(f"adapter {name!r} trains whole modules ({config.modules_to_save}): not servable as LoRA")
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
            host[module] = (ab["A"], ab["B"], alpha / (math.sqrt(rank) if config.use_rslora else rank))
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
                slot = self._free_slot()
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
            slot = self._free_slot(evict=False)
            if slot is not None:
                self.misses += 1
                self._fill(slot, self.host[name])
                self.slot_of[name] = slot

    def release(self, name: str | None) -> None:
        if name is not None:
            with self._lock:
                self.refs[name] -= 1

    def _free_slot(self, evict: bool = True) -> int | None:
        used = set(self.slot_of.values())
        free = [s for s in range(1, self.max_loaded + 1) if s not in used]
        if free or not evict:
            return free[0] if free else None
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
            self.A[module][slot].zero_()
            self.B[module][slot].zero_()
            a, b, s = host.get(module, (None, None, 0.0))
            r = 0 if a is None else a.shape[0]
            if r:
                self.A[module][slot, :r] = a
                self.B[module][slot, :, :r] = b
            self.rank[module][slot], self.scale[module][slot] = r, s

    # ---- the low-rank path ----------------------------------------------------------------------
    def delta(self, module: str, x: torch.Tensor, token_slots: torch.Tensor,
              segments: list[tuple[int, int, int]], kernel: str = "auto") -> torch.Tensor | None:
        """Σ over tokens of s·(x Aᵀ) Bᵀ for each token's own adapter. x: (T, d_in) -> (T, d_out), or
        None when no token has an adapter. segments: (slot, start, end) runs of tokens by slot."""
        segments = [seg for seg in segments if seg[0] and self.rank[module][seg[0]]]
        if not segments:
            return None
        A, B, scale = self.A[module], self.B[module], self.scale[module]
        # Gathering copies each token's adapter: as cheap as the segment loop only when segments are
        # about one token long (decode over many adapters), where it saves 2 matmul calls per segment.
        if kernel == "gather" or (kernel == "auto" and x.shape[0] < 2 * len(segments)):
            xa = torch.bmm(A[token_slots], x.unsqueeze(2))  # (T, r_max, d_in) @ (T, d_in, 1) -> (T, r_max, 1)
            y = torch.bmm(B[token_slots], xa).squeeze(2)  # (T, d_out, r_max) @ (T, r_max, 1) -> (T, d_out)
            return y * scale[token_slots].unsqueeze(1)
        y = x.new_zeros(x.shape[0], B.shape[1])  # (T, d_out)
        for slot, start, end in segments:
            r = self.rank[module][slot]
            xa = x[start:end] @ A[slot, :r].T  # (n, d_in) @ (d_in, r) -> (n, r)
            y[start:end] = (xa @ B[slot, :, :r].T) * scale[slot]  # (n, r) @ (r, d_out) -> (n, d_out)
        return y
