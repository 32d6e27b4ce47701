"""Sampling a personalised text-to-image model: plain CFG, Hybrid-Model CFG, DECOR, reference tokens.

Hybrid-Model CFG (arXiv 2511.03156, spec ../shared/methods/hypernetwork.md): the base model gives the
unconditional and compositional part, the personalised model the subject,

    eps = eps_base(z, 0) + w_c (eps_base(z, c) - eps_base(z, 0)) + w_s (eps_pers(z, c) - eps_base(z, c))

w_s = 0 is the base model's CFG; eps_pers = eps_base is CFG with w_c; w_c = w_s is the personalised
model's CFG over the base model's unconditional prediction. One UNet forward per step serves all three
terms: the rows [uncond, cond, cond] run with adapters [0, 0, LoRA] (adapters.functional).
Plain CFG with an adapter runs every row through it. DDIM (the testbed's sampler), pixel space.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from PIL import Image

from loraforge.adapters.functional import RowLoRA, per_row_lora
from loraforge.core.errors import LoraforgeError
from loraforge.personalize.decor import project
from loraforge.vision.glyphs import uint8_pixels
from loraforge.vision.unet_testbed import text_states

FINGERPRINT = "diffusion_fingerprint"  # an adapter's provenance key: the model it was made for
MAX_GUIDANCE = 30.0  # a weight above this only saturates pixels: refused as a likely typo


def hm_cfg(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, eps_pers: torch.Tensor, w_c: float, w_s: float) -> torch.Tensor:
    return eps_uncond + w_c * (eps_cond - eps_uncond) + w_s * (eps_pers - eps_cond)


def parse_hm_cfg(text: str) -> tuple[float, float]:
    """'w_c,w_s' -> two weights in [0, MAX_GUIDANCE], or an error naming what is wrong."""
    parts = text.split(",")
    try:
        w_c, w_s = (float(p) for p in parts)
    except ValueError:
        raise LoraforgeError(f"--hm-cfg {text!r}: expected two numbers w_c,w_s (e.g. 3,2)") from None
    for name, w in (("w_c", w_c), ("w_s", w_s)):
        if not math.isfinite(w) or not 0.0 <= w <= MAX_GUIDANCE:
            raise LoraforgeError(f"--hm-cfg: {name} = {w} is out of range [0, {MAX_GUIDANCE}]")
    return w_c, w_s


@dataclass
class Conditioning:
    """What changes a sample beyond its prompt (all optional)."""

    adapter: dict[str, RowLoRA] | None = None  # one row each (R = 1): the personalised LoRA
    hm: tuple[float, float] | None = None  # (w_c, w_s): Hybrid-Model CFG instead of plain CFG
    decor_basis: torch.Tensor | None = None  # (D, k): DECOR's unwanted directions, on the prompt's states
    decor_strength: float = 1.0
    reference_tokens: torch.Tensor | None = None  # (1, M, D): appended to the prompt's states (decoupled attention)


def _row_adapters(adapter: dict[str, RowLoRA], on: torch.Tensor) -> dict[str, RowLoRA]:
    """The one-row adapter on the rows where `on` (R,) is True, zero elsewhere."""
    mask = on.to(next(iter(adapter.values())).a.dtype)[:, None, None]  # (R, 1, 1)
    return {name: RowLoRA(f.a[:1] * mask, f.b[:1] * mask, f.scale) for name, f in adapter.items()}


@torch.no_grad()
def generate(unet: UNet2DConditionModel, scheduler_config: dict, text_encoder: torch.nn.Module, tokenizer: object,
             prompt: str, n: int, condition: Conditioning | None = None, guidance: float = 2.0, steps: int = 25,
             seed: int = 0) -> torch.Tensor:
    """(n, S, S, 3) uint8 samples of `prompt`."""
    condition = condition or Conditioning()
    if not 0.0 <= guidance <= MAX_GUIDANCE:
        raise LoraforgeError(f"--guidance {guidance} is out of range [0, {MAX_GUIDANCE}]")
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    cond = text_states(text_encoder, tokenizer, [prompt])  # (1, L, D)
    if condition.decor_basis is not None:
        cond = project(cond, condition.decor_basis.to(cond.dtype), condition.decor_strength)
    uncond = text_states(text_encoder, tokenizer, [""])
    groups = [uncond, cond, cond] if condition.hm else [uncond, cond]
    states = torch.cat([g.expand(n, -1, -1) for g in groups])  # (G n, L, D)
    if condition.reference_tokens is not None:  # the unconditional rows get zero tokens (IP-Adapter's "no image")
        tokens = condition.reference_tokens.to(states.dtype)
        extra = torch.cat([torch.zeros_like(tokens).expand(n, -1, -1)] + [tokens.expand(n, -1, -1)] * (len(groups) - 1))
        states = torch.cat([states, extra], 1)
    adapters = {}
    if condition.adapter is not None:
        personal = torch.ones(len(groups) * n, dtype=torch.bool)
        if condition.hm:
            personal[: 2 * n] = False
        adapters = _row_adapters(condition.adapter, personal)
    elif condition.hm:
        raise LoraforgeError("--hm-cfg needs --adapter: it mixes the base and the personalised model")
    size = unet.config.sample_size
    x = torch.randn(n, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(seed))
    with per_row_lora(unet, adapters):
        for t in scheduler.timesteps:
            eps = unet(torch.cat([x] * len(groups)), t, encoder_hidden_states=states).sample.chunk(len(groups))
            if condition.hm:
                eps_hat = hm_cfg(eps[0], eps[1], eps[2], *condition.hm)
            else:
                eps_hat = eps[0] + guidance * (eps[1] - eps[0])
            x = scheduler.step(eps_hat, t, x).prev_sample
    return uint8_pixels(x)


def fingerprint(unet: UNet2DConditionModel) -> str:
    """Identifies a diffusion model: its config and the first values of every attention weight."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in unet.config.items() if not k.startswith("_")},
                                       sort_keys=True, default=str).encode())
    for name, p in sorted(unet.named_parameters()):
        if name.endswith(("to_q.weight", "to_k.weight")):
            digest.update(name.encode() + p.detach().flatten()[:32].float().numpy().tobytes())
    return digest.hexdigest()[:16]


def sheet(rows: list[torch.Tensor], scale: int = 4) -> Image.Image:
    """A contact sheet: one row of images (each (N, S, S, 3) uint8) per entry, white where short."""
    size = rows[0].shape[1]
    width = max(len(r) for r in rows)
    canvas = np.full((len(rows) * size, width * size, 3), 255, np.uint8)
    for i, images in enumerate(rows):
        for j, image in enumerate(images):
            canvas[i * size:(i + 1) * size, j * size:(j + 1) * size] = image.numpy()
    return Image.fromarray(canvas).resize((width * size * scale, len(rows) * size * scale), Image.NEAREST)

