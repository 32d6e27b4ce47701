"""LISA: train gamma randomly sampled transformer blocks at a time, resampled every K steps.

LISA: Layerwise Importance Sampling for Memory-Efficient Large Language Model Fine-Tuning, Pan et al.
(arXiv 2403.17919, NeurIPS 2024), Algorithm 1:

    for period i = 0 .. ceil(T / K) - 1:
        freeze all N_L blocks; the embedding and the head (everything outside the blocks) stay trainable
        S_i = gamma distinct blocks drawn uniformly (p_block = gamma / N_L); unfreeze them
        run K AdamW steps (the lr schedule keeps counting across periods)

"Trainable" means what the run trains: with `--method full` every weight (the paper's setting:
embedding, head, norms outside the blocks always on); with an adapter, the adapter tensors of the
sampled blocks (plus a classification head, which sits outside the blocks). At each switch the
optimizer state of the blocks just frozen is dropped, so its memory is 2 x (always-on + gamma blocks)
floats, not 2 x everything; a block sampled again later starts with fresh moments, as in LMFlow's
reference trainer, which rebuilds the optimizer. S_i is a pure function of (seed, i): a resumed run
samples the same blocks, and the checkpoint holds exactly the state of the blocks then active.
Defaults: gamma = 2 (the paper's usual setting), K = 20 (LMFlow's `lisa_interval_steps`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loraforge.core.errors import LoraforgeError
from loraforge.select import Selector, block_of, find_blocks, register_selector


def sample_blocks(n_blocks: int, gamma: int, seed: int, period: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + period)
    return sorted(torch.randperm(n_blocks, generator=generator)[:gamma].tolist())


class LISA(Selector):
    switches_trainable = True

    def __init__(self, lisa_layers: int = 2, lisa_interval: int = 20, seed: int = 0):
        if lisa_layers < 1 or lisa_interval < 1:
            raise LoraforgeError(f"--lisa-layers and --lisa-interval must be at least 1, got {lisa_layers}, {lisa_interval}")
        self.gamma, self.interval, self.seed = lisa_layers, lisa_interval, seed
        self.period: int | None = None
        self.by_block: dict[int, list[nn.Parameter]] | None = None
        self.active: list[int] = []

    def _index(self, model: nn.Module) -> dict[int, list[nn.Parameter]]:
        # The run's trainable tensors that sit inside a block, by block; fixed at the first step.
        blocks_path, blocks = find_blocks(model)
        if self.gamma > len(blocks):
            raise LoraforgeError(f"--lisa-layers {self.gamma} exceeds the model's {len(blocks)} blocks")
        by_block: dict[int, list[nn.Parameter]] = {i: [] for i in range(len(blocks))}
        for name, param in model.named_parameters():
            index = block_of(name, blocks_path)
            if param.requires_grad and index is not None:
                by_block[index].append(param)
        return by_block

    def before_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        if self.by_block is None:
            self.by_block = self._index(model)
        period = step // self.interval
        if period == self.period:
            return {}
        self.period = period
        self.active = sample_blocks(len(self.by_block), self.gamma, self.seed, period)
        for index, params in self.by_block.items():
            on = index in self.active
            for param in params:
                param.requires_grad_(on)
                if not on:
                    param.grad = None
                    optimizer.state.pop(param, None)  # its moments go: memory falls
        return {"lisa_blocks": list(self.active)}


@register_selector("lisa")
def build_lisa(lisa_layers: int = 2, lisa_interval: int = 20, seed: int = 0) -> LISA:
    return LISA(lisa_layers, lisa_interval, seed)
