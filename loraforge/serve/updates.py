"""Every method's adapter in the forms the adapter pool computes in a mixed batch.

    factors  y_t += (x_t Aᵀ) (s B)ᵀ            LoRA; any method whose update has rank k <= max_rank
    gain     y_t  = g ⊙ (x_t W0ᵀ + s (x_t Aᵀ) Bᵀ) DoRA (arXiv 2402.09353, eq. 5): g = m / ||W0 + s B A||_row,
                                               the per-output magnitude applied after the LoRA path
    dense    y_t += x_t dWᵀ                    an update of higher rank (RandLoRA, Bone-Bat), kept whole per adapter
    block    y_t  = block(x_t)                 a method that replaces a whole block the engine runs as one
                                               (MixLoRA's FFN: router and experts), on its own tokens only
    rows     E[v] or H[v] = the adapter's row  modules_to_save of the input embedding or the output head
                                               (tied: both), kept as just the rows the adapter changed
A whole Linear in modules_to_save is the update W' - W0 of that layer, factors or dense as above.

Plain LoRA adapters are read straight from their tensors (AdapterPool._read). Any other method is
rebuilt by its own code: its layers are attached to a shell module that shares the base's Linear
modules (the served model itself is never touched), the saved state is loaded, and each layer gives
its update (a whole block is kept as it is). A low-rank update becomes factors through its
truncated SVD at its numerical rank k (dW = U S Vᵀ, A = S^½ Vᵀ[:k], B = U[:, :k] S^½: exact to
rounding, whatever the method's own structure: LoRA-XS's B R A, LoLDU's L diag(z) U, Block-LoRA's
shared blocks, Comp-LoRA, Bone).
DoRA keeps its direction's factors and adds g; n is taken as its layer takes it in inference.
Full fine-tuning, which retrains the base itself, is refused.

`serving_path(method)` says which form a method's adapters take in general (`loraforge methods
--json`: serves native | dense | no): a probe layer with random state shows whether its update's
rank stays within its rank.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from loraforge.adapters.convert import truncated_lora
from loraforge.adapters.inject import adapter_state_dict, attach, detach
from loraforge.adapters.io import load_adapter
from loraforge.core.config import AdapterConfig
from loraforge.core.errors import AdapterError
from loraforge.core.registry import Method, get_method
from loraforge.methods.base import adapter_layers
from loraforge.methods.dora import DoRALinear


@dataclass
class HostUpdate:
    """One module's update for one adapter, as the pool applies it."""

    a: torch.Tensor | None = None  # (k, d_in)
    b: torch.Tensor | None = None  # (d_out, k), the scale folded in
    gain: torch.Tensor | None = None  # (d_out,): DoRA's m / n, multiplied in after the LoRA path
    dense: torch.Tensor | None = None  # (d_out, d_in): an update whose rank exceeds max_rank
    block: nn.Module | None = None  # the adapter's own module in place of a whole block (an FFN), loaded
    rows: tuple[torch.Tensor, torch.Tensor] | None = None  # (ids (k,), rows (k, H)) of an embedding or head


PROBE_RANK = 4


@functools.lru_cache(maxsize=None)
def serving_path(name: str) -> str:
    """'native' (factors, DoRA's factors and gain, or a whole block), 'dense' (a dW per adapter) or 'no'."""
    method = get_method(name)
    if method.trains_base:
        return "no"
    if not method.merges:  # an input-dependent update: native where it replaces whole blocks (its own attach)
        return "native" if method.attach is not None else "no"
    if method.layer is not None and issubclass(method.layer, DoRALinear):
        return "native"
    return "native" if _probe_rank(method) <= PROBE_RANK else "dense"


def _probe_rank(method: Method) -> int:
    """The largest rank of the update of a 40 x 48 layer of rank 4 whose saved state is random."""
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # the caller's RNG stream is left as it was
        torch.manual_seed(0)
        model = attach(nn.Sequential(nn.Linear(48, 40, bias=False)), AdapterConfig(method=method.name, rank=PROBE_RANK))
        for tensor in adapter_state_dict(model).values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
        return max(int(torch.linalg.matrix_rank(layer.delta_weight())) for layer in adapter_layers(model).values())


