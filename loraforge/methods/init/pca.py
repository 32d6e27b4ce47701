"""Incremental PCA: mean-centred principal components of a stream of batches (Ross et al., "Incremental
Learning for Robust Visual Tracking", 2008; the update of scikit-learn's IncrementalPCA, which PEFT's
EVA uses too, so both see the same components).

After batches X_1..X_t (n_i x d), with running mean μ and n = Σ n_i rows seen, the next batch X
(m rows, mean x̄) updates the factorisation by one small SVD:

    [ diag(S) V^T                      ]   previous components, weighted by their singular values
    [ X − x̄                            ]   the new batch, centred on itself              = U' S' V'^T
    [ sqrt(n m / (n + m)) · (μ − x̄)    ]   the shift between the two means

    ratio_i = S'_i² / Σ_rows ||x − μ'||²    explained-variance ratio of component i
"""

from __future__ import annotations

import math

import torch

from loraforge.core.rng import seeded


class IncrementalPCA:
    def __init__(self, n_components: int, seed: int = 42):
        self.n_components = n_components
        self.seed = seed  # the randomised SVD is seeded, as in PEFT, so the result does not depend on the RNG
        self.n_seen = 0
        self.mean: torch.Tensor | None = None  # (d,) float64
        self.total_ss = 0.0  # Σ ||x − mean||² over every row seen
        self.components: torch.Tensor | None = None  # (k, d), unit rows
        self.singular_values: torch.Tensor | None = None  # (k,)
        self.ratios: torch.Tensor | None = None  # (k,) explained-variance ratios
        self.converged = torch.zeros(n_components, dtype=torch.bool)

    @torch.no_grad()
    def partial_fit(self, x: torch.Tensor, tau: float) -> None:
        """Fold in a batch x (m, d); component i is converged when its cosine with the previous
        estimate is at least tau."""
        m = x.shape[0]
        x = x.float()
        batch_mean = x.mean(0)  # (d,)
        centred = x - batch_mean  # (m, d)
        batch_ss = float(centred.double().square().sum())
        if self.components is None:
            stacked = centred
            mean, total_ss = batch_mean.double(), batch_ss
        else:
            n = self.n_seen
            shift = self.mean - batch_mean.double()  # (d,)
            stacked = torch.cat([self.singular_values[:, None] * self.components, centred.double(),
                                 math.sqrt(n * m / (n + m)) * shift[None]])  # (k + m + 1, d), float64 like PEFT's
            mean = (self.mean * n + batch_mean.double() * m) / (n + m)
            total_ss = self.total_ss + batch_ss + n * m / (n + m) * float(shift.square().sum())
        q = min(2 * self.n_components, *stacked.shape)
        with seeded(self.seed):
            _, s, v = torch.svd_lowrank(stacked, q=q, niter=4)  # v: (d, q)
        vt = v.T
        vt = vt * torch.sign(vt.gather(1, vt.abs().argmax(1, keepdim=True)))  # sign: largest entry of each row > 0
        previous = self.components
        k = self.n_components
        self.components, self.singular_values = vt[:k], s[:k]
        self.ratios = s[:k] ** 2 / total_ss
        self.n_seen, self.mean, self.total_ss = self.n_seen + m, mean, total_ss
        if previous is not None:
            self.converged = torch.cosine_similarity(self.components, previous, dim=1) >= tau
