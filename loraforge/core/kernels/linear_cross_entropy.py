"""The language-model head and its cross-entropy, in chunks of rows, never holding all the logits.

For SmolLM2-135M the head is a fifth of the weights (49152 x 576) and the float32 logits of
8 x 128 tokens take 200 MB, twice over once their gradient exists. As Liger-Kernel's fused linear
cross-entropy does, `linear_cross_entropy` walks over the rows in chunks: per chunk it computes the
logits z = h W^T + b, the loss log-sum-exp(z) - z[y], and at once the gradient
dL/dz = softmax(z) - onehot(y), which it turns into dL/dh (and dL/dW, dL/db when those train) before
the chunk's logits are dropped. Backward then only scales the stored gradients by dL/dloss. Peak
memory is one chunk of logits instead of N x V (plus N x V for their gradient); the arithmetic is
that of the plain head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Logits per chunk: 2^24 float32 values are 64 MB, about 340 rows of SmolLM2's 49152-token vocabulary.
# On this CPU chunks of 64-128 rows ran up to 2x slower in float32 (each chunk reads all of W, twice),
# while chunks of 256+ rows ran as fast as the plain head, or faster under bf16 autocast.
CHUNK_ELEMENTS = 2**24


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         bias: torch.Tensor | None = None, chunk_rows: int | None = None) -> torch.Tensor:
    """sum_i CE(hidden[i] W^T + b, labels[i]) for hidden (N, d), weight (V, d), labels (N,) in [0, V).

    Equals `F.cross_entropy(F.linear(hidden, weight, bias).float(), labels, reduction="sum")`,
    autocast included (the logits are computed in the autocast dtype, the softmax in float32).
    Every label must be a class index: drop ignored positions before calling. `chunk_rows` defaults
    to CHUNK_ELEMENTS logits per chunk.
    """
    chunk_rows = chunk_rows or max(16, CHUNK_ELEMENTS // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, bias, labels, chunk_rows)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                labels: torch.Tensor, chunk_rows: int) -> torch.Tensor:
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(device, enabled=False):
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            for start in range(0, hidden.shape[0], chunk_rows):
                h = hidden[start:start + chunk_rows].to(dtype)  # (n, d)
                y = labels[start:start + chunk_rows]  # (n,)
                z = F.linear(h, w, b).float()  # (n, V)
                lse = torch.logsumexp(z, dim=-1)  # (n,)
                total += (lse - z.gather(1, y[:, None]).squeeze(1)).sum()
                if not (need_h or need_w or need_b):
                    continue
                dz = z.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                dz[torch.arange(len(y), device=y.device), y] -= 1.0  # dL/dz = softmax - onehot
                dz_c = dz.to(dtype)
                if need_h:
                    grad_h[start:start + chunk_rows] = dz_c @ w
                if need_w:
                    grad_w += (dz_c.T @ h).float()
                if need_b:
                    grad_b += dz.sum(0)
        ctx.save_for_backward(*(t for t in (grad_h, grad_w, grad_b) if t is not None))
        ctx.needs = (need_h, need_w, need_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        stored = iter(ctx.saved_tensors)
        grads = [next(stored) * grad_loss if need else None for need in ctx.needs]
        if grads[1] is not None:
            grads[1] = grads[1].to(ctx.dtypes[0])
        if grads[2] is not None:
            grads[2] = grads[2].to(ctx.dtypes[1])
        return grads[0], grads[1], grads[2], None, None