@torch.no_grad()
def read_updates(modules: dict[str, nn.Linear], blocks: dict[str, nn.Module], tables: dict[str, nn.Module], path: Path,
                 config: AdapterConfig, max_rank: int, label: str) -> dict[str, HostUpdate]:
    """{module path: HostUpdate} of the adapter saved at `path` (a method other than plain LoRA);
    `blocks` are the paths the engine runs as one module (FFNs), which a method may replace whole;
    modules_to_save (read by `read_whole_modules`) load into copies here."""
    if serving_path(config.method) == "no":
        raise AdapterError(f"{label} is a {config.method!r} adapter, which retrains the base itself rather than "
                           "adding an update: it cannot be served beside others (serve its merged model instead)")
    whole = modules | tables
    shell = _shell(modules, blocks, {name: whole[name] for name in config.modules_to_save or [] if name in whole})
    load_adapter(shell, path)
    try:
        updates = {}
        for name, layer in adapter_layers(shell).items():
            if name in blocks:
                updates[name] = HostUpdate(block=layer.eval())  # detach() below leaves the block whole
                continue
            if name not in modules:
                raise AdapterError(f"{label}: {config.method} replaces {name!r}, which the engine does not run as one module")
            dtype = modules[name].weight.dtype
            if isinstance(layer, DoRALinear):
                if layer.rank > max_rank:
                    raise AdapterError(f"{label}: module {name!r} has rank {layer.rank} > max rank {max_rank}")
                gain = layer.lora_magnitude_vector / layer._row_norm()  # (d_out,): the layer's own inference n
                updates[name] = HostUpdate(layer.lora_A.weight.to(dtype), (layer.lora_B.weight * layer.scaling).to(dtype),
                                           gain=gain.to(dtype))
            else:
                updates[name] = _factors_or_dense(layer.delta_weight().float(), max_rank, dtype)
        return updates
    finally:
        detach(shell)


def _factors_or_dense(delta: torch.Tensor, max_rank: int, dtype: torch.dtype) -> HostUpdate:
    lora_a, lora_b, rank, _ = truncated_lora(delta, max_rank)  # (R, d_in), (d_out, R), rank(dW)
    if rank > max_rank:
        return HostUpdate(dense=delta.to(dtype))
    return HostUpdate(lora_a[:rank].to(dtype), lora_b[:, :rank].to(dtype))


@torch.no_grad()
def read_whole_modules(config: AdapterConfig, state: dict[str, torch.Tensor], modules: dict[str, nn.Linear],
                       tables: dict[str, nn.Module], max_rank: int, label: str) -> dict[str, HostUpdate]:
    """{path: HostUpdate} of the adapter's modules_to_save: the rows it changed of the embedding or
    output head (`tables`; with tied weights, of both), or a Linear's W' - W0. Anything else is refused."""
    updates = {}
    tied = len({id(t.weight) for t in tables.values()}) < len(tables)
    for name in config.modules_to_save or []:
        keys = {k.removeprefix(name + "."): t for k, t in state.items() if k.startswith(name + ".")}
        if name in tables:
            base = tables[name].weight
            saved = keys.get("weight")
            if set(keys) != {"weight"} or saved is None or saved.shape[1:] != base.shape[1:]:
                raise AdapterError(f"{label}: modules_to_save {name!r} holds {sorted(keys)}, not one weight of the base's width")
            if saved.shape[0] != base.shape[0]:
                raise AdapterError(f"{label}: {name!r} has {saved.shape[0]} rows, the base {base.shape[0]}: added tokens "
                                   "need the tokenizer they were trained with, which the served base does not have")
            rows = (saved.to(base.device) != base).any(1).nonzero().flatten()  # (k,) the rows the adapter trained
            update = HostUpdate(rows=(rows.cpu(), saved[rows.cpu()].to(base.dtype)))
            for path in (tables if tied else [name]):
                updates[path] = update
        elif name in modules:
            if set(keys) != {"weight"} or keys["weight"].shape != modules[name].weight.shape:
                raise AdapterError(f"{label}: modules_to_save {name!r} holds {sorted(keys)}; a Linear's weight alone "
                                   "(of the base's shape) is served")
            weight = modules[name].weight
            updates[name] = _factors_or_dense(keys["weight"].to(weight.device).float() - weight.float(), max_rank,
                                              weight.dtype)
        else:
            raise AdapterError(f"{label}: modules_to_save {name!r} is neither the embedding, the output head nor a "
                               "projection the engine adapts: not servable beside other adapters")
    return updates


def _shell(modules: dict[str, nn.Linear], blocks: dict[str, nn.Module], copied: dict[str, nn.Module]) -> nn.Module:
    """A module tree holding the base's Linear modules at their paths, its blocks' activation
    (`act_fn`, what makes an FFN an FFN to MixLoRA), copies of `copied` (modules_to_save, which
    loading writes to) and nothing else: attaching to it changes only the shell, never the served model."""
    root = nn.Module()

    def container(path: str) -> nn.Module:
        parent = root
        for part in path.split(".") if path else []:
            if part not in parent._modules:
                parent.add_module(part, nn.Module())
            parent = parent._modules[part]
        return parent

    for path, module in (modules | {p: copy.deepcopy(m) for p, m in copied.items()}).items():
        parent_path, _, leaf = path.rpartition(".")
        container(parent_path).add_module(leaf, module)
    for path, block in blocks.items():
        if hasattr(block, "act_fn"):
            container(path).act_fn = block.act_fn
    return root
