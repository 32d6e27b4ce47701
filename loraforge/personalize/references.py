"""Reference images and subjects: files in, (N, S, S, 3) uint8 out, bad files named.

    SUBJECTS/
      <subject>/            one subject: a group of images sharing an identity
        *.png ...           any size or mode PIL reads; converted to RGB and resized to the model's S x S
        prompt.txt          the subject's prompt (default: "a character")

On the glyph testbed a subject is one character in one style (font + colour + weight), drawn with
the testbed's renderer at random size, shift, rotation and background: `glyph_subjects` writes
training subjects in the seen fonts and held-out ones in the held-out font (STIX).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from loraforge.core.errors import DataError, LoraforgeError
from loraforge.core.files import atomic_dir
from loraforge.vision.glyphs import BACKGROUNDS, CHARACTERS, COLOURS, FONTS, HELDOUT_FONT, WEIGHTS, render

DEFAULT_PROMPT = "a character"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
MAX_ASPECT = 1.5  # wider or taller than this is refused: resizing to a square would distort it


@dataclass
class Subject:
    name: str
    images: torch.Tensor  # (N, S, S, 3) uint8
    prompt: str
    attributes: dict[str, str]


def load_images(paths: list[str | Path], size: int) -> torch.Tensor:
    """Images as (N, size, size, 3) uint8: any mode converted to RGB, any size resized (bicubic);
    an unreadable file or one far from square is refused with its name."""
    if not paths:
        raise LoraforgeError("no reference images given")
    out = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
                if max(image.size) > MAX_ASPECT * min(image.size):
                    raise DataError(path, None, f"{image.size[0]}x{image.size[1]} is too far from square "
                                                f"(aspect above {MAX_ASPECT}); crop it to the subject first")
                rgb = image.convert("RGB")  # palette, grey, RGBA (alpha dropped), CMYK ...
                if rgb.size != (size, size):
                    rgb = rgb.resize((size, size), Image.BICUBIC)
                out.append(np.asarray(rgb))
        except (FileNotFoundError, IsADirectoryError):
            raise DataError(path, None, "no such image file") from None
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DataError(path, None, f"not an image PIL can read ({exc})") from None
    return torch.from_numpy(np.stack(out))


def read_subjects(folder: str | Path, size: int) -> list[Subject]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, None, "no such subjects folder")
    subjects = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(sub, None, "a subject folder with no images")
        prompt = (sub / "prompt.txt").read_text().strip() if (sub / "prompt.txt").is_file() else DEFAULT_PROMPT
        meta = sub / "attributes.json"
        attributes = json.loads(meta.read_text()) if meta.is_file() else {}
        subjects.append(Subject(sub.name, load_images(files, size), prompt, attributes))
    if not subjects:
        raise DataError(folder, None, "no subject sub-folders")
    return subjects


def glyph_subjects(out: str | Path, n: int, images: int, heldout: bool, seed: int, size: int = 16) -> list[Subject]:
    """`n` subjects of `images` glyphs each: a character, font, colour and weight fixed per subject,
    background, size, shift and rotation drawn per image. Written as a subjects folder to `out`."""
    rng = np.random.default_rng(seed)
    fonts = (HELDOUT_FONT,) if heldout else tuple(f for f in FONTS if f != HELDOUT_FONT)
    subjects = []
    with atomic_dir(out) as tmp:
        for i in range(n):
            style = {"char": str(rng.choice(CHARACTERS)), "font": str(rng.choice(fonts)),
                     "colour": str(rng.choice(list(COLOURS))), "weight": str(rng.choice(WEIGHTS))}
            drawn = []
            for _ in range(images):
                attrs = {**style, "background": str(rng.choice(list(BACKGROUNDS))),
                         "rotation": str(int(rng.integers(-15, 16)))}
                drawn.append(render(attrs, rng, size))
            name = f"{i:03d}-{style['char']}-{style['font']}-{style['colour']}-{style['weight']}"
            (tmp / name).mkdir()
            for k, image in enumerate(drawn):
                Image.fromarray(image).save(tmp / name / f"{k}.png")
            (tmp / name / "prompt.txt").write_text(DEFAULT_PROMPT + "\n")
            (tmp / name / "attributes.json").write_text(json.dumps(style) + "\n")
            subjects.append(Subject(name, torch.from_numpy(np.stack(drawn)), DEFAULT_PROMPT, style))
    return subjects
