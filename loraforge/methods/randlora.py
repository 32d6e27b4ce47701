"""RandLoRA: a full-rank update from fixed random bases, of which only diagonal scalings train.

RandLoRA: Full-rank parameter-efficient fine-tuning of large models, Albert et al.
(arXiv 2502.00987). With D = max(d_out, d_in), m = min(d_out, d_in), n = ceil(m / r):

    dW = s sum_{i=1..n} B_i diag(lambda_{:, i}) A diag(gamma_{i, :})      (D x m; transposed when d_in > d_out)

A (r x m) and B_i (D x r) frozen and random, lambda (r x n) and gamma (n x m) trainable, s = alpha / r.
n r >= m, so dW can reach full rank. The forward applies it as two matmuls, never forming dW:

    A_hat = (lambda ⊗ A ⊙ gamma) flattened (r n x m),   B_flat = [B_1 ... B_n] (D x n r)
    h = W0 x + b + s B_flat (A_hat x')       (d_in <= d_out; else s A_hat^T (B_flat^T x'))

Bases, as PEFT draws them (so one projection_prng_key gives PEFT's bases): a CPU generator seeded
with the key draws A (r x m_max) then n_max tensors B_i (D_max x r), Kaiming-uniform (a = sqrt 5) in
bfloat16, each tensor then divided by its std; "sparse" draws entries in {-1, 0, +1} with
P(+-1) = 1 / (2 sp) each (sp = 3; sqrt(m_max) for "very_sparse"), divided by std. They are drawn
once for the largest (d_out, d_in) over the targets and every layer takes the leading slice of one
shared `RandomBases` module (hence the attach hook). PEFT's hidden index pairs row (k, i) of A_hat
with column k n + i of the flattened B, i.e. basis B_i holds columns i, i + n, ... of that tensor:
the paper's sum, with the random numbers assigned to bases in PEFT's order.

Decisions: gamma starts at 1 / max(n, m), PEFT's `init_weights=True` value (the spec's 1 / D is
PEFT's pre-reset value, used here by init="random", which also draws lambda ~ N(0, 1): tests
only); lambda = 0, so the output equals the base exactly at step 0. The bases are never saved:
they are rebuilt from the key on load (PEFT's save_projection=False), which the CPU generator
makes exact; the saved folder is a PEFT RANDLORA adapter (PEFT's parameter names and config keys). One rank for all layers (rank_pattern is refused: the bases are shared); no rsLoRA.

Options (`RandLoRAOptions`, PEFT's names): projection_prng_key (int >= 0, default 0), sparse (bool,
default False), very_sparse (bool, default False). PEFT's defaults are r = 32, alpha = 640 (alpha
about 20 r).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loraforge.core.config import AdapterConfig
from loraforge.core.errors import AdapterError
from loraforge.core.modules import find_targets, linear_weight, replace_module
from loraforge.core.registry import option, read_options, register
from loraforge.methods.base import AdapterLayer, branch_dropout, rank_and_scale, wide


@dataclass(frozen=True)
class RandLoRAOptions:
    projection_prng_key: int = option(0, "seed of the CPU generator that draws the shared random bases",
                                      check=lambda key: key >= 0, want="an integer >= 0")
    sparse: bool = option(False, "ternary bases: entries in {-1, 0, +1}, P(+-1) = 1/6 each")
    very_sparse: bool = option(False, "ternary bases with P(+-1) = 1 / (2 sqrt(m)) each")

    def __post_init__(self) -> None:
        if self.sparse and self.very_sparse:
            raise ValueError("set at most one of the options 'sparse' and 'very_sparse'")


class RandomBases(nn.Module):
    """A (r, m_max) and B (D_max, n_max, r), frozen, shared by every layer of one adapter."""

    def __init__(self, config: AdapterConfig, max_out: int, max_in: int, device: torch.device):
        super().__init__()
        opts = _options(config)
        r, big, small = config.rank, max(max_out, max_in), min(max_out, max_in)
        n = math.ceil(small / r)
        a, b = torch.empty(r, small, device=device), torch.empty(big, n, r, device=device)
        if a.device.type != "meta":
            gen = torch.Generator("cpu").manual_seed(opts.projection_prng_key)
            if opts.sparse or opts.very_sparse:
                sp = math.sqrt(small) if opts.very_sparse else 3
                a_draw = _ternary(torch.rand(r, small, generator=gen), sp)
                b_draw = _ternary(torch.rand(big, n, r, generator=gen), sp)
            else:
                a_draw = _kaiming((r, 1, small), gen)[:, 0]
                b_draw = torch.cat([_kaiming((big, 1, r), gen) for _ in range(n)], dim=1)
            a.copy_(a_draw / a_draw.std())
            b.copy_(b_draw / b_draw.std())
        self.register_buffer("A", a, persistent=False)
        self.register_buffer("B", b, persistent=False)


def _kaiming(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    return nn.init.kaiming_uniform_(torch.empty(shape, dtype=torch.bfloat16), a=math.sqrt(5), generator=gen)


def _ternary(u: torch.Tensor, sp: float) -> torch.Tensor:
    return (u > 1 - 1 / (2 * sp)).float() - (u < 1 / (2 * sp)).float()


def _options(config: AdapterConfig) -> RandLoRAOptions:
    if config.use_rslora or config.init == "gaussian":
        raise AdapterError("randlora shares one set of bases across layers: no use_rslora, and init must be 'default' "
                           "or 'random'")
    return read_options(RandLoRAOptions, config)


def attach_randlora(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Wrap every target around one `RandomBases` drawn for the largest target shape."""
    targets = find_targets(model, config)
    modules = {name: model.get_submodule(name) for name in targets}
    shapes = [linear_weight(m).shape for m in modules.values()]
    device = next(iter(modules.values())).weight.device
    bases = RandomBases(config, max(s[0] for s in shapes), max(s[1] for s in shapes), device)
    for name, module in modules.items():
        replace_module(model, name, RandLoRALinear(module, config, name, bases))
    return targets


