"""Finetuning-Free Personalization of Text to Image Generation via Hypernetworks (arXiv 2511.03156),
spec ../shared/methods/hypernetwork.md:

    e = mean_i E(x_i)                 frozen CLIP image tower over a subject's reference images   (D,)
    {A_l, B_l} = H(e)                 H: LayerNorm -> MLP -> every A_l (r, d_in), B_l (d_out, r)  at once
    loss = || eps - eps_{theta + dW}(x_t, t, p_s) ||^2 + lambda · sum_l (||A_l||^2 + ||B_l||^2)

dW_l = B_l A_l on the UNet's attention (to_q, to_k, to_v, to_out.0), frozen UNet and encoder, gradients
only into H; a batch holds several subjects, each row through its own subject's tensors
(adapters.functional.per_row_lora). H's head starts with zero weights and a bias of a Kaiming A and a
zero B: the base model at step 0, with non-zero gradient in B (A = B = 0 would have none). Inference:
one forward of E and H, written as a plain PEFT LoRA folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from loraforge.adapters.functional import RowLoRA, per_row_lora
from loraforge.adapters.inject import attach, detach, tensors_replaced
from loraforge.adapters.io import save_adapter
from loraforge.core.config import AdapterConfig
from loraforge.core.errors import AdapterError, ModelNotFoundError
from loraforge.core.files import atomic_dir
from loraforge.core.modules import find_targets
from loraforge.personalize.references import Subject, load_images, read_subjects
from loraforge.personalize.sampling import FINGERPRINT, fingerprint
from loraforge.vision.clip import image_features, load_clip, pixels
from loraforge.vision.datadream import UNET_TARGETS, load_diffusion
from loraforge.vision.glyphs import signed_pixels
from loraforge.vision.unet_testbed import text_states

KIND = "hypernet-t2i"
RECORD, WEIGHTS = "hyper.json", "hyper.safetensors"


@dataclass
class HyperConfig:
    rank: int = 4
    hidden: int = 256
    steps: int = 300
    lr: float = 1e-3
    l2: float = 1e-4  # lambda of the output penalty (the spec leaves it open)
    subjects_per_step: int = 8
    targets_per_subject: int = 4  # denoising targets per subject and step: views of the subject
    references: int = 3  # reference images read by E per subject (a random subset in training)
    seed: int = 0


class HyperNetwork(nn.Module):
    """H: a subject's image embedding (S, D) -> per-layer LoRA factors for S rows."""

    def __init__(self, feature_dim: int, shapes: dict[str, tuple[int, int]], rank: int, hidden: int):
        super().__init__()
        self.shapes, self.rank = shapes, rank
        self.sizes = [rank * (d_in + d_out) for d_out, d_in in shapes.values()]
        self.body = nn.Sequential(nn.LayerNorm(feature_dim), nn.Linear(feature_dim, hidden), nn.GELU(),
                                  nn.Linear(hidden, hidden), nn.GELU())
        self.head = nn.Linear(hidden, sum(self.sizes))
        with torch.no_grad():
            self.head.weight.zero_()
            start = []
            for d_out, d_in in shapes.values():
                a = torch.empty(rank, d_in)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's A
                start += [a.flatten(), torch.zeros(d_out * rank)]
            self.head.bias.copy_(torch.cat(start))

    def forward(self, features: torch.Tensor) -> dict[str, RowLoRA]:
        flat = self.head(self.body(features))  # (S, sum r (d_in + d_out))
        out = {}
        for (name, (d_out, d_in)), chunk in zip(self.shapes.items(), flat.split(self.sizes, dim=1)):
            a, b = chunk.split([self.rank * d_in, self.rank * d_out], dim=1)
            out[name] = RowLoRA(a.reshape(-1, self.rank, d_in), b.reshape(-1, d_out, self.rank), 1.0)  # alpha = r
        return out


def l2_penalty(factors: dict[str, RowLoRA]) -> torch.Tensor:
    """(S,): sum_l ||A_l||^2 + ||B_l||^2 per subject row (the spec's check 3 definition)."""
    return sum(f.a.pow(2).sum((1, 2)) + f.b.pow(2).sum((1, 2)) for f in factors.values())


