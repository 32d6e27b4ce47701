"""Bone and Bat: one trainable block shared across the r-wide column blocks of the weight.

Bone: Block Affine Transformation as Parameter Efficient Fine-tuning Methods for Large Language
Models (arXiv 2409.15371; later versions are named DiSHA, then MiSS). The block size r is
`config.rank`; alpha plays no part (there is no scale) and use_rslora is refused.

"bone" (PEFT `MissConfig(init_weights=True)`): trainable bone (r x d_out), zero at init.

    x_bar = sum_j x[j r : (j+1) r]          (r,) the input's r-wide chunks summed, the last zero-padded
    h = W0 x + b + bone^T x_bar             i.e. dW = bone^T [I_r, I_r, ..., I_r] (last block truncated)

"bone-bat" (PEFT `MissConfig(init_weights="bat")`, the weight-guided block affine form of the v1
abstract): trainable B (d_out/r x r x r), one r x r block B_i per row block, zero at init. With
W_ij the r x r blocks of W0 (d_out and d_in must be multiples of r):

    W'_ij = W_ij + W_ij B_i + B_i           h = W' x + b

dW depends on W0, so it has no low-rank path: it is rebuilt every forward. Unmerge inverts the
block map, W_ij = (W'_ij - B_i)(I + B_i)^-1 (in float64; I + B_i must be invertible).

Both keep their block under PEFT's name `miss_block`; PEFT loads a saved "bone" adapter as MiSS.
A "bone-bat" adapter is saved as LORAFORGE_BONE-BAT: PEFT would need `init_weights: "bat"` in
adapter_config.json, which the PEFT JSON we write has no field for. Dropout acts on the adapter
branch's input (PEFT's Bat ignores miss_dropout). init="random" draws the block Kaiming-uniform
(a = sqrt 5), as PEFT's `init_weights=False`: tests only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.core.config import AdapterConfig
from loraforge.core.errors import AdapterError
from loraforge.core.registry import register
from loraforge.methods.base import AdapterLayer, branch_dropout, wide

PAPER = "Bone: Block Affine Transformation as Parameter Efficient Fine-tuning Methods for LLMs (arXiv 2409.15371)"


class _BlockLayer(AdapterLayer):
    def __init__(self, base_layer: nn.Module, config: AdapterConfig, name: str):
        super().__init__(base_layer, config, name)
        if config.init == "gaussian" or config.use_rslora:
            raise AdapterError(f"{config.method} has no gaussian init and no scale: init must be 'default' or "
                               f"'random', use_rslora False (got init={config.init!r}, use_rslora={config.use_rslora})")
        self.block = config.rank_for(name)
        self.dropout = branch_dropout(config.dropout)
        shape = self._block_shape(name)
        self.miss_block = nn.Parameter(torch.zeros(shape, device=base_layer.weight.device))
        if config.init == "random" and not self.miss_block.is_meta:
            nn.init.kaiming_uniform_(self.miss_block, a=math.sqrt(5))

    def _block_shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError


@register("bone", axis="rank", paper=PAPER, peft_type="MISS")
class BoneLinear(_BlockLayer):
    def _block_shape(self, name: str) -> tuple[int, ...]:
        if self.block > self.in_features:
            raise AdapterError(f"{name}: bone block size r = {self.block} exceeds d_in = {self.in_features}")
        return (self.block, self.out_features)  # (r, d_out)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x.to(self.miss_block.dtype))
        x = F.pad(x, (0, -self.in_features % self.block))  # (..., ceil(d_in / r) r)
        x_bar = x.unflatten(-1, (-1, self.block)).sum(-2)  # (..., r)
        return x_bar @ self.miss_block  # (..., d_out)

    def delta_weight(self) -> torch.Tensor:
        copies = math.ceil(self.in_features / self.block)
        return wide(self.miss_block).T.repeat(1, copies)[:, : self.in_features]  # (d_out, d_in)


@register("bone-bat", axis="rank", paper=PAPER)
class BatLinear(_BlockLayer):
    def _block_shape(self, name: str) -> tuple[int, ...]:
        r, d_out, d_in = self.block, self.out_features, self.in_features
        if d_out % r or d_in % r:
            raise AdapterError(f"{name}: bone-bat needs d_out and d_in divisible by r = {r}, got {d_out} x {d_in}")
        return (d_out // r, r, r)  # (d_out/r, r, r)

    def _blocks(self, w: torch.Tensor) -> torch.Tensor:
        r = self.block  # (d_out, d_in) -> (d_in/r, d_out/r, r, r): [j, i] = W_ij
        return w.reshape(self.out_features // r, r, self.in_features // r, r).permute(2, 0, 1, 3)

    def _unblock(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.permute(1, 2, 0, 3).reshape(self.out_features, self.in_features)

    def _delta(self, w0: torch.Tensor) -> torch.Tensor:
        block = self.miss_block.to(w0.dtype)
        return self._unblock(self._blocks(w0) @ block + block)  # W_ij B_i + B_i, (d_out, d_in)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x.to(self.miss_block.dtype))
        return F.linear(x, self._delta(self._w0().to(x.dtype)))

    def delta_weight(self) -> torch.Tensor:
        return self._delta(wide(self._w0()))

    def _add_to_weight(self, sign: float) -> None:
        if sign > 0:
            return super()._add_to_weight(sign)
        block = self.miss_block.double()
        eye = torch.eye(self.block, dtype=torch.float64, device=block.device)
        try:
            inverse = torch.linalg.inv(eye + block)  # (d_out/r, r, r)
        except torch.linalg.LinAlgError as exc:
            raise AdapterError("bone-bat cannot unmerge: some I + B_i is singular") from exc
        self._set_w0(self._unblock((self._blocks(self._w0().double()) - block) @ inverse))

