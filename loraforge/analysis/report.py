"""The analysis report: report.md (tables + plots), report.json, three or four PNGs.

    report.json  {"total_intruders": N, "modules": {name: {"intruders": n, "effective_rank": ...}},
                  "counts_by_epsilon": [...], "compare": {label: {same keys}},
                  "subspace_similarity": {label: {name: phi}}, "k", "epsilon", "epsilons", ...}

The first source is the report's subject; the others (--compare) get their own entry under
"compare", a column in every table and a line in every plot. Spectra in the JSON keep the top
SPECTRUM_TOP singular values per matrix (the full ones of a 7B model would weigh ~30 MB).
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display: also on a headless server
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from loraforge.analysis.intruder_dims import count_intruders  # noqa: E402
from loraforge.analysis.model import ModuleAnalysis  # noqa: E402
from loraforge.analysis.spectra import numerical_rank  # noqa: E402
from loraforge.core.files import atomic_write_text  # noqa: E402

EPSILONS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # the sweep: 0.05, 0.10, ..., 0.95
SPECTRUM_TOP = 32
PLOT_TOP = 64  # singular values drawn per spectrum


def write_report(results: dict[str, dict[str, ModuleAnalysis]], out_dir: str | Path, k: int, epsilon: float,
                 similarity: dict[str, dict[str, float]] | None = None, model_name: str | None = None) -> dict[str, Any]:
    """Write the report of `results` ({source label: analyze() output}, subject first) to `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = list(results)
    summaries = {label: _summary(modules) for label, modules in results.items()}
    report = {"model": model_name, "adapter": labels[0], "k": k, "epsilon": epsilon, "epsilons": list(EPSILONS),
              **summaries[labels[0]],
              "compare": {label: summaries[label] for label in labels[1:]},
              "subspace_similarity": similarity or {}}
    plots = {"intruders_vs_epsilon.png": _plot_epsilon(summaries, epsilon),
             "intruders_per_layer.png": _plot_per_layer(results, k, epsilon),
             "spectra.png": _plot_spectra(results)}
    for name, fig in plots.items():
        tmp = out_dir / f".{name}.tmp-{os.getpid()}"
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        os.replace(tmp, out_dir / name)
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out_dir / "report.md", _markdown(results, summaries, report, list(plots)))
    return report


def _summary(modules: dict[str, ModuleAnalysis]) -> dict[str, Any]:
    per_module = {name: _module_json(m) for name, m in modules.items()}
    return {"total_intruders": sum(m["intruders"] for m in per_module.values()),
            "counts_by_epsilon": [sum(m["counts_by_epsilon"][i] for m in per_module.values()) for i in range(len(EPSILONS))],
            "modules": per_module}


def _module_json(m: ModuleAnalysis) -> dict[str, Any]:
    top = partial(_floats, limit=SPECTRUM_TOP)
    return {"shape": list(m.shape), "intruders": m.intruders.count, "intruder_indices": m.intruders.indices,
            "max_cosine": _floats(m.intruders.max_cosine),
            "counts_by_epsilon": [count_intruders(m.intruders.max_cosine, e) for e in EPSILONS],
            "effective_rank": round(m.effective_rank, 4), "update_norm": m.update_norm,
            "relative_update_norm": m.relative_norm if math.isfinite(m.relative_norm) else None,  # W0 = 0
            "spectra": {"base": top(m.intruders.base_spectrum), "tuned": top(m.intruders.tuned_spectrum),
                        "update": top(m.update_spectrum)}}


def _floats(values: torch.Tensor, limit: int | None = None) -> list[float]:
    return [round(float(v), 6) for v in values[:limit]]


def _layer_index(name: str) -> int | None:
    """model.layers.3.self_attn.q_proj -> 3 (the first numeric path component)."""
    return next((int(part) for part in name.split(".") if part.isdigit()), None)


def _plot_epsilon(summaries: dict[str, dict[str, Any]], epsilon: float) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, summary in summaries.items():
        ax.plot(EPSILONS, summary["counts_by_epsilon"], marker="o", label=label)
    ax.axvline(epsilon, color="grey", linestyle=":", label=f"epsilon = {epsilon}")
    ax.set(xlabel="epsilon (max |cosine| threshold)", ylabel="intruder dimensions (all modules)",
           title="Intruder count vs epsilon")
    ax.legend()
    return fig


def _plot_per_layer(results: dict[str, dict[str, ModuleAnalysis]], k: int, epsilon: float) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, modules in results.items():
        per_layer: dict[int, int] = defaultdict(int)
        for name, m in modules.items():
            index = _layer_index(name)
            if index is not None:
                per_layer[index] += m.intruders.count
        layers = sorted(per_layer)
        ax.plot(layers, [per_layer[i] for i in layers], marker="o", label=label)
    ax.set(xlabel="layer", ylabel="intruder dimensions (sum over modules)",
           title=f"Intruders per layer (k = {k}, epsilon = {epsilon})")
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    return fig


def _plot_spectra(results: dict[str, dict[str, ModuleAnalysis]]) -> plt.Figure:
    """One panel per layer type (q_proj, ...): spectra averaged over depth, W0 / W' / dW."""
    kinds = list(dict.fromkeys(name.rsplit(".", 1)[-1] for modules in results.values() for name in modules))
    cols = min(len(kinds), 4)
    rows = -(-len(kinds) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, kind in zip(axes.flat, kinds):
        for n, (label, modules) in enumerate(results.items()):
            group = [m for name, m in modules.items() if name.rsplit(".", 1)[-1] == kind]
            if not group:
                continue
            color = colors[n % len(colors)]
            if n == 0:
                ax.semilogy(_mean([m.intruders.base_spectrum for m in group]), color="black", label="W0")
            ax.semilogy(_mean([m.intruders.tuned_spectrum for m in group]), color=color, label=f"W' {label}")
            ax.semilogy(_mean([m.update_spectrum for m in group]), color=color, linestyle="--", label=f"dW {label}")
        ax.set(title=kind, xlabel="index")
    for ax in list(axes.flat)[len(kinds):]:
        ax.axis("off")
    axes.flat[0].set_ylabel("singular value (mean over layers)")
    axes.flat[0].legend(fontsize="small")
    fig.tight_layout()
    return fig


def _mean(spectra: list[torch.Tensor]) -> list[float]:
    """Mean of the top PLOT_TOP values; round-off (a rank-r update's tail) is left out, not drawn at 1e-7."""
    length = min(PLOT_TOP, *(s.numel() for s in spectra))
    rows = [torch.where(torch.arange(length) < numerical_rank(s), s[:length].float(), torch.nan) for s in spectra]
    return torch.stack(rows).nanmean(0).tolist()


def _markdown(results: dict[str, dict[str, ModuleAnalysis]], summaries: dict[str, dict[str, Any]],
              report: dict[str, Any], plots: list[str]) -> str:
    labels = list(results)
    k, epsilon = report["k"], report["epsilon"]
    lines = ["# Adapter analysis", "",
             f"Base model: `{report['model']}`. Intruder dimensions (arXiv 2410.21228): among the top k = {k} "
             f"left singular vectors of W' = W0 + dW, those whose max |cosine| with every singular vector of W0 "
             f"is below epsilon = {epsilon}. Effective rank: Roy & Vetterli's exp(entropy) of dW's spectrum.", "",
             "| source | modules | intruders | modules with intruders | mean effective rank of dW | mean ‖dW‖/‖W0‖ |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for label, modules in results.items():
        n = max(len(modules), 1)
        lines.append(f"| {label} | {len(modules)} | {summaries[label]['total_intruders']} | "
                     f"{sum(m.intruders.count > 0 for m in modules.values())} | "
                     f"{sum(m.effective_rank for m in modules.values()) / n:.2f} | "
                     f"{sum(m.relative_norm for m in modules.values()) / n:.4f} |")
    lines += ["", "## Intruders vs epsilon", "", "| epsilon | " + " | ".join(labels) + " |",
              "| ---: |" + " ---: |" * len(labels)]
    for i, e in enumerate(EPSILONS):
        lines.append(f"| {e:.2f} | " + " | ".join(str(summaries[lab]["counts_by_epsilon"][i]) for lab in labels) + " |")
    lines += [""] + [f"![{name[:-4]}]({name})" for name in plots] + ["", "## Modules", ""]
    header = ["module", "shape"] + [f"{col} ({lab})" for lab in labels for col in ("intruders", "erank", "‖dW‖/‖W0‖")]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * 2 + " ---: |" * (len(header) - 2)]
    for name in dict.fromkeys(n for modules in results.values() for n in modules):
        cells = [f"`{name}`", "x".join(map(str, next(r[name].shape for r in results.values() if name in r)))]
        for modules in results.values():
            m = modules.get(name)
            cells += [str(m.intruders.count), f"{m.effective_rank:.2f}", f"{m.relative_norm:.4f}"] if m else ["-"] * 3
        lines.append("| " + " | ".join(cells) + " |")
    if report["subspace_similarity"]:
        others = list(report["subspace_similarity"])
        lines += ["", f"## Subspace similarity with {labels[0]}", "",
                  "phi(dW1, dW2, i, i) = ‖U_i^T V_i‖²_F / i on the top-i right singular vectors of both updates "
                  "(LoRA paper, Sec. 7), i = the smaller numerical rank: 1 = same subspace, 0 = orthogonal.", "",
                  "| module | " + " | ".join(others) + " |", "| --- |" + " ---: |" * len(others)]
        names = dict.fromkeys(n for sims in report["subspace_similarity"].values() for n in sims)
        for name in names:
            lines.append(f"| `{name}` | " + " | ".join(
                f"{report['subspace_similarity'][o][name]:.3f}" if name in report["subspace_similarity"][o] else "-"
                for o in others) + " |")
    return "\n".join(lines) + "\n"
