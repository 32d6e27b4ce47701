"""The chunked head + cross-entropy equals the plain formulation, in value and gradients."""

import pytest
import torch
import torch.nn.functional as F

import loraforge as lf
from loraforge.core.kernels import linear_cross_entropy
from loraforge.testing import tiny_gemma3, tiny_gpt2, tiny_llama
from loraforge.training.loss import _plain_head, batch_loss


def plain_and_fused(chunk_rows: int, with_bias: bool, amp: bool = False):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g)
    weight = torch.randn(50, 16, generator=g) * 0.3
    bias = torch.randn(50, generator=g) if with_bias else None
    labels = torch.randint(0, 50, (37,), generator=g)
    results = []
    for fused in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight) + ((bias,) if with_bias else ())]
        b = leaves[2] if with_bias else None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            if fused:
                loss = linear_cross_entropy(leaves[0], leaves[1], labels, b, chunk_rows=chunk_rows)
            else:
                loss = F.cross_entropy(F.linear(leaves[0], leaves[1], b).float(), labels, reduction="sum")
        (loss * 0.7).backward()  # a non-unit upstream gradient, as the trainer's 1 / n_labels
        results.append([loss.detach()] + [t.grad for t in leaves])
    return results


@pytest.mark.parametrize("chunk_rows", [1, 8, 37, 100])
@pytest.mark.parametrize("with_bias", [False, True])
def test_equals_plain_cross_entropy(chunk_rows, with_bias):
    plain, fused = plain_and_fused(chunk_rows, with_bias)
    for want, got in zip(plain, fused):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_under_bf16_autocast_matches_plain_autocast():
    plain, fused = plain_and_fused(8, True, amp=True)
    for want, got in zip(plain, fused):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


def test_no_gradient_work_without_grad():
    with torch.no_grad():
        loss = linear_cross_entropy(torch.randn(5, 4), torch.randn(7, 4), torch.tensor([0, 1, 2, 3, 6]))
    assert loss.grad_fn is None and torch.isfinite(loss)


def test_gemma_takes_the_chunked_head_unless_it_caps_its_logits():
    assert _plain_head(tiny_gemma3()) and not _plain_head(tiny_gemma3(softcap=30.0))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2, tiny_gemma3])
def test_batch_loss_equals_full_logits_loss_with_adapter_gradients(make):
    model = lf.attach(make(), lf.AdapterConfig(rank=4, alpha=8, init="random", seed=0))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (3, 11), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt without labels
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    params = [p for p in model.parameters() if p.requires_grad]

    fused = batch_loss(model, batch, "causal-lm")
    fused_grads = torch.autograd.grad(fused, params)
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1]
    keep = labels[:, 1:] != -100
    plain = F.cross_entropy(logits[keep], labels[:, 1:][keep], reduction="sum")
    plain_grads = torch.autograd.grad(plain, params)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    for got, want in zip(fused_grads, plain_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
