"""The glyph data set and the handwritten-digit domain: small captioned images, deterministic from a seed.

A glyph is one character drawn with a font that ships with matplotlib (DejaVu Sans / Serif / Mono,
STIX), regular or bold, in a colour on a background, at a random size, shift and rotation, rendered
4x larger with PIL and box-downsampled to `size` x `size` (anti-aliased edges):

    "a red bold letter K on a grey background"        (the full caption; training drops words at random)

Splits: `train` and `test` draw from the same attributes; `heldout_font` uses a font never seen in
training (STIX), the shifted domain `glyphs:font` of the few-shot benchmark (split in halves there,
so it holds at least 64 glyphs a class: a 16-shot pool in each half). The handwritten digits
of scikit-learn's `load_digits` (1,797 8x8 images, shipped inside the package) are the other shift:
`digits()` paints them in the glyph style (a palette colour on a grey background, upsampled to the
glyph size), so only the shapes differ.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import load_file, save_file

from loraforge.core.errors import LoraforgeError
from loraforge.core.files import atomic_dir
from loraforge.core.models import cache_dir

# Digits first: the shifted domain is digits, and the few-shot classes are their names.
CHARACTERS = tuple("0123456789") + tuple("AEHKMRSTXZ")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40),
           "white": (245, 245, 245), "magenta": (210, 50, 200)}
BACKGROUNDS = {"grey": (110, 110, 110), "black": (15, 15, 15)}
WEIGHTS = ("regular", "bold")
# family -> (regular file, bold file) in matplotlib's mpl-data/fonts/ttf
FONTS = {"sans": ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf"), "serif": ("DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf"),
         "mono": ("DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf"), "stix": ("STIXGeneral.ttf", "STIXGeneralBol.ttf")}
HELDOUT_FONT = "stix"
SPLIT_FILE = "{split}.safetensors"
META_FILE = "glyphs.json"


@dataclass
class ImageSet:
    """Images (N, H, W, 3) uint8 with class labels, the class names, and per-image attributes."""

    images: torch.Tensor
    labels: torch.Tensor  # (N,) int64 into `classes`
    classes: list[str]
    attributes: list[dict[str, str]]

    def subset(self, index: torch.Tensor | list[int]) -> "ImageSet":
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageSet(self.images[index], self.labels[index], self.classes, [self.attributes[i] for i in index.tolist()])

    def __len__(self) -> int:
        return len(self.labels)


def signed_pixels(images: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]: the diffusion models' and the CNN judge's input."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1


def uint8_pixels(x: torch.Tensor) -> torch.Tensor:
    """signed_pixels' inverse for a sampler's output: (N, 3, H, W) in [-1, 1] (clamped) -> (N, H, W, 3) uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def colour_labels(data: ImageSet) -> torch.Tensor:
    """(N,) int64 index of each image's colour into COLOURS."""
    return torch.tensor([list(COLOURS).index(a["colour"]) for a in data.attributes])


def testbed_dir(quick: bool) -> Path:
    """Where `loraforge testbed build glyphs` keeps the testbed: under the user cache (core.models)."""
    return Path(cache_dir()) / "testbed" / ("glyphs-quick" if quick else "glyphs")


def class_name(char: str) -> str:
    return f"digit {char}" if char.isdigit() else f"letter {char}"


def caption(attrs: dict[str, str], keep: dict[str, bool] | None = None) -> str:
    """The caption of a glyph; `keep` drops attributes (colour, weight, char, background) from it."""
    keep = keep or {}
    words = ["a"]
    if keep.get("colour", True):
        words.append(attrs["colour"])
    if keep.get("weight", True) and attrs["weight"] == "bold":
        words.append("bold")
    words.append(class_name(attrs["char"]) if keep.get("char", True) else "character")
    if keep.get("background", True):
        words.append(f"on a {attrs['background']} background")
    return " ".join(words)


def font_dir() -> Path:
    import matplotlib

    return Path(os.path.dirname(matplotlib.__file__)) / "mpl-data" / "fonts" / "ttf"


def render(attrs: dict[str, str], rng: np.random.Generator, size: int = 16, scale: int = 4) -> np.ndarray:
    """One glyph as (size, size, 3) uint8: drawn at `scale` x the size, rotated, box-downsampled."""
    big = size * scale
    background = BACKGROUNDS[attrs["background"]]
    font_file = FONTS[attrs["font"]][WEIGHTS.index(attrs["weight"])]
    font = ImageFont.truetype(str(font_dir() / font_file), int(big * rng.uniform(0.6, 0.8)))
    canvas = Image.new("RGB", (big, big), background)
    centre = big / 2 + rng.uniform(-0.06, 0.06, size=2) * big
    ImageDraw.Draw(canvas).text(tuple(centre), attrs["char"], fill=COLOURS[attrs["colour"]], font=font, anchor="mm")
    canvas = canvas.rotate(float(attrs["rotation"]), resample=Image.BICUBIC, fillcolor=background)
    return np.asarray(canvas.resize((size, size), Image.BOX))


