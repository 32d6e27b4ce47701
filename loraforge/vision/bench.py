"""`loraforge bench vision`: CLIP few-shot on the testbed, every system on the same shots.

For the handwritten digits and the held-out glyph font, at 1/4/16 shots, seed-averaged: zero-shot,
linear probe, LoRA, Block-LoRA, Comp-LoRA and LoRA + GLAD (`fewshot.run_fewshot`), with trainable
parameter counts and seconds; DataDream and its ablation (synthetic images from the unadapted
diffusion model), their CLIP LoRA trained as the others on the same shots plus the generated images;
and the testbed's own sanity figures from its testbed.json.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from loraforge.core.configs import opt
from loraforge.core.errors import LoraforgeError
from loraforge.core.files import atomic_write_text
from loraforge.vision.datadream import DataDreamSettings, run_datadream
from loraforge.vision.fewshot import FewShotSettings, run_fewshot
from loraforge.vision.glyphs import testbed_dir

SYSTEMS = [("lora", ""), ("block-lora", ""), ("comp-lora", ""), ("lora", "glad")]
DATA = ("digits", "glyphs:font")
ROW_KEYS = ("data", "shots", "system", "accuracy", "params", "seconds")


@dataclass
class VisionBench:
    quick: bool = opt(False, "the quick testbed (testbed build glyphs --quick), 2 seeds, 400 test images")
    testbed: str = opt("", "testbed folder (default: the one `loraforge testbed build glyphs [--quick]` built)")
    json: str | None = opt(None, "also write the figures to this JSON file")
    shots: str = opt("1,4,16", "shot counts per class")
    seeds: int = opt(3, "seeds averaged per shot count (--quick: at most 2)")
    steps_per_shot: int = opt(25, "optimizer steps per shot for every adapter")
    lr: float = opt(5e-3, "AdamW learning rate for every CLIP adapter")
    images_per_class: int = opt(20, "DataDream's generated images per class (--quick: at most 10)")
    unet_steps: int = opt(200, "DataDream's diffusion LoRA steps")
    sample_steps: int = opt(25, "DataDream's DDIM steps per generated image")
    out: str = opt("runs/bench-vision", "where DataDream's adapters, contact sheets and reports go")


def bench_vision(bench: VisionBench, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Rows of (data, shots, system, accuracy, params, seconds) and the testbed's figures."""
    testbed = Path(bench.testbed) if bench.testbed else testbed_dir(bench.quick)
    if not (testbed / "testbed.json").is_file():
        raise LoraforgeError(f"{testbed}: no testbed; build it with `loraforge testbed build glyphs"
                             f"{' --quick' if bench.quick else ''}`")
    built = json.loads((testbed / "testbed.json").read_text())
    rows = []
    for data in DATA:
        settings = FewShotSettings(clip=str(testbed / "clip"), data=data, testbed=str(testbed), shots=bench.shots,
                                   seeds=min(bench.seeds, 2) if bench.quick else bench.seeds, lr=bench.lr,
                                   steps_per_shot=bench.steps_per_shot, test_limit=400 if bench.quick else 0)
        for row in run_fewshot(settings, SYSTEMS, log)["rows"]:
            rows.append({k: row[k] for k in ROW_KEYS})
        rows += datadream_rows(bench, testbed, data, log)
    result = {"rows": rows, "testbed": {"clip_zero_shot": built["clip_zero_shot"],
                                        "diffusion_clip_agreement": built["diffusion_clip_agreement"]},
              "config": asdict(bench)}
    if bench.json:
        atomic_write_text(bench.json, json.dumps(result, indent=2) + "\n")
    return result


def datadream_out(out: str | Path, system: str, data: str, shots: int) -> Path:
    """The folder of one DataDream run of the bench: adapters, contact sheet, report."""
    return Path(out) / f"{system}-{data.replace(':', '-')}-{shots}"


def datadream_rows(bench: VisionBench, testbed: Path, data: str, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """DataDream and DataDream on the unadapted model, one seed (the generation is the cost)."""
    rows = []
    for shots in (int(s) for s in bench.shots.split(",") if s):
        for system, unadapted in (("datadream", False), ("datadream-unadapted", True)):
            settings = DataDreamSettings(
                diffusion=str(testbed / "diffusion"), clip=str(testbed / "clip"), data=data, testbed=str(testbed),
                shots=shots, images_per_class=min(bench.images_per_class, 10) if bench.quick else bench.images_per_class,
                unadapted=unadapted, unet_steps=bench.unet_steps, sample_steps=bench.sample_steps, clip_steps_per_shot=bench.steps_per_shot,
                clip_lr=bench.lr, out=str(datadream_out(bench.out, system, data, shots)))
            report = run_datadream(settings, log)
            params = sum(report["diffusion_adapter_params"].values())
            rows.append({"data": data, "shots": shots, "system": system, "accuracy": report["accuracy"],
                         "params": params, "seconds": report["seconds"]})
    return rows


def summary_table(result: dict[str, Any]) -> str:
    """A markdown table: one row per (data, shots), one column per system (accuracy), then parameters."""
    systems = list(dict.fromkeys(r["system"] for r in result["rows"]))
    cells: dict[tuple[str, int], dict[str, float]] = {}
    params: dict[str, int] = {}
    for r in result["rows"]:
        cells.setdefault((r["data"], r["shots"]), {})[r["system"]] = r["accuracy"]
        params[r["system"]] = r["params"]
    lines = ["| data | shots | " + " | ".join(systems) + " |", "|---|---:|" + "---:|" * len(systems)]
    lines += [f"| {data} | {shots} | " + " | ".join(f"{acc.get(s, float('nan')):.3f}" for s in systems) + " |"
              for (data, shots), acc in cells.items()]
    lines.append("| trainable parameters | | " + " | ".join(f"{params[s]:,}" for s in systems) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any]):
    """Accuracy against shots per class, one panel per data set, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = list(dict.fromkeys(r["data"] for r in result["rows"]))
    fig, axes = plt.subplots(1, len(data), figsize=(6 * len(data), 4), squeeze=False)
    for ax, name in zip(axes.flat, data):
        rows = [r for r in result["rows"] if r["data"] == name]
        for system in dict.fromkeys(r["system"] for r in rows):
            points = sorted((r["shots"], r["accuracy"]) for r in rows if r["system"] == system)
            ax.plot(*zip(*points), "o-" if system.startswith("datadream") else ".-", label=system)
        ax.set(xscale="log", xlabel="shots per class", ylabel="test accuracy", title=name, ylim=(0, 1))
        ax.legend(fontsize=7)
    return fig


def contact_sheet_path(result: dict[str, Any], data: str = "digits") -> Path | None:
    """DataDream's contact sheet (real shots, then generated images, per class) at the most shots on `data`."""
    shots = max((r["shots"] for r in result["rows"] if r["data"] == data and r["system"] == "datadream"), default=None)
    if shots is None:
        return None
    path = datadream_out(result["config"]["out"], "datadream", data, shots) / "contact_sheet.png"
    return path if path.is_file() else None
