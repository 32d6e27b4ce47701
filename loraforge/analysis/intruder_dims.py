"""Intruder dimensions: new top singular vectors of a fine-tuned weight, orthogonal to all pre-trained ones.

LoRA vs Full Fine-tuning: An Illusion of Equivalence, Shuttleworth et al. (arXiv 2410.21228).
For one matrix, W0 (pre-trained) and W' = W0 + dW, both (m, n), thin SVDs W0 = U0 S0 V0^T and
W' = U' S' V'^T (singular values descending):

    C   = |U'[:, :k]^T U0|                  (k, min(m, n))  absolute cosines, left vectors only
    c_i = max_j C[i, j]                     (k,)            best match of fine-tuned vector i
    i is an intruder  <=>  c_i < epsilon    (defaults k = 10, epsilon = 0.5: the authors' script)

Absolute cosines make the count blind to the sign an SVD picks for each (u_i, v_i) pair.

Mitigation (the paper's Sec. 6 / PEFT's `reduce_intruder_dimension`): scale the intruders' singular
values by lambda, computed on the merged W' as the paper does, then re-factor the update:

    W_mit  = W' + (lambda - 1) sum_{i in I} s'_i u'_i v'_i^T
    dW_mit = W_mit - W0 = dW + (lambda - 1) sum_{i in I} s'_i u'_i v'_i^T
    B A    = best rank-r approximation of dW_mit / s, sqrt(S) split between B (d_out, r) and A (r, d_in)

lambda = 1 gives dW back; lambda = 0 removes the intruder directions of W' altogether.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraforge.analysis.spectra import working_dtype


@dataclass
class Intruders:
    max_cosine: torch.Tensor  # (k,) c_i for the top-k singular vectors of W'
    similarity: torch.Tensor  # (k, min(m, n)) |U'[:, :k]^T U0|, for plots
    base_spectrum: torch.Tensor  # (min(m, n),) S0
    tuned_spectrum: torch.Tensor  # (min(m, n),) S'
    epsilon: float

    @property
    def indices(self) -> list[int]:
        """Positions (0 = largest singular value of W') of the intruders among the top k."""
        return torch.nonzero(self.max_cosine < self.epsilon).flatten().tolist()

    @property
    def count(self) -> int:
        return count_intruders(self.max_cosine, self.epsilon)


def count_intruders(max_cosine: torch.Tensor, epsilon: float) -> int:
    """How many c_i fall below epsilon: sweep epsilon over one `max_cosine` at no SVD cost."""
    return int((max_cosine < epsilon).sum())


def intruder_scores(u0: torch.Tensor, u_tuned: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, C) from the left singular vectors U0 (m, p) and U' (m, p), columns sorted by singular value."""
    similarity = (u_tuned[:, :k].T @ u0.to(u_tuned.dtype)).abs()  # (k, p)
    return similarity.max(dim=1).values, similarity  # (k,), (k, p)


def find_intruders(w0: torch.Tensor, w_tuned: torch.Tensor, k: int = 10, epsilon: float = 0.5) -> Intruders:
    """Intruder dimensions of `w_tuned` (m, n) against the pre-trained `w0` (m, n)."""
    if w0.shape != w_tuned.shape:
        raise ValueError(f"W0 {tuple(w0.shape)} and W' {tuple(w_tuned.shape)} differ in shape")
    dtype = working_dtype(w0)
    u0, s0, _ = torch.linalg.svd(w0.to(dtype), full_matrices=False)  # (m, p), (p,)
    u1, s1, _ = torch.linalg.svd(w_tuned.to(dtype), full_matrices=False)
    max_cosine, similarity = intruder_scores(u0, u1, k)
    return Intruders(max_cosine, similarity, s0, s1, epsilon)


def mitigated_update(w0: torch.Tensor, delta: torch.Tensor, k: int = 10, epsilon: float = 0.5,
                     lam: float = 0.75) -> tuple[torch.Tensor, list[int]]:
    """dW_mit (m, n) and the intruder indices I of W0 + delta that it scaled by `lam`."""
    dtype = working_dtype(w0)
    w0, delta = w0.to(dtype), delta.to(dtype)
    u0 = torch.linalg.svd(w0, full_matrices=False)[0]  # (m, p)
    u1, s1, vh1 = torch.linalg.svd(w0 + delta, full_matrices=False)  # (m, p), (p,), (p, n)
    max_cosine, _ = intruder_scores(u0, u1, k)
    index = torch.nonzero(max_cosine < epsilon).flatten()
    intruder_part = (u1[:, index] * s1[index]) @ vh1[index]  # (m, n) sum_{i in I} s'_i u'_i v'_i^T
    return delta + (lam - 1.0) * intruder_part, index.tolist()


def low_rank_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B (m, r), A (r, n)) with B A the best rank-r approximation of `matrix` (Eckart-Young), sqrt(S) in each.

    A rank above min(m, n) (possible with a large LoRA rank on a small layer) gets zero rows/columns."""
    u, s, vh = torch.linalg.svd(matrix.to(working_dtype(matrix)), full_matrices=False)
    root = s[:rank].sqrt()  # (min(r, p),)
    missing = rank - root.numel()
    return F.pad(u[:, :rank] * root, (0, missing)), F.pad(root[:, None] * vh[:rank], (0, 0, 0, missing))  # (m, r), (r, n)
