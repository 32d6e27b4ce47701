"""DataDream: few-shot guided data set generation, then CLIP tuned on the generated images.

DataDream (Kim, Fu, Akata et al., arXiv 2407.10910; code ExplainableML/DataDream):

    1. LoRA on the text-to-image model's UNet attention and its text encoder, trained with the
       diffusion loss || eps - eps_theta(x_t, t, tau("a <class>")) ||^2 on the K real shots per class:
       one adapter for all classes (DataDream_dset) or one per class (DataDream_cls, --per-class);
    2. N images per class sampled with the adapted model (classifier-free guidance, seeded, batched);
    3. LoRA on CLIP (fewshot.train_adapter) trained on the synthetic images plus the real shots;
    4. accuracy on the test split, beside the same-shot real-only LoRA (the paper's comparison).

`--unadapted` skips step 1 (the ablation: synthetic images from the plain model). OUT holds the
adapters in PEFT's format (adapters/<name>/unet, adapters/<name>/text_encoder), contact_sheet.png
(per class: the real shots, then generated images) and report.json; it is written whole or not at all.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from PIL import Image
from transformers import AutoTokenizer, CLIPTextModel

from loraforge.adapters.inject import attach, trainable_parameters
from loraforge.adapters.io import save_adapter
from loraforge.core.config import AdapterConfig
from loraforge.core.configs import opt
from loraforge.core.errors import LoraforgeError, ModelNotFoundError
from loraforge.core.files import atomic_dir
from loraforge.vision.clip import check_clip, load_clip, pixels, zero_shot_accuracy
from loraforge.vision.fewshot import FewShotSettings, draw_shots, load_split, train_adapter
from loraforge.vision.unet_testbed import CAPTION_DROPOUT, denoising_loss, sample, text_states

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class DataDreamSettings:
    diffusion: str = opt("", "diffusion folder: unet/, scheduler/ (diffusers), text_encoder/, tokenizer/")
    clip: str = opt("", "CLIP folder to tune on the generated images")
    data: str = opt("digits", "digits | glyphs:seen | glyphs:font | a folder of class sub-folders of PNGs")
    testbed: str = opt("", "testbed folder for glyphs:* (default: the built one)")
    shots: int = opt(4, "real images per class")
    images_per_class: int = opt(20, "generated images per class")
    per_class: bool = opt(False, "one diffusion adapter per class (DataDream_cls); default one for all (_dset)")
    unadapted: bool = opt(False, "ablation: generate with the plain diffusion model")
    rank: int = opt(4, "LoRA rank of the diffusion adapters")
    unet_steps: int = opt(200, "diffusion LoRA steps (per adapter)")
    unet_lr: float = opt(1e-3, "diffusion LoRA learning rate (DataDream: 1e-4 on Stable Diffusion)")
    guidance: float = opt(2.0, "classifier-free guidance scale")
    sample_steps: int = opt(25, "DDIM steps per image")
    clip_steps_per_shot: int = opt(25, "CLIP LoRA steps per real shot")
    clip_lr: float = opt(5e-3, "CLIP LoRA learning rate (fewshot's)")
    template: str = opt("a {}", "prompt per class name, for the diffusion model and CLIP")
    seed: int = opt(0, "draws the shots, seeds the adapters and the samples")
    out: str = opt("runs/datadream", "adapters, contact_sheet.png and report.json")


def load_diffusion(folder: str | Path) -> tuple[UNet2DConditionModel, DDPMScheduler, CLIPTextModel, object]:
    folder = Path(folder)
    if not (folder / "unet" / "config.json").is_file():
        raise ModelNotFoundError(f"{folder}: no unet/config.json; build the testbed with `loraforge testbed build glyphs`")
    return (UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval(),
            DDPMScheduler.from_pretrained(folder, subfolder="scheduler"),
            CLIPTextModel.from_pretrained(str(folder / "text_encoder"), local_files_only=True).eval(),
            AutoTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True))


def fit_diffusion_lora(unet: UNet2DConditionModel, text_encoder: CLIPTextModel, scheduler: DDPMScheduler,
                       tokenizer: object, x0: torch.Tensor, prompts: list[str], settings: DataDreamSettings,
                       seed: int) -> None:
    """Step 1: LoRA on the UNet's attention and the text encoder (both in place), diffusion loss on x0.

    The loss is the testbed's own (Min-SNR weighted, the class prompt dropped to "" 10% of the time,
    as the base UNet was trained): without the empty prompt in training, the text encoder's LoRA
    would move the unconditional branch of classifier-free guidance where no step fits it (an
    interpretation at this scale: the paper's recipe is plain MSE on the class prompts)."""
    for model, targets in ((unet, UNET_TARGETS), (text_encoder, TEXT_TARGETS)):
        attach(model, AdapterConfig(rank=settings.rank, alpha=settings.rank, target_modules=targets, seed=seed,
                                    task_type="FEATURE_EXTRACTION"))
    params = [p for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.unet_lr, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(seed)
    unet.train()
    text_encoder.train()
    for _ in range(settings.unet_steps):
        index = torch.randint(0, len(x0), (min(len(x0), 32),), generator=generator)
        dropped = torch.rand(len(index), generator=generator) < CAPTION_DROPOUT
        states = text_states(text_encoder, tokenizer, ["" if d else prompts[i] for i, d in zip(index.tolist(), dropped)])
        optimizer.zero_grad(set_to_none=True)
        denoising_loss(unet, scheduler, x0[index], states, generator).backward()
        optimizer.step()
    unet.eval()
    text_encoder.eval()


def contact_sheet(real: list[torch.Tensor], generated: list[torch.Tensor], columns: int = 8, scale: int = 4) -> Image.Image:
    """One row per class: its real shots, a gap, then up to `columns` generated images (uint8 HWC)."""
    size = real[0].shape[1]
    width = max(len(r) for r in real) + 1 + min(columns, max(len(g) for g in generated))
    sheet = np.full((len(real) * size, width * size, 3), 255, np.uint8)
    for row, (shots, made) in enumerate(zip(real, generated)):
        for col, image in enumerate(list(shots) + [None] + list(made[:columns])):
            if image is not None:
                sheet[row * size:(row + 1) * size, col * size:(col + 1) * size] = image.numpy()
    return Image.fromarray(sheet).resize((width * size * scale, len(real) * size * scale), Image.NEAREST)


def run_datadream(settings: DataDreamSettings, log: Callable[[str], None] = print) -> dict:
    """Steps 1-4 of DataDream; returns report.json's content (accuracy, real-only accuracy, zero-shot)."""
    start = time.monotonic()
    for flag, value in (("--shots", settings.shots), ("--images-per-class", settings.images_per_class),
                        ("--rank", settings.rank), ("--unet-steps", settings.unet_steps),
                        ("--sample-steps", settings.sample_steps), ("--clip-steps-per-shot", settings.clip_steps_per_shot)):
        if value < 1:
            raise LoraforgeError(f"{flag} must be at least 1, got {value}")
    check_clip(settings.clip)  # before the diffusion adapters train, not after
    split = load_split(settings.data, settings.testbed or None)
    classes = split.pool.classes
    prompts = [settings.template.format(c) for c in classes]
    index = draw_shots(split.pool.labels, settings.shots, settings.seed)
    real, real_y = split.pool.images[index], split.pool.labels[index]
    unet, scheduler, text_encoder, tokenizer = load_diffusion(settings.diffusion)
    size = unet.config.sample_size
    x0 = F.interpolate(real.permute(0, 3, 1, 2).float(), size=(size, size), mode="bilinear") / 127.5 - 1  # (K*C, 3, s, s)
    groups = [list(range(len(classes)))] if not settings.per_class else [[c] for c in range(len(classes))]
    generated: list[torch.Tensor] = [torch.zeros(0)] * len(classes)
    adapters = {}
    with atomic_dir(settings.out) as tmp:
        for group in groups:
            name = "all" if len(group) > 1 else f"class-{group[0]}"
            u, te = copy.deepcopy(unet), copy.deepcopy(text_encoder)
            if not settings.unadapted:
                rows = torch.cat([(real_y == c).nonzero().flatten() for c in group])
                fit_diffusion_lora(u, te, scheduler, tokenizer, x0[rows], [prompts[int(real_y[i])] for i in rows],
                                   settings, settings.seed)
                save_adapter(u, tmp / "adapters" / name / "unet")
                save_adapter(te, tmp / "adapters" / name / "text_encoder")
                adapters[name] = trainable_parameters(u) + trainable_parameters(te)
            for c in group:
                generated[c] = sample(u, scheduler.config, te, tokenizer, [prompts[c]] * settings.images_per_class,
                                      settings.guidance, settings.sample_steps, seed=settings.seed + c)
                log(f"generated {settings.images_per_class} images of {classes[c]} ({c + 1}/{len(classes)})")
        contact_sheet([real[real_y == c] for c in range(len(classes))], generated).save(tmp / "contact_sheet.png")
        clip, processor, clip_tokenizer = load_clip(settings.clip)
        synthetic_y = torch.arange(len(classes)).repeat_interleave(settings.images_per_class)
        train_px = pixels(processor, torch.cat([torch.cat(generated), real]))
        train_y = torch.cat([synthetic_y, real_y])
        test_px = pixels(processor, split.test.images)
        fewshot = FewShotSettings(lr=settings.clip_lr, steps_per_shot=settings.clip_steps_per_shot)
        accuracy = {}
        for label, (px, y) in {"datadream": (train_px, train_y), "real-only": (pixels(processor, real), real_y)}.items():
            # the same number of CLIP steps for both: steps_per_shot x the real shots per class
            per_class = max(1, len(y) // len(classes))
            steps = dataclasses.replace(fewshot, steps_per_shot=max(1, fewshot.steps_per_shot * settings.shots // per_class))
            model = train_adapter(copy.deepcopy(clip), clip_tokenizer, prompts, px, y, steps, settings.seed)
            accuracy[label] = zero_shot_accuracy(model, clip_tokenizer, test_px, split.test.labels, prompts)
            log(f"CLIP LoRA on {label} images: accuracy {accuracy[label]:.3f}")
        report = {"settings": dataclasses.asdict(settings), "accuracy": accuracy["datadream"],
                  "real_only_accuracy": accuracy["real-only"],
                  "zero_shot": zero_shot_accuracy(clip, clip_tokenizer, test_px, split.test.labels, prompts),
                  "diffusion_adapter_params": adapters, "seconds": round(time.monotonic() - start, 1)}
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
