"""MixLoRA: a mixture of LoRA experts in each frozen FFN, plain LoRA on attention.

MixLoRA: Enhancing Large Language Models Fine-Tuning with LoRA based Mixture of Experts,
Li et al. (arXiv 2404.15159). For a token h (d) of a LLaMA-style block with E experts:

    p = softmax(G h)                          router G (E x d), N(0, 0.02^2), no bias, no jitter
    S = top-k(p),   w_e = p_e / sum_S p       the k chosen experts, weights renormalised to 1
    z_e = act((W_g + s B^g_e A^g_e) h) * ((W_u + s B^u_e A^u_e) h)                 (d_ff)
    y = sum_{e in S} w_e (W_d + s B^d_e A^d_e) z_e
      = W_d (sum_S w_e z_e) + sum_S w_e s B^d_e A^d_e z_e      (sum_S w_e = 1: one W_d per token)

W_g h and W_u h are computed once per token; only the rank-r terms are per expert. With every
B = 0 (init) each expert is the frozen FFN, so y is its output whatever the router says.

Non-gated FFNs (BERT, GPT-2: y = W_d act(W_u h)) get the same mixture without the gate term:
z_e = act((W_u + s B^u_e A^u_e) h), experts on the up and down projections, the router on the FFN
input h. GPT-2's MLP holds c_fc, act and c_proj (Conv1D) in one module, which is wrapped whole.
BERT splits the FFN in two modules: `intermediate` (dense + act) and `output` (dense, dropout,
LayerNorm with the residual). There the `intermediate` is wrapped (router, up experts: it returns
sum_S w_e z_e) and `output.dense` by an `ExpertDown` that adds sum_S w_e s B^d_e A^d_e z_e from
the assignments its partner handed it in the same forward; the LayerNorm and residual run as before.

Load balance, the reference code's Mixtral form (aux_norm="mixtral"): pooled over the real
(non-padding) tokens of every MoE layer of one forward, f[j, e] = share of tokens whose j-th
choice is e, P_e = mean p_e, L_aux = E sum_j sum_e f[j, e] P_e (= k when balanced). "switch"
divides by k (= 1 when balanced). While P is uniform (a fresh router) L_aux = k whatever f is;
its gradient still pushes p away from overloaded experts. The trainer adds aux_loss_coef * L_aux.

Decisions where the spec is open:
- The FFN never sees the attention mask: a forward pre-hook on the base model records it, and
  each MoE layer takes its last T columns (a KV cache puts the past first). Without a usable
  mask (None, or a call outside the model) every token counts.
- `target_modules` chooses the plain-LoRA layers outside the FFNs (q/k/v/o_proj in LLaMA); every
  FFN becomes a mixture with experts on gate (gated FFNs only), up and down. rank/alpha/dropout are shared;
  rank_pattern / alpha_pattern reach expert LoRA through the projection path ("mlp.down_proj").
- L_aux is formed in training mode only; expert loads are counted always (padding excluded).
  The pool restarts when a layer reports twice (a new forward); the first FFN carries aux_loss.
- LoRA dropout acts on each expert's own input rows (an independent mask per expert).
- merge() folds the attention LoRA only: the mixture has no dense equivalent (merges=False).
- The registry's per-layer count (`loraforge methods`) is one projection's expert bank,
  E r (d_in + d_out); the router adds E d per FFN.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.core.config import AdapterConfig
from loraforge.core.errors import AdapterError
from loraforge.core.modules import LINEAR_TYPES, find_targets, linear_weight, replace_module
from loraforge.core.registry import option, read_options, register
from loraforge.methods.base import AdapterLayer, branch_dropout, rank_and_scale
from loraforge.methods.lora import LoRALinear, lora_init_

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class FFNLayout:
    """Where an FFN keeps its parts: attribute names on the wrapped module. `down` None: the down
    projection sits elsewhere (BERT's `output.dense`). `dropout`: applied after the down projection
    inside the module (GPT-2's MLP)."""

    up: str
    act: str
    gate: str | None = None
    down: str | None = None
    dropout: str | None = None


GATED = FFNLayout(up="up_proj", act="act_fn", gate="gate_proj", down="down_proj")
GPT2 = FFNLayout(up="c_fc", act="act", down="c_proj", dropout="dropout")
BERT = FFNLayout(up="dense", act="intermediate_act_fn")


@dataclasses.dataclass(frozen=True)
class MixLoRAOptions:
    """`AdapterConfig.options` of a MixLoRA adapter (defaults: the reference code's)."""

    num_experts: int = option(8, "LoRA experts E per FFN", check=lambda e: e >= 1, want="a positive integer")
    top_k: int = option(2, "experts k each token goes through, at most num_experts", check=lambda k: k >= 1,
                        want="a positive integer")
    aux_loss_coef: float = option(0.01, "weight of the load-balance loss in the training loss",
                                  check=lambda c: c >= 0, want="a number >= 0")
    router_init_std: float = option(0.02, "std of the router's normal init", check=lambda s: s > 0, want="a number > 0")
    aux_norm: Literal["mixtral", "switch"] = option("mixtral", "load-balance loss normalisation: mixtral (= k when "
                                                               "balanced) or switch (= 1 when balanced)")

    def __post_init__(self) -> None:
        if self.top_k > self.num_experts:
            raise ValueError(f"option 'top_k' must be an integer in [1, num_experts = {self.num_experts}], got {self.top_k}")


class ExpertLoRA(nn.Module):
    """E independent LoRA pairs for one frozen projection W (d_out x d_in): expert e adds s B_e A_e x."""

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, name: str):
        super().__init__()
        experts = read_options(MixLoRAOptions, config).num_experts
        d_out, d_in = linear_weight(base_layer).shape
        self.rank, self.scaling = rank_and_scale(config, name)
        self.dropout = branch_dropout(config.dropout)
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(experts, self.rank, d_in, device=device))  # (E, r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(experts, d_out, self.rank, device=device))  # (E, d_out, r)
        self._init_tensors(config.init)

    @torch.no_grad()
    def _init_tensors(self, init: str) -> None:
        if self.lora_A.is_meta:
            return
        for e in range(self.lora_A.shape[0]):  # expert by expert, so fan-in is d_in (r for B), as LoRALinear's
            lora_init_(self.lora_A[e], self.lora_B[e], init)
            if init == "random":  # tests only: experts that differ from the frozen FFN at step 0
                nn.init.kaiming_uniform_(self.lora_B[e], a=math.sqrt(5))

    def extra_repr(self) -> str:
        experts, d_out, rank = self.lora_B.shape
        return f"experts={experts}, rank={rank}, in={self.lora_A.shape[2]}, out={d_out}"

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        x = self.dropout(x.to(self.lora_A.dtype))  # (n, d_in)
        return F.linear(F.linear(x, self.lora_A[expert]), self.lora_B[expert]) * self.scaling  # (n, d_out)

    def grouped(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Rows sorted by expert, counts[e] of them for expert e, each through its expert's LoRA."""
        return torch.cat([self(rows, e) for e, rows in enumerate(x.split(counts))])  # (sum counts, d_out)


class LoadBalance:
    """Router statistics of one forward, pooled over every MoE layer of a model (the reference
    concatenates all layers' router logits before one loss), padding left out."""

    def __init__(self, options: MixLoRAOptions, owner: nn.Module):
        self.options = options
        self.owner = weakref.ref(owner)  # the one module whose aux_loss the trainer reads
        self.mask: torch.Tensor | None = None  # (B, T) attention mask of the running forward
        self._restart()

    def _restart(self) -> None:
        self.seen: set[int] = set()  # ids of the layers that reported in this forward
        self.tokens, self.prob_sum, self.choice_sum = 0, 0.0, 0.0

    def mask_hook(self):
        """Forward pre-hook for the base model: records the attention mask. It holds the pool
        weakly, so after detach() it neither keeps the old adapter alive nor does anything."""
        pool = weakref.ref(self)

        def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if (balance := pool()) is not None:
                balance.mask = kwargs.get("attention_mask")

        return capture

    def real_tokens(self, lead_shape: torch.Size) -> torch.Tensor | None:
        """(B·T,) bool, True for a non-padding token; None when the mask does not fit (all count)."""
        m = self.mask
        if m is None or m.dim() != 2 or len(lead_shape) != 2 or m.shape[0] != lead_shape[0] or m.shape[1] < lead_shape[1]:
            return None
        return m[:, m.shape[1] - lead_shape[1]:].reshape(-1).bool()

    def add(self, layer: nn.Module, probs: torch.Tensor, chosen: torch.Tensor) -> None:
        """probs (n, E), chosen (n, k) of one layer's real tokens; sets the pooled loss so far."""
        if id(layer) in self.seen:  # a layer reports twice: a new forward has begun
            self._restart()
        self.seen.add(id(layer))
        experts, k = probs.shape[1], chosen.shape[1]
        self.tokens += probs.shape[0]
        self.prob_sum = self.prob_sum + probs.sum(0)  # (E,)
        self.choice_sum = self.choice_sum + F.one_hot(chosen, experts).sum(0)  # (k, E)
        owner = self.owner()
        if self.tokens == 0 or owner is None:
            return
        f, p = self.choice_sum / self.tokens, self.prob_sum / self.tokens  # (k, E), (E,)
        loss = experts * (f * p).sum() / (k if self.options.aux_norm == "switch" else 1)
        owner.aux_loss = self.options.aux_loss_coef * loss


class MixLoRAFFN(AdapterLayer):
    """A frozen FFN (`base_layer`, parts as `layout` says) turned into E LoRA experts behind a top-k router."""

    def __init__(self, mlp: nn.Module, config: AdapterConfig, name: str, balance: LoadBalance | None = None,
                 layout: FFNLayout = GATED, down: "ExpertDown | None" = None):
        # An AdapterLayer by protocol (base_layer, merged / disabled: detach, adapter_disabled and
        # saving work unchanged), but its base is a whole FFN, so the Linear-only __init__ is skipped.
        nn.Module.__init__(self)
        options = read_options(MixLoRAOptions, config)
        self.base_layer, self.merged, self.disabled, self.fan_in_fan_out = mlp, False, False, False
        self.layout = layout
        up = getattr(mlp, layout.up)
        self.in_features = self.out_features = linear_weight(up).shape[1]
        self.num_experts, self.top_k = options.num_experts, options.top_k
        device = up.weight.device
        self.router = nn.Linear(self.in_features, self.num_experts, bias=False, device=device)  # G (E, d)
        with torch.no_grad():
            self.router.weight.normal_(0.0, options.router_init_std)
        parts = [p for p in (layout.gate, layout.up, layout.down) if p is not None]
        self.experts = nn.ModuleDict({p: ExpertLoRA(getattr(mlp, p), config, f"{name}.{p}") for p in parts})
        self.down = None if down is None else weakref.ref(down)  # a sibling module: held weakly, saved there
        self.register_buffer("tokens_per_expert", torch.zeros(self.num_experts, dtype=torch.long, device=device),
                             persistent=False)
        self.balance = balance or LoadBalance(options, self)
        self.aux_loss: torch.Tensor | None = None

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Full softmax (N, E), renormalised weights of the chosen experts (N, k), their ids (N, k)."""
        probs = self.router(h.to(self.router.weight.dtype)).float().softmax(-1)  # (N, E)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k)
        return probs, weights / weights.sum(-1, keepdim=True), chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mlp, layout = self.base_layer, self.layout
        if self.disabled:
            return mlp(x)
        h = x.reshape(-1, x.shape[-1])  # (N, d)
        probs, weights, chosen = self.route(h)
        self._account(probs, chosen, x.shape[:-1])
        order = chosen.flatten().argsort(stable=True)  # (N k) assignments, grouped by expert
        token, w = order // self.top_k, weights.flatten()[order, None]  # (N k,), (N k, 1)
        counts = torch.bincount(chosen.flatten(), minlength=self.num_experts).tolist()
        h_s = h.index_select(0, token)  # (N k, d): each token once per chosen expert
        # The frozen W_u h (and W_g h) once per token (N, d_ff), copied to its k assignments.
        up = getattr(mlp, layout.up)(h).index_select(0, token) + self.experts[layout.up].grouped(h_s, counts)
        act = getattr(mlp, layout.act)
        if layout.gate is None:
            z = act(up)  # (N k, d_ff)
        else:
            gate = getattr(mlp, layout.gate)(h).index_select(0, token) + self.experts[layout.gate].grouped(h_s, counts)
            z = act(gate) * up  # (N k, d_ff): z_e of every assignment
        mixed = z.new_zeros(h.shape[0], z.shape[1]).index_add_(0, token, w.to(z.dtype) * z)  # (N, d_ff)
        if layout.down is None:  # the down projection is a sibling's (BERT): it adds the expert terms
            self.down().pending = (z, token, w, counts)
            return mixed.reshape(*x.shape[:-1], -1)
        delta = w * self.experts[layout.down].grouped(z, counts)  # (N k, d)
        out = getattr(mlp, layout.down)(mixed)  # (N, d)
        out = out.index_add(0, token, delta.to(out.dtype)).reshape(x.shape)
        return getattr(mlp, layout.dropout)(out) if layout.dropout else out

    def _account(self, probs: torch.Tensor, chosen: torch.Tensor, lead_shape: torch.Size) -> None:
        real = self.balance.real_tokens(lead_shape)
        if real is not None:
            probs, chosen = probs[real], chosen[real]
        self.tokens_per_expert += torch.bincount(chosen.flatten(), minlength=self.num_experts)
        if self.training:
            self.balance.add(self, probs, chosen)

    def merge(self) -> None:
        """Nothing to fold: routing depends on the input, so no dense FFN equals the mixture."""

    def extra_repr(self) -> str:
        return f"d={self.in_features}, experts={self.num_experts}, top_k={self.top_k}"


class ExpertDown(AdapterLayer):
    """The down projection of a split FFN (BERT's `output.dense`): W_d m + sum_S w_e s B^d_e A^d_e z_e,
    with m = sum_S w_e z_e its input and (z, assignments) what the FFN's MixLoRAFFN handed over."""

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, name: str):
        super().__init__(base_layer, config, name)
        self.experts = ExpertLoRA(base_layer, config, name)
        self.pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        pending, self.pending = self.pending, None  # one hand-over per forward of the FFN
        if pending is None or self.disabled:
            return out
        z, token, w, counts = pending
        delta = w * self.experts.grouped(z, counts)  # (N k, d)
        return out.reshape(-1, out.shape[-1]).index_add(0, token, delta.to(out.dtype)).reshape(out.shape)

    def merge(self) -> None:
        """Nothing to fold: the expert terms depend on the routing (see MixLoRAFFN.merge)."""


def find_ffns(model: nn.Module) -> dict[str, tuple[FFNLayout, str | None]]:
    """Every FFN MixLoRA can turn into a mixture: path -> (its layout, the path of a down
    projection held by a sibling module, or None). LLaMA-style gated FFNs, GPT-2's MLP
    (c_fc, act, c_proj) and BERT's intermediate + output.dense."""
    found: dict[str, tuple[FFNLayout, str | None]] = {}
    for name, m in model.named_modules():
        if all(isinstance(getattr(m, p, None), nn.Linear) for p in PROJECTIONS) and callable(getattr(m, "act_fn", None)):
            found[name] = (GATED, None)
        elif (all(isinstance(getattr(m, p, None), LINEAR_TYPES) for p in ("c_fc", "c_proj"))
              and callable(getattr(m, "act", None))):
            found[name] = (GPT2, None)
        elif isinstance(getattr(m, "dense", None), nn.Linear) and callable(getattr(m, "intermediate_act_fn", None)):
            parent = name.rpartition(".")[0]
            down = f"{parent}.output.dense" if parent else "output.dense"
            try:
                sibling = model.get_submodule(down)
            except AttributeError:
                continue
            if isinstance(sibling, nn.Linear):
                found[name] = (BERT, down)
    return found


def attach_mixlora(model: nn.Module, config: AdapterConfig) -> list[str]:
    """The registry's attach hook: plain LoRA outside the FFNs, a MixLoRAFFN in place of each FFN
    (and an ExpertDown on the down projection of a split one)."""
    ffns = find_ffns(model)
    if not ffns:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise AdapterError(f"mixlora needs FFNs it knows: LLaMA-style gated (gate_proj, up_proj, down_proj and "
                           f"act_fn), GPT-2's MLP (c_fc, act, c_proj) or BERT's intermediate.dense + output.dense; "
                           f"{type(model).__name__} (model_type {model_type!r}) has none")
    downs = [down for _, down in ffns.values() if down is not None]
    plain = _plain_lora_targets(model, config, list(ffns) + downs)
    for name in plain:
        replace_module(model, name, LoRALinear(model.get_submodule(name), config, name))
    balance = None
    for name, (layout, down_path) in ffns.items():
        down = None
        if down_path is not None:
            down = ExpertDown(model.get_submodule(down_path), config, down_path)
            replace_module(model, down_path, down)
        block = MixLoRAFFN(model.get_submodule(name), config, name, balance, layout, down)
        balance = block.balance  # one pool for the model; the first FFN carries aux_loss
        replace_module(model, name, block)
    getattr(model, "base_model", model).register_forward_pre_hook(balance.mask_hook(), with_kwargs=True)
    return plain + list(ffns) + downs


def expert_load(model: nn.Module, reset: bool = False) -> dict[str, torch.Tensor]:
    """Tokens routed to each expert (E,), per MoE FFN path, since attach or the last reset."""
    loads = {}
    for name, module in model.named_modules():
        if isinstance(module, MixLoRAFFN):
            loads[name] = module.tokens_per_expert.clone()
            if reset:
                module.tokens_per_expert.zero_()
    return loads


def _plain_lora_targets(model: nn.Module, config: AdapterConfig, ffns: list[str]) -> list[str]:
    spec = config.target_modules
    if isinstance(spec, list):  # names of FFNs go (a reloaded adapter lists the FFNs it replaced)
        spec = [t for t in spec if not any(f == t or f.endswith("." + t) for f in ffns)]
        if not spec:
            return []
    targets = find_targets(model, dataclasses.replace(config, target_modules=spec))
    return [t for t in targets if not any(t.startswith(f + ".") for f in ffns)]


register("mixlora", axis="mixture", merges=False, peft_type=None, attach=attach_mixlora, options=MixLoRAOptions,
         paper="MixLoRA: Enhancing Large Language Models Fine-Tuning with LoRA based Mixture of Experts (arXiv 2404.15159)",
         )(ExpertLoRA)
