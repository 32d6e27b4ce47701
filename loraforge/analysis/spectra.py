"""Spectra of weight matrices and of their updates: singular values, effective rank, subspace similarity.

Effective rank (Roy & Vetterli, "The effective rank: a measure of effective dimensionality",
EUSIPCO 2007), the exponential of the entropy of the normalised singular values:

    p_i = s_i / sum_j s_j,      erank(M) = exp(-sum_i p_i log p_i)

so erank(I_n) = n, erank(rank-1) = 1, and 1 <= erank <= rank(M). Singular values at or below
float round-off (s_i <= len(s) * eps * s_1, torch.linalg.matrix_rank's default tolerance) count
as zero: otherwise the ~1e-7 noise of a float32 SVD adds entropy to an exactly low-rank update.

Subspace similarity (LoRA, Hu et al., arXiv 2106.09685, Sec. 7, eq. 4): with U_i the top-i right
singular vectors of M1 and V_j the top-j of M2 (columns in R^{d_in}),

    phi(M1, M2, i, j) = ||U_i^T V_j||_F^2 / min(i, j)      in [0, 1]

1 when one subspace contains the other, 0 when they are orthogonal. The paper applies it to the A
matrices (r x d_in); for a LoRA update s B A with B of full column rank the top-r right singular
vectors of the update span the same row space as A's, so updates of any method work as well.
"""

from __future__ import annotations

import math

import torch


def working_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 at least (SVD has no half-precision kernel); float64 stays float64."""
    return torch.promote_types(x.dtype, torch.float32)


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """The spectrum of `matrix` (m, n): min(m, n) singular values, descending."""
    return torch.linalg.svdvals(matrix.to(working_dtype(matrix)))


def numerical_rank(spectrum: torch.Tensor) -> int:
    """How many singular values stand above round-off (see the module docstring)."""
    if spectrum.numel() == 0 or spectrum[0] <= 0:
        return 0
    tol = spectrum.numel() * torch.finfo(spectrum.dtype).eps * spectrum[0]
    return int((spectrum > tol).sum())


def effective_rank(matrix_or_spectrum: torch.Tensor) -> float:
    """Roy & Vetterli's entropy-based effective rank of a matrix (2-D) or of its spectrum (1-D).

    0 for a zero matrix (no direction at all)."""
    s = matrix_or_spectrum if matrix_or_spectrum.ndim == 1 else singular_values(matrix_or_spectrum)
    s = s[: numerical_rank(s)].double()
    if s.numel() == 0:
        return 0.0
    p = s / s.sum()
    return math.exp(float(-(p * p.log()).sum()))


def right_singular_vectors(matrix: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """The top `count` right singular vectors of `matrix` (m, n) as rows: (count, n).

    count=None keeps the numerical rank."""
    _, s, vh = torch.linalg.svd(matrix.to(working_dtype(matrix)), full_matrices=False)  # vh: (min(m,n), n)
    return vh[: numerical_rank(s) if count is None else count]


def subspace_similarity(m1: torch.Tensor, m2: torch.Tensor, i: int | None = None, j: int | None = None) -> float:
    """phi(M1, M2, i, j) of the LoRA paper on the right singular vectors of m1 (., n) and m2 (., n).

    i and j default to the numerical ranks of m1 and m2 (r for LoRA A matrices or updates)."""
    if m1.shape[-1] != m2.shape[-1]:
        raise ValueError(f"the matrices act on different spaces: {m1.shape[-1]} vs {m2.shape[-1]} columns")
    u = right_singular_vectors(m1, i)  # (i, n)
    v = right_singular_vectors(m2, j).to(u.dtype)  # (j, n)
    if u.shape[0] == 0 or v.shape[0] == 0:
        return 0.0
    return float((u @ v.T).square().sum() / min(u.shape[0], v.shape[0]))
