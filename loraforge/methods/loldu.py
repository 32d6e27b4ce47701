"""LoLDU: train only the diagonal of a pivoted LU factorisation of the weight (r + 1 numbers).

LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for Parameter-Efficient
Fine-Tuning, Shi et al. (arXiv 2410.13618):

    W0 = P L D U                 torch.linalg.lu: W0 = P L U', D = diag(U'), U = U' / D (row-wise)
    h  = W_res x + b + sigma P L_r diag(z) U_r x                L_r = L[:, :r], U_r = U[:r, :]
    W_res = W0 - sigma0 P L_r diag(z0) U_r,   z0 = D[:r],   sigma0 = alpha / r

z (r) and sigma (a scalar) train; P, L_r, U_r are frozen. "First r" means the first r pivots of
the elimination, not the largest components; L_r, U_r are not orthogonal.

Decision (W_res): the base weight stays W0, and the frozen initial term is subtracted in the
forward instead, which is the same function:

    h = W0 x + b + P L_r ((sigma z - sigma0 z0) * U_r x)

so the model's own weights never change: detach() and adapter_disabled() give the pretrained model
back, and load_adapter() on a fresh base needs nothing but the saved tensors. The update is exactly
0 at init (sigma z and sigma0 z0 are the same product), so the output equals the base exactly.

Frozen buffers, saved with the adapter: `loldu_L` = P L_r (d_out x r: the permutation is folded in
once, so no d_out x d_out P is kept), `loldu_U` = U_r (r x d_in), `loldu_init` = sigma0 z0 (r). They
are saved rather than recomputed on load because LU pivoting is a discrete choice: another BLAS or
device may break a near-tie differently, and the trained z would then scale different factors.

sigma0 = alpha / r (the reference code's default alpha = 1 gives 1 / r). Init is the reference's
"lu" method only; use_rslora is refused (the paper defines no such scale). Trainable: r + 1.
"""

from __future__ import annotations

import torch
from torch import nn

from loraforge.core.config import AdapterConfig
from loraforge.core.errors import AdapterError
from loraforge.core.registry import register
from loraforge.methods.base import AdapterLayer, branch_dropout, rank_and_scale, wide


def ldu(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """P (d_out x d_out), unit lower L (d_out x k), D (k), unit upper U (k x d_in): W = P L diag(D) U."""
    perm, lower, upper = torch.linalg.lu(weight)
    diag = upper.diagonal()
    return perm, lower, diag, upper / diag[:, None]


@register(
    "loldu",
    axis="rank",
    paper="LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for PEFT (arXiv 2410.13618)",
)
class LoLDULinear(AdapterLayer):
    def __init__(self, base_layer: nn.Module, config: AdapterConfig, name: str):
        super().__init__(base_layer, config, name)
        rank, sigma0 = rank_and_scale(config, name)  # sigma0 = alpha / r: use_rslora is refused below
        if rank > min(self.in_features, self.out_features):
            raise AdapterError(f"{name}: loldu rank {rank} exceeds min(d_out, d_in) = "
                               f"{min(self.in_features, self.out_features)}")
        if config.init != "default" or config.use_rslora:
            raise AdapterError(f"loldu initialises from the LU factors of W0: init must be 'default' and "
                               f"use_rslora False (got init={config.init!r}, use_rslora={config.use_rslora})")
        weight = base_layer.weight
        if not weight.dtype.is_floating_point:
            raise AdapterError(f"{name}: loldu needs a floating-point weight (got {weight.dtype}); quantise after attaching")
        self.rank = rank
        self.dropout = branch_dropout(config.dropout)
        device = weight.device
        self.loldu_z = nn.Parameter(torch.empty(rank, device=device))  # (r,)
        self.loldu_sigma = nn.Parameter(torch.empty((), device=device))  # scalar
        self.register_buffer("loldu_L", torch.empty(self.out_features, rank, device=device))  # P L_r
        self.register_buffer("loldu_U", torch.empty(rank, self.in_features, device=device))  # U_r
        self.register_buffer("loldu_init", torch.empty(rank, device=device))  # sigma0 z0
        if not weight.is_meta:
            self._init_from_weight(sigma0, name)

    @torch.no_grad()
    def _init_from_weight(self, sigma: float, name: str) -> None:
        perm, lower, diag, upper = ldu(wide(self._w0()))
        pivots = diag[: self.rank]
        if (pivots == 0).any():  # U = U' / D needs them; pivots beyond r are never used
            raise AdapterError(f"{name}: the LU factorisation of the weight has a zero pivot among the first {self.rank}")
        self.loldu_L.copy_(perm @ lower[:, : self.rank])  # (d_out, r): a row permutation of L_r
        self.loldu_U.copy_(upper[: self.rank])  # (r, d_in)
        self.loldu_z.copy_(pivots)
        self.loldu_sigma.fill_(sigma)
        self.loldu_init.copy_(self.loldu_sigma * self.loldu_z)  # the same product as in _scale()

    def _scale(self) -> torch.Tensor:
        return self.loldu_sigma * self.loldu_z - self.loldu_init  # (r,); 0 at init

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x.to(self.loldu_U.dtype))
        return ((x @ self.loldu_U.T) * self._scale()) @ self.loldu_L.T  # (..., r) -> (..., d_out)

    def delta_weight(self) -> torch.Tensor:
        return (self.loldu_L * self._scale()) @ self.loldu_U  # (d_out, d_in)
