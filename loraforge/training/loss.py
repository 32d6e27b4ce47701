"""The training loss: summed over label tokens (causal LM) or rows (classification), so that the
trainer can normalise by the label tokens of a whole accumulation window."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.core.kernels import linear_cross_entropy
from loraforge.training.data import count_label_tokens

# Causal LMs whose logits are exactly lm_head(last_hidden_state): the loss may skip unlabelled positions.
# Gemma's head is one when its final_logit_softcapping is None (Gemma 3; Gemma 2 caps, and _plain_head
# checks): with its 262k-row head, logits of every position made a Gemma-3-270M step (16 advisor
# rows) take 5.2-13.0 s instead of 3.0-5.8 s.
PLAIN_HEAD_MODELS = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                     "GPT2LMHeadModel", "PhiForCausalLM", "Phi3ForCausalLM", "OlmoForCausalLM",
                     "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"}



def auxiliary_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the `aux_loss` tensors that modules set during the last forward (e.g. a mixture of
    experts' load-balancing loss); each is consumed so that it is counted once."""
    losses = []
    for module in model.modules():
        if getattr(module, "aux_loss", None) is not None:
            losses.append(module.aux_loss)
            module.aux_loss = None
    return torch.stack(losses).sum() if losses else None



def batch_loss(model: nn.Module, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """Summed loss over the batch's label tokens (causal LM) or rows (classification)."""
    if task == "classification":
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
    labels = batch["labels"][:, 1:]  # position t predicts token t + 1
    keep = labels != -100  # (B, T-1)
    head = model.get_output_embeddings() if _plain_head(model) else None
    if type(head) is nn.Linear:
        # The head is a fifth of a small LM's compute and its logits dominate activation memory:
        # apply it only where a label is (the prompt tokens of SFT data carry none), in chunks of
        # rows whose logits are dropped as soon as their gradient is known (kernels/).
        hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return linear_cross_entropy(hidden[:, :-1][keep], head.weight, labels[keep], head.bias)  # N = label tokens
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return F.cross_entropy(logits.float()[keep], labels[keep], reduction="sum")



def _plain_head(model: nn.Module) -> bool:
    """True when logits = output_embeddings(base_model(x).last_hidden_state), nothing after it."""
    config = getattr(model, "config", None)
    return (type(model).__name__ in PLAIN_HEAD_MODELS and getattr(config, "final_logit_softcapping", None) is None
            and getattr(config, "logit_scale", None) is None)



def mean_batch_loss(model: nn.Module, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """The loss of one batch per label token (row, for classification), on the model's device: what a
    selector's search and a data-based initialiser differentiate."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    return batch_loss(model, batch, task) / max(1, count_label_tokens(batch))