def sample_attributes(rng: np.random.Generator, fonts: tuple[str, ...]) -> dict[str, str]:
    return {"char": str(rng.choice(CHARACTERS)), "colour": str(rng.choice(list(COLOURS))),
            "weight": str(rng.choice(WEIGHTS)), "background": str(rng.choice(list(BACKGROUNDS))),
            "font": str(rng.choice(fonts)), "rotation": str(int(rng.integers(-20, 21)))}


def make_split(n: int, fonts: tuple[str, ...], seed: int, size: int = 16) -> ImageSet:
    rng = np.random.default_rng(seed)
    attributes = [sample_attributes(rng, fonts) for _ in range(n)]
    images = np.stack([render(a, rng, size) for a in attributes]) if n else np.zeros((0, size, size, 3), np.uint8)
    labels = torch.tensor([CHARACTERS.index(a["char"]) for a in attributes], dtype=torch.long)
    return ImageSet(torch.from_numpy(images), labels, [class_name(c) for c in CHARACTERS], attributes)


def build_glyphs(out: str | Path, n_train: int, n_test: int, n_heldout: int, seed: int = 0,
                 size: int = 16) -> dict[str, ImageSet]:
    """Render the three splits and write them to `out` (one safetensors file each + glyphs.json)."""
    seen = tuple(f for f in FONTS if f != HELDOUT_FONT)
    splits = {"train": make_split(n_train, seen, seed, size), "test": make_split(n_test, seen, seed + 1, size),
              "heldout_font": make_split(n_heldout, (HELDOUT_FONT,), seed + 2, size)}
    meta = {"classes": splits["train"].classes, "size": size, "seed": seed, "heldout_font": HELDOUT_FONT,
            "attributes": {name: s.attributes for name, s in splits.items()}}
    with atomic_dir(out) as tmp:
        for name, s in splits.items():
            save_file({"images": s.images.contiguous(), "labels": s.labels}, str(tmp / SPLIT_FILE.format(split=name)))
        (tmp / META_FILE).write_text(json.dumps(meta) + "\n")
    return splits


def load_glyphs(folder: str | Path, split: str) -> ImageSet:
    folder = Path(folder)
    path = folder / SPLIT_FILE.format(split=split)
    if not path.is_file() or not (folder / META_FILE).is_file():
        raise LoraforgeError(f"{folder}: no glyph split {split!r} (build it with `loraforge testbed build glyphs`)")
    meta = json.loads((folder / META_FILE).read_text())
    tensors = load_file(str(path))
    return ImageSet(tensors["images"], tensors["labels"], meta["classes"], meta["attributes"][split])


def digits(size: int = 16, seed: int = 0) -> ImageSet:
    """scikit-learn's handwritten digits in the glyph style: a palette colour on the grey background."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise LoraforgeError("--data digits needs scikit-learn: pip install 'loraforge[vision]'") from exc
    data = load_digits()
    rng = np.random.default_rng(seed)
    # 8x8 -> a (size - 2*margin) square in the centre, as a glyph fills its image
    inner = size - 2 * max(1, size // 8)
    ink = torch.nn.functional.interpolate(torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0,
                                          size=(inner, inner), mode="bilinear", align_corners=False)
    pad = (size - inner) // 2
    ink = torch.nn.functional.pad(ink, (pad, size - inner - pad, pad, size - inner - pad)).clamp(0, 1)  # (N,1,s,s)
    colours = list(COLOURS)
    names = [colours[i] for i in rng.integers(0, len(colours), len(ink))]
    fg = torch.tensor([COLOURS[c] for c in names], dtype=torch.float32)[:, :, None, None]  # (N,3,1,1)
    bg = torch.tensor(BACKGROUNDS["grey"], dtype=torch.float32)[None, :, None, None]
    images = (bg * (1 - ink) + fg * ink).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()  # (N,s,s,3)
    labels = torch.tensor(data.target, dtype=torch.long)
    attributes = [{"char": str(t), "colour": c, "weight": "regular", "background": "grey", "font": "handwritten"}
                  for t, c in zip(data.target.tolist(), names)]
    return ImageSet(images, labels, [class_name(str(d)) for d in range(10)], attributes)
