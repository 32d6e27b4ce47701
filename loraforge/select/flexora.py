"""Flexora: learn one gate per transformer layer on validation data, keep the layers whose gate rose.

Flexora: Flexible Low Rank Adaptation for Large Language Models, Wei et al. (arXiv 2408.10774).
Layer selection as hyper-parameter optimisation (Sec. 3):

    h = W0 x + w_l * s B_l A_l x,     w = L * softmax(a),  a in R^L, a = 0 at the start (w = 1: plain LoRA)
    min_a L_val(theta*(a), a)   s.t.  theta*(a) = argmin_theta L_train(theta, a)

solved by alternating one adapter step on a training batch and one gate step on a validation batch
(`select.gated_search`), the gate step on the paper's one-step unroll (DARTS)

    grad_a L_val(theta - eta grad_theta L_train(theta, a), a)      (`--select-order 2`, second order)

or on its first-order approximation grad_a L_val(theta, a) (`--select-order 1`, the default), then layer l is kept iff a_l > 0 (it rose above its start), and a fresh LoRA
is trained on the kept layers only.

Decisions, from the reference code (kithib/Flexora, `flora.py`), the paper's own rule being unverified:
  - first-order gate gradient by default (the validation loss at the current theta, no unroll through
    its update), as the reference code does; the unrolled one is there for the paper's formulation,
    with eta = the adapter's learning rate (tested against finite differences);
    gate optimiser Adam at `--select-lr` (0.01), adapter AdamW at the run's `--lr`;
  - the search reads one epoch of at most 5,000 training rows (the reference's `max_samples: 5000`,
    `num_train_epochs: 1`, one gate step per LoRA step): `--select-steps 0`, the default, is
    ceil(min(5000, search rows) / batch size) steps; a positive value fixes the count;
  - one validation batch per gate step (the reference sums 8 of one row: a batch of 8 or more covers it);
  - a_l > 0 selects (ties impossible: a strict threshold); if no gate rose, the highest one is kept;
  - the gate multiplies all the layer's adapter modules; it is applied to the layer's output update
    (`gate_adapter`), which for LoRA equals the reference's scaling of the adapter's input.
The decision goes into the adapter config: `target_modules` lists the kept modules' paths and
`provenance["selection"]` the kept layers and the final gate logits.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from loraforge.adapters.inject import attach, detach
from loraforge.core.config import AdapterConfig
from loraforge.core.errors import LoraforgeError
from loraforge.select import SearchData, Selector, adapter_paths_by_block, gated_search, register_selector


def selected_layers(logits: list[float], layer_ids: list[int]) -> list[int]:
    """Layers whose logit is above its zero start; the top one when none is."""
    kept = [layer for layer, a in zip(layer_ids, logits) if a > 0]
    return kept or [layer_ids[max(range(len(logits)), key=lambda i: (logits[i], -i))]]


SEARCH_ROWS = 5000  # the reference's max_samples: one epoch over at most this many training rows


def search_steps(train_rows: int, batch_size: int, held_out: bool) -> int:
    """The reference's search length: one pass over min(5000, rows searched) at `batch_size`; without
    --eval-data, every fifth row is validation (`select.search_data`) and is not searched."""
    rows = train_rows - train_rows // 5 if held_out else train_rows
    return max(1, -(-min(SEARCH_ROWS, rows) // batch_size))


class Flexora(Selector):
    def __init__(self, select_steps: int = 0, select_lr: float = 0.01, lr: float = 2e-4, select_order: int = 1):
        if select_steps < 0:
            raise LoraforgeError(f"--select-steps must be 0 (one epoch of at most {SEARCH_ROWS} rows) or positive, got {select_steps}")
        self.steps, self.gate_lr, self.lr, self.order = select_steps, select_lr, lr, select_order
        self.fixed_steps = select_steps

    def attach_for_run(self, model: nn.Module, config: AdapterConfig, train_data, eval_data, *,
                       batch_size: int, pad_id: int, task: str, seed: int) -> None:
        self.steps = self.fixed_steps or search_steps(len(train_data), batch_size, held_out=eval_data is None)
        super().attach_for_run(model, config, train_data, eval_data, batch_size=batch_size, pad_id=pad_id, task=task, seed=seed)

    def attach(self, model: nn.Module, config: AdapterConfig, search: SearchData | None) -> None:
        if search is None:
            raise LoraforgeError("flexora searches on data: pass training data")
        attach(model, config)
        by_block = adapter_paths_by_block(model)
        if not by_block:
            detach(model)
            raise LoraforgeError("flexora found no adapter layer inside the model's blocks (a method that wraps layers is needed)")
        layer_ids = sorted(by_block)
        logits = torch.zeros(len(layer_ids), requires_grad=True)

        def gate(i: int):
            return lambda: len(layer_ids) * torch.softmax(logits, 0)[i]

        gates = {path: gate(i) for i, layer in enumerate(layer_ids) for path in by_block[layer]}
        steps = self.steps or len(search.train)
        gated_search(model, search, gates, [logits], steps, self.lr, self.gate_lr, self.order)
        final = logits.detach().tolist()
        kept = selected_layers(final, layer_ids)
        detach(model)
        chosen = dataclasses.replace(
            config, target_modules=sorted(p for layer in kept for p in by_block[layer]),
            provenance={**config.provenance, "selection": {"method": "flexora", "layers": kept, "search_steps": steps,
                                                           "gate_logits": dict(zip(map(str, layer_ids), final))}})
        attach(model, chosen)


@register_selector("flexora")
def build_flexora(select_steps: int = 0, select_lr: float = 0.01, lr: float = 2e-4, select_order: int = 1) -> Flexora:
    return Flexora(select_steps, select_lr, lr, select_order)
