"""DECOR: Decomposition and Projection of Text Embeddings for Text-to-Image Customization (Jang et al.,
arXiv 2412.09169). Training-free: after LoRA customisation, the prompt's text-embedding matrix X (L, D)
is projected away from the directions of unwanted tokens,

    X~ = E(unwanted words)  (k, D)  their word-token states     X~ = U S V~^T  (SVD, rank k' <= k)
    X' = X - a · X V~ V~^T                                      a in [0, 1]: the projection's strength

a = 0 leaves X as it is; a = 1 is the orthogonal projection onto the complement of span(V~), which
is idempotent and leaves no component along any removed direction.
"""

from __future__ import annotations

import torch

from loraforge.core.errors import LoraforgeError

RANK_TOL = 1e-6  # singular values below this fraction of the largest span nothing


def unwanted_basis(states: torch.Tensor) -> torch.Tensor:
    """Orthonormal V~ (D, k') spanning the rows of X~ (k, D): its right singular vectors of non-zero value."""
    if states.dim() != 2 or not len(states):
        raise LoraforgeError("DECOR needs at least one unwanted token's embedding")
    _, s, vh = torch.linalg.svd(states.double(), full_matrices=False)
    keep = s > RANK_TOL * s[0]
    return vh[keep].T.to(states.dtype)  # (D, k')


def project(x: torch.Tensor, basis: torch.Tensor, strength: float) -> torch.Tensor:
    """X' = X - a X V V^T over the last dimension of x (..., D)."""
    if not 0.0 <= strength <= 1.0:
        raise LoraforgeError(f"--decor-strength must be in [0, 1], got {strength}")
    return x - strength * (x @ basis) @ basis.T


@torch.no_grad()
def word_states(text_encoder: torch.nn.Module, tokenizer: object, words: list[str]) -> torch.Tensor:
    """The text tower's states at each word's own tokens (BOS, EOS and padding left out): X~ (k, D)."""
    rows = []
    for word in words:
        ids = tokenizer(word, return_tensors="pt")["input_ids"]  # (1, T) with BOS ... EOS
        if ids.shape[1] <= 2:
            raise LoraforgeError(f"--decor-remove: {word!r} has no tokens")
        hidden = text_encoder(input_ids=ids.to(text_encoder.device)).last_hidden_state[0]  # (T, D)
        rows.append(hidden[1:-1])
    return torch.cat(rows)
