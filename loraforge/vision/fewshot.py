"""`loraforge fewshot`: CLIP few-shot classification with adapters on both towers (CLIP-LoRA style).

CLIP-LoRA (Zanella & Ben Ayed, arXiv 2405.18541): the classifier is the class-name prompts; LoRA on
q/k/v of both encoders; each step encodes the prompts and a batch of shots and minimises

    CE(exp(t) * norm(f_img(x)) @ norm(f_txt(prompts))^T, y)                    (B, C) logits

so the text tower's update moves the classifier itself. The method is any loraforge method whose
layer wraps a Linear (Block-LoRA, Comp-LoRA, ...), optionally with a gradient regulariser (GLAD).
Baselines: zero-shot (the same prompts, no training) and a linear probe (logistic regression on the
frozen, normalised image features of the shots). Accuracy on the test split per shot count, averaged
over seeds (each seed draws its own shots).

Data: `digits` (scikit-learn's, glyph-styled), `glyphs:seen` (train split -> test split) or
`glyphs:font` (the held-out font, split in two), or a folder with one sub-folder of PNGs per class
(`train/` and `test/` inside it if split, else split in two).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from loraforge.adapters.inject import attach, trainable_parameters
from loraforge.core.config import AdapterConfig
from loraforge.core.configs import opt
from loraforge.core.errors import LoraforgeError
from loraforge.core.plugins import REGULARIZERS, Component
from loraforge.vision.clip import class_logits, image_features, load_clip, pixels, text_features, zero_shot_accuracy
from loraforge.vision.glyphs import ImageSet, digits, load_glyphs, testbed_dir

CLIP_LORA_TARGETS = ["q_proj", "k_proj", "v_proj"]


@dataclass
class FewShotSettings:
    clip: str = opt("", "CLIP folder (config.json, weights, processor, tokenizer)")
    data: str = opt("digits", "digits | glyphs:seen | glyphs:font | a folder of class sub-folders of PNGs")
    testbed: str = opt("", "testbed folder for glyphs:* (default: the built one under the cache)")
    shots: str = opt("1,2,4,8,16", "shot counts per class, comma-separated")
    method: str = opt("lora", "lora | block-lora | comp-lora (any method wrapping Linear layers)")
    regularizer: str = opt("", "gradient regulariser (glad), or empty for none")
    seeds: int = opt(3, "seeds averaged per shot count; each draws its own shots")
    rank: int = opt(2, "CLIP-LoRA's rank 2")
    alpha: float = opt(2.0, "scale alpha / rank")
    dropout: float = opt(0.25, "CLIP-LoRA's 0.25")
    targets: str = opt(",".join(CLIP_LORA_TARGETS), "module names in both towers (CLIP-LoRA: q/k/v)")
    n_blocks: int = opt(4, "block-lora's arms (must divide every target's d_in)")
    # 4 digit shots, 25 steps a shot, quick testbed: 0.49 at 1e-3, 0.67 at 5e-3 (zero-shot 0.45).
    lr: float = opt(5e-3, "AdamW learning rate (CLIP-LoRA: 2e-4 on ViT-B/16; the tiny testbed needs more)")
    steps_per_shot: int = opt(25, "optimizer steps per shot (CLIP-LoRA: 500)")
    batch_size: int = opt(32, "shots per step (CLIP-LoRA: 32)")
    template: str = opt("a {}", "prompt per class name ('a photo of a {}.' for a real CLIP)")
    test_limit: int = opt(0, "evaluate on at most N test images (0: all)")
    json: str = opt("", "also write the result (rows of data, shots, system, accuracy, params, seconds) here")


@dataclass
class Split:
    pool: ImageSet  # where shots are drawn from
    test: ImageSet


def load_split(data: str, testbed: str | Path | None, seed: int = 0) -> Split:
    if data == "digits":
        return halves(digits(seed=seed), seed)
    if data.startswith("glyphs:"):
        attribute = data.split(":", 1)[1]
        folder = Path(testbed) / "data" if testbed else _default_testbed() / "data"
        if attribute == "seen":
            return Split(load_glyphs(folder, "train"), load_glyphs(folder, "test"))
        if attribute == "font":
            return halves(load_glyphs(folder, "heldout_font"), seed)
        raise LoraforgeError(f"--data {data}: unknown glyph attribute {attribute!r} (seen | font)")
    root = Path(data)
    if not root.is_dir():
        raise LoraforgeError(f"--data {data}: neither digits, glyphs:seen|font nor a folder")
    if (root / "train").is_dir() and (root / "test").is_dir():
        train = png_folder(root / "train")
        return Split(train, png_folder(root / "test", train.classes))
    return halves(png_folder(root), seed)


def png_folder(root: Path, classes: list[str] | None = None) -> ImageSet:
    """One sub-folder of PNG images per class; the folder name is the class name."""
    classes = classes or sorted(p.name for p in root.iterdir() if p.is_dir())
    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted((root / name).glob("*.png"))
        if not files:
            raise LoraforgeError(f"{root / name}: no PNG images for class {name!r}")
        images += [np.asarray(Image.open(f).convert("RGB")) for f in files]
        labels += [label] * len(files)
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise LoraforgeError(f"{root}: images of different sizes {sorted(shapes)[:3]}; resize them to one size")
    return ImageSet(torch.from_numpy(np.stack(images)), torch.tensor(labels), classes, [{} for _ in labels])


def halves(data: ImageSet, seed: int) -> Split:
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return Split(data.subset(order[: len(data) // 2]), data.subset(order[len(data) // 2:]))


def draw_shots(labels: torch.Tensor, shots: int, seed: int) -> torch.Tensor:
    """`shots` indices per class, drawn without replacement (every class must have that many)."""
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        if len(members) < shots:
            raise LoraforgeError(f"class {c} has {len(members)} images, fewer than {shots} shots")
        picked.append(members[torch.randperm(len(members), generator=generator)[:shots]])
    return torch.cat(picked)


@torch.no_grad()
def linear_probe(model: torch.nn.Module, train_px: torch.Tensor, train_y: torch.Tensor, test_px: torch.Tensor,
                 test_y: torch.Tensor) -> float:
    """Logistic regression on frozen normalised image features (CLIP's linear-probe protocol)."""
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError as exc:
        raise LoraforgeError("the linear probe needs scikit-learn: pip install 'loraforge[vision]'") from exc
    fit = LogisticRegression(C=10.0, max_iter=2000).fit(image_features(model, train_px).numpy(), train_y.numpy())
    return float((fit.predict(image_features(model, test_px).numpy()) == test_y.numpy()).mean())


def adapter_config(settings: FewShotSettings, seed: int) -> AdapterConfig:
    options = {"n_blocks": settings.n_blocks} if settings.method == "block-lora" else {}
    return AdapterConfig(method=settings.method, rank=settings.rank, alpha=settings.alpha, dropout=settings.dropout,
                         target_modules=[t for t in settings.targets.split(",") if t], seed=seed,
                         task_type="FEATURE_EXTRACTION", options=options)


def train_adapter(model: torch.nn.Module, tokenizer: object, prompts: list[str], train_px: torch.Tensor,
                  train_y: torch.Tensor, settings: FewShotSettings, seed: int) -> torch.nn.Module:
    """Attach the method to both towers of `model` (in place) and fit it on the shots."""
    attach(model, adapter_config(settings, seed))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.01)
    regularizer = REGULARIZERS.build(Component.of(settings.regularizer)) if settings.regularizer else None
    generator = torch.Generator().manual_seed(seed)
    steps = settings.steps_per_shot * max(1, len(train_y) // len(prompts))
    model.train()
    for _ in range(steps):
        index = torch.randperm(len(train_y), generator=generator)[: settings.batch_size]

        def forward_backward() -> None:
            logits = class_logits(model, train_px[index], text_features(model, tokenizer, prompts))  # (B, C)
            F.cross_entropy(logits, train_y[index]).backward()

        optimizer.zero_grad(set_to_none=True)
        forward_backward()
        if regularizer is not None:
            regularizer.steer(params, forward_backward)
        optimizer.step()
    return model.eval()


def system_name(method: str, regularizer: str) -> str:
    """The benchmark's name of a system: the method, with "-glad" for LoRA + GLAD."""
    return method + (f"-{regularizer}" if regularizer else "")


def check_settings(settings: FewShotSettings) -> list[int]:
    """The shot counts; refuses a size that cannot run."""
    try:
        shot_counts = [int(s) for s in settings.shots.split(",") if s.strip()]
    except ValueError:
        raise LoraforgeError(f"--shots takes comma-separated whole numbers, got {settings.shots!r}") from None
    if not shot_counts or min(shot_counts) < 1:
        raise LoraforgeError(f"--shots must be counts of at least 1, got {settings.shots!r}")
    for flag, value in (("--seeds", settings.seeds), ("--rank", settings.rank), ("--steps-per-shot", settings.steps_per_shot),
                        ("--batch-size", settings.batch_size), ("--n-blocks", settings.n_blocks)):
        if value < 1:
            raise LoraforgeError(f"{flag} must be at least 1, got {value}")
    if settings.test_limit < 0:
        raise LoraforgeError(f"--test-limit must be 0 (all) or positive, got {settings.test_limit}")
    return shot_counts


def run_fewshot(settings: FewShotSettings, systems: list[tuple[str, str]] | None = None,
                log: Callable[[str], None] = print) -> dict:
    """Zero-shot once; then per shot count and seed, the linear probe and each (method, regularizer)
    of `systems` (default: the settings' own) on the same shots. Rows hold seed-averaged accuracy."""
    systems = systems or [(settings.method, settings.regularizer)]
    shot_counts = check_settings(settings)  # before the CLIP loads
    base, processor, tokenizer = load_clip(settings.clip)
    split = load_split(settings.data, settings.testbed or None)
    test = split.test.subset(range(min(len(split.test), settings.test_limit))) if settings.test_limit else split.test
    prompts = [settings.template.format(c) for c in split.pool.classes]
    pool_px, test_px = pixels(processor, split.pool.images), pixels(processor, test.images)
    zero_shot = zero_shot_accuracy(base, tokenizer, test_px, test.labels, prompts)
    log(f"{settings.data} zero-shot: {zero_shot:.3f} ({len(test)} test images, {len(prompts)} classes)")
    probe_params = len(prompts) * (base.config.projection_dim + 1)
    rows = []
    for shots in shot_counts:
        accuracy: dict[str, list[float]] = {"linear-probe": []}
        params, seconds = {"zero-shot": 0, "linear-probe": probe_params}, {"zero-shot": 0.0, "linear-probe": 0.0}
        for seed in range(settings.seeds):
            index = draw_shots(split.pool.labels, shots, seed)
            train_px, train_y = pool_px[index], split.pool.labels[index]
            start = time.monotonic()
            accuracy["linear-probe"].append(linear_probe(base, train_px, train_y, test_px, test.labels))
            seconds["linear-probe"] += time.monotonic() - start
            for method, regularizer in systems:
                name = system_name(method, regularizer)
                run = dataclasses.replace(settings, method=method, regularizer=regularizer)
                start = time.monotonic()
                model = train_adapter(copy.deepcopy(base), tokenizer, prompts, train_px, train_y, run, seed)
                seconds[name] = seconds.get(name, 0.0) + time.monotonic() - start
                params[name] = trainable_parameters(model)
                accuracy.setdefault(name, []).append(zero_shot_accuracy(model, tokenizer, test_px, test.labels, prompts))
        accuracy["zero-shot"] = [zero_shot]
        for name, accs in accuracy.items():
            rows.append({"data": settings.data, "shots": shots, "system": name, "accuracy": float(np.mean(accs)),
                         "per_seed": accs, "params": params[name], "seconds": seconds[name] / settings.seeds})
        log(f"{settings.data} {shots} shots: " + ", ".join(f"{n} {np.mean(a):.3f}" for n, a in accuracy.items()))
    return {"settings": dataclasses.asdict(settings), "zero_shot": zero_shot, "rows": rows}


def _default_testbed() -> Path:
    full = testbed_dir(quick=False)
    return full if full.is_dir() else testbed_dir(quick=True)
