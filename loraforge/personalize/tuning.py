"""The tuning-based references: DreamBooth-style LoRA per subject or per reference group.

LoRA (arXiv 2106.09685) on the UNet's attention (to_q, to_k, to_v, to_out.0), trained with the
denoising loss || eps - eps_theta(x_t, t, tau(p)) ||^2 on the group's images (DreamBooth, arXiv
2208.12242, without its prior-preservation term), frozen text tower; returned as one-row tensors
for `sampling.generate` and saved, where asked, as a PEFT folder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.adapters.functional import RowLoRA, rows_from_state
from loraforge.adapters.inject import adapter_state_dict, attach, detach
from loraforge.core.config import AdapterConfig
from loraforge.vision.datadream import UNET_TARGETS
from loraforge.vision.glyphs import signed_pixels
from loraforge.vision.unet_testbed import text_states


def fit_lora(unet: nn.Module, scheduler: object, text_encoder: nn.Module, tokenizer: object, images: torch.Tensor,
             prompt: str, rank: int = 4, steps: int = 100, lr: float = 1e-3, batch: int = 8,
             seed: int = 0) -> dict[str, RowLoRA]:
    """LoRA fitted to `images` (N, S, S, 3) uint8 under `prompt`; the UNet comes back as it was given."""
    config = AdapterConfig(rank=rank, alpha=rank, target_modules=UNET_TARGETS, seed=seed, task_type="FEATURE_EXTRACTION")
    x0 = signed_pixels(images)  # (N, 3, S, S)
    with torch.no_grad():
        cond = text_states(text_encoder, tokenizer, [prompt])  # (1, L, D)
    attach(unet, config)
    try:
        params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        generator = torch.Generator().manual_seed(seed)
        unet.train()
        for _ in range(steps):
            target = x0[torch.randint(0, len(x0), (batch,), generator=generator)]
            noise = torch.randn(target.shape, generator=generator)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
            pred = unet(scheduler.add_noise(target, noise, t), t, encoder_hidden_states=cond.expand(batch, -1, -1)).sample
            optimizer.zero_grad(set_to_none=True)
            F.mse_loss(pred, noise).backward()
            optimizer.step()
        state = {k: v.detach().clone() for k, v in adapter_state_dict(unet).items()}
    finally:
        unet.eval()
        detach(unet)
    return rows_from_state(config, state, 1)