def peft_fields(config: AdapterConfig) -> dict[str, Any]:
    """What PEFT's RandLoraConfig reads: its names for alpha and dropout, and the options (PEFT's names
    already). save_projection False: PEFT rebuilds the bases from the key, as loraforge does."""
    return {"randlora_alpha": config.alpha, "randlora_dropout": config.dropout, "save_projection": False,
            **dataclasses.asdict(_options(config))}


@register(
    "randlora",
    axis="rank",
    paper="RandLoRA: Full-rank parameter-efficient fine-tuning of large models (arXiv 2502.00987)",
    peft_type="RANDLORA",
    attach=attach_randlora,
    options=RandLoRAOptions,
    uniform_rank=True,
    peft_config=peft_fields,
)
class RandLoRALinear(AdapterLayer):
    def __init__(self, base_layer: nn.Module, config: AdapterConfig, name: str, bases: RandomBases | None = None):
        super().__init__(base_layer, config, name)
        _options(config)
        r, self.scaling = rank_and_scale(config, name)  # config.rank (uniform_rank) and alpha / r (`_options`)
        self.big, self.small = max(self.in_features, self.out_features), min(self.in_features, self.out_features)
        self.n_bases = math.ceil(self.small / r)
        self.dropout = branch_dropout(config.dropout)
        device = base_layer.weight.device
        # Alone (not through attach), a layer draws bases for its own shape.
        self.bases = bases if bases is not None else RandomBases(config, self.out_features, self.in_features, device)
        self.randlora_lambda = nn.Parameter(torch.zeros(r, self.n_bases, device=device))  # (r, n)
        self.randlora_gamma = nn.Parameter(torch.empty(self.n_bases, self.small, device=device))  # (n, m)
        if not self.randlora_gamma.is_meta:
            with torch.no_grad():
                if config.init == "random":
                    self.randlora_lambda.normal_()
                    self.randlora_gamma.fill_(1.0 / self.big)
                else:
                    self.randlora_gamma.fill_(1.0 / max(self.n_bases, self.small))

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.bases.A[:, : self.small]  # (r, m)
        b = self.bases.B[: self.big, : self.n_bases].flatten(1)  # (D, n r): column i r + k
        a_hat = self.randlora_lambda[:, :, None] * a[:, None, :] * self.randlora_gamma[None]  # (r, n, m)
        return a_hat.flatten(0, 1), b  # (r n, m): row k n + i, paired with column k n + i of b

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        a_hat, b = self._factors()
        x = self.dropout(x.to(a_hat.dtype))
        if self.in_features == self.small:
            return (x @ a_hat.T) @ b.T * self.scaling  # (..., r n) -> (..., d_out = D)
        return (x @ b) @ a_hat * self.scaling  # (..., n r) -> (..., d_out = m)

    def delta_weight(self) -> torch.Tensor:
        a_hat, b = self._factors()
        update = wide(b) @ wide(a_hat) * self.scaling  # (D, m)
        return update if self.in_features == self.small else update.T  # (d_out, d_in)