def attention_shapes(unet: nn.Module) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every UNet attention Linear LoRA goes on."""
    names = find_targets(unet, AdapterConfig(target_modules=UNET_TARGETS))
    return {name: (unet.get_submodule(name).out_features, unet.get_submodule(name).in_features) for name in names}


@torch.no_grad()
def encode(clip: nn.Module, processor: object, images: torch.Tensor) -> torch.Tensor:
    """E: normalised CLIP image embeddings (N, D) of uint8 images (N, S, S, 3)."""
    return image_features(clip, pixels(processor, images))


def train_hyper(diffusion: str | Path, encoder: str | Path, subjects: list[Subject] | str | Path, out: str | Path,
                config: HyperConfig | None = None, log: Callable[[str], None] = print) -> dict:
    """Train H end to end through the frozen UNet; write OUT/hyper.json + hyper.safetensors."""
    config = config or HyperConfig()
    unet, scheduler, text_encoder, tokenizer = load_diffusion(diffusion)
    clip, processor, _ = load_clip(encoder)
    size = unet.config.sample_size
    subjects = read_subjects(subjects, size) if isinstance(subjects, (str, Path)) else subjects
    torch.manual_seed(config.seed)
    hyper = HyperNetwork(clip.config.projection_dim, attention_shapes(unet), config.rank, config.hidden)
    history = fit(hyper, unet, scheduler, text_encoder, tokenizer, clip, processor, subjects, config, log)
    record = {"kind": KIND, "config": dataclasses.asdict(config), "feature_dim": clip.config.projection_dim,
              "shapes": {k: list(v) for k, v in hyper.shapes.items()}, "targets": UNET_TARGETS,
              "diffusion": {"path": str(Path(diffusion).resolve()), "fingerprint": fingerprint(unet)},
              "encoder": {"path": str(Path(encoder).resolve())}, "subjects": len(subjects), "history": history}
    with atomic_dir(out) as tmp:
        save_file({k: v.contiguous() for k, v in hyper.state_dict().items()}, str(tmp / WEIGHTS))
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


def fit(hyper: HyperNetwork, unet: nn.Module, scheduler: object, text_encoder: nn.Module, tokenizer: object,
        clip: nn.Module, processor: object, subjects: list[Subject], config: HyperConfig,
        log: Callable[[str], None] = print) -> list[dict[str, float]]:
    """The training loop: gradients reach only H (the UNet and the encoder are frozen and never change)."""
    for model in (unet, text_encoder, clip):
        model.requires_grad_(False).eval()
    features = [encode(clip, processor, s.images) for s in subjects]  # E frozen: its outputs are constants
    x0 = [signed_pixels(s.images) for s in subjects]  # (N, 3, S, S)
    prompts = {s.prompt for s in subjects}
    with torch.no_grad():
        states = {p: text_states(text_encoder, tokenizer, [p])[0] for p in prompts}  # (L, D) each
    optimizer = torch.optim.AdamW(hyper.parameters(), lr=config.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    history, start = [], time.monotonic()
    hyper.train()
    for step in range(config.steps):
        chosen = torch.randperm(len(subjects), generator=generator)[: config.subjects_per_step].tolist()
        refs = torch.stack([features[i][torch.randperm(len(features[i]), generator=generator)[: config.references]].mean(0)
                            for i in chosen])  # (S, D)
        factors = hyper(refs)
        k = config.targets_per_subject
        target = torch.cat([x0[i][torch.randint(0, len(x0[i]), (k,), generator=generator)] for i in chosen])  # (S k, 3, s, s)
        cond = torch.stack([states[subjects[i].prompt] for i in chosen]).repeat_interleave(k, 0)  # (S k, L, D)
        rows = {n: RowLoRA(f.a.repeat_interleave(k, 0), f.b.repeat_interleave(k, 0), f.scale) for n, f in factors.items()}
        noise = torch.randn(target.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(target),), generator=generator)
        with per_row_lora(unet, rows):
            pred = unet(scheduler.add_noise(target, noise, t), t, encoder_hidden_states=cond).sample
        denoise = F.mse_loss(pred, noise)
        l2 = l2_penalty(factors).mean()
        optimizer.zero_grad(set_to_none=True)
        (denoise + config.l2 * l2).backward()
        torch.nn.utils.clip_grad_norm_(hyper.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % 25 == 0 or step + 1 == config.steps:
            history.append({"step": step + 1, "denoise": round(denoise.item(), 5), "l2": round(l2.item(), 3),
                            "seconds": round(time.monotonic() - start, 1)})
            log(f"hyper step {step + 1}/{config.steps}: denoise {denoise.item():.4f} l2 {l2.item():.1f}")
    hyper.eval()
    return history


class TrainedHyper:
    """A saved H with its encoder: `factors(images)` and `personalize(images, out)`, one forward each."""

    def __init__(self, folder: str | Path, encoder: str | Path | None = None):
        folder = Path(folder)
        if not (folder / RECORD).is_file():
            raise ModelNotFoundError(f"{folder}: no {RECORD} (train one with `loraforge hyper train`)")
        self.record = json.loads((folder / RECORD).read_text())
        if self.record.get("kind") != KIND:
            raise AdapterError(f"{folder}: a {self.record.get('kind')!r} record, not a {KIND} hypernetwork")
        config = HyperConfig(**self.record["config"])
        shapes = {k: tuple(v) for k, v in self.record["shapes"].items()}
        self.hyper = HyperNetwork(self.record["feature_dim"], shapes, config.rank, config.hidden)
        self.hyper.load_state_dict(load_file(str(folder / WEIGHTS)))
        self.hyper.eval()
        self.config = config
        self.clip, self.processor, _ = load_clip(encoder or self.record["encoder"]["path"])
        if self.clip.config.projection_dim != self.record["feature_dim"]:
            raise AdapterError(f"{folder}: made for a {self.record['feature_dim']}-d image encoder, "
                               f"this one gives {self.clip.config.projection_dim}")

    def check_diffusion(self, unet: nn.Module, where: str | Path) -> None:
        """Refuse a diffusion model other than the one H was trained for."""
        want = self.record["diffusion"]["fingerprint"]
        if fingerprint(unet) != want or attention_shapes(unet) != self.hyper.shapes:
            raise AdapterError(f"{where}: not the diffusion model this hypernetwork was trained for "
                               f"({self.record['diffusion']['path']}, fingerprint {want})")

    @torch.no_grad()
    def factors(self, images: torch.Tensor) -> dict[str, RowLoRA]:
        return self.hyper(encode(self.clip, self.processor, images).mean(0, keepdim=True))  # one row

    def personalize(self, image_paths: list[str | Path], out: str | Path, diffusion: str | Path | None = None) -> dict:
        """Write the subject's LoRA as a PEFT folder; returns seconds (forward only and in all)."""
        start = time.monotonic()
        where = diffusion or self.record["diffusion"]["path"]
        unet = load_diffusion(where)[0]
        self.check_diffusion(unet, where)
        images = load_images(image_paths, unet.config.sample_size)
        forward_start = time.monotonic()
        factors = self.factors(images)
        forward_seconds = time.monotonic() - forward_start
        save_factors(unet, factors, self.config.rank, out, str(where))
        return {"out": str(out), "forward_seconds": round(forward_seconds, 4), "seconds": round(time.monotonic() - start, 3)}


def save_factors(unet: nn.Module, factors: dict[str, RowLoRA], rank: int, out: str | Path, base: str) -> None:
    """One row of factors -> a PEFT LoRA folder (adapters.io) on the UNet's attention, s = alpha / r = 1;
    the diffusion model's fingerprint goes into its provenance (`sample` refuses another model)."""
    attach(unet, AdapterConfig(rank=rank, alpha=rank, target_modules=UNET_TARGETS, task_type="FEATURE_EXTRACTION",
                               base_model_name_or_path=base, provenance={FINGERPRINT: fingerprint(unet)}))
    try:
        state = {}
        for name, f in factors.items():
            state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = f.a[0] * f.scale, f.b[0]
        with tensors_replaced(unet, state):
            save_adapter(unet, out)
    finally:
        detach(unet)
