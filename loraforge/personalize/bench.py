"""`loraforge bench personalize`: personalisation on held-out subjects of the glyph testbed.

Subjects: a character in one style (font + colour + weight), drawn at random size, shift, rotation and
background; training subjects in the seen fonts, held-out ones in the held-out font (STIX). Each system
sees the held-out subject's first `references` images (subject-lora: all `images_per_subject`):

    subject-lora        DreamBooth-style LoRA per subject on all its images (the tuning-based reference)
    hypernet            `hyper personalize` (encoder + H, one forward, written and read back as PEFT), plain CFG
    hypernet-hm-cfg     the same adapter sampled with Hybrid-Model CFG (w_c, w_s)
    easyref             EasyRef tokens of the references through the decoupled-attention adapter
    embedding-mean      the mean CLIP embedding through the same kind of adapter (IP-Adapter style)
    group-lora          LoRA per reference group, on the same references EasyRef reads
    subject-lora-decor  subject-lora sampled with DECOR removing the subject's colour word

Metrics with the testbed's CLIP, averaged over held-out subjects: subject_fidelity = mean cosine of the
samples' and the subject's image embeddings (CLIP-I) on the subject prompt; prompt_alignment = mean
cosine of samples and prompt (CLIP-T) on compositional prompts that change the colour or the background;
leakage = the CLIP's probability of the subject's own colour on the colour-changing prompt (the
attribute DECOR removes); seconds = wall time to personalise one subject (training of H and EasyRef
is shared and reported apart). `guidance_sweep`: the hypernet's adapter sampled at each plain-CFG weight
of `cfg_sweep` and each HM-CFG pair of `hm_cfg_sweep`, the same three figures: HM-CFG against plain CFG
as two trade-off curves (the row pair alone compares one point of each).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from loraforge.adapters.functional import rows_from_state
from loraforge.adapters.io import read_adapter
from loraforge.core.configs import opt
from loraforge.core.errors import LoraforgeError
from loraforge.core.files import atomic_write_text
from loraforge.personalize.decor import unwanted_basis, word_states
from loraforge.personalize.easyref import EasyRefConfig, TrainedEasyRef, train_easyref
from loraforge.personalize.hypernet import HyperConfig, TrainedHyper, train_hyper
from loraforge.personalize.references import Subject, glyph_subjects
from loraforge.personalize.sampling import Conditioning, generate, parse_hm_cfg, sheet
from loraforge.personalize.tuning import fit_lora
from loraforge.vision.clip import image_features, load_clip, pixels, text_features
from loraforge.vision.datadream import load_diffusion
from loraforge.vision.glyphs import BACKGROUNDS, COLOURS, testbed_dir

SYSTEMS = ("subject-lora", "hypernet", "hypernet-hm-cfg", "easyref", "embedding-mean", "group-lora", "subject-lora-decor")
ROW_KEYS = ("system", "subject_fidelity", "prompt_alignment", "leakage", "seconds")


@dataclass
class PersonalizeBench:
    quick: bool = opt(False, "the quick testbed and a smaller budget (under 20 minutes on 2 cores)")
    testbed: str = opt("", "testbed folder (default: the one `loraforge testbed build glyphs [--quick]` built)")
    json: str | None = opt(None, "also write the figures to this JSON file")
    train_subjects: int = opt(160, "training subjects of H and EasyRef (--quick: at most 64)")
    heldout_subjects: int = opt(8, "held-out subjects the figures average over (--quick: at most 4)")
    images_per_subject: int = opt(6, "images drawn per subject")
    references: int = opt(3, "reference images each tuning-free system reads")
    hyper_steps: int = opt(600, "hypernetwork training steps (--quick: at most 200)")
    easyref_steps: int = opt(300, "EasyRef steps per stage; embedding-mean gets both stages' total (--quick: <= 100)")
    lora_steps: int = opt(150, "steps of each per-subject / per-group LoRA (--quick: at most 80)")
    rank: int = opt(4, "LoRA rank of every adapter")
    samples: int = opt(8, "samples per prompt, system and subject (--quick: at most 4)")
    sample_steps: int = opt(25, "DDIM steps (--quick: at most 15)")
    guidance: float = opt(2.0, "plain classifier-free guidance")
    hm_cfg: str = opt("2,1", "Hybrid-Model CFG weights w_c,w_s of hypernet-hm-cfg (w_c = --guidance: the same prompt "
                             "guidance as plain CFG, the subject term on top)")
    cfg_sweep: str = opt("1,2,3,4", "plain CFG weights the hypernet adapter is also sampled at ('' to skip)")
    hm_cfg_sweep: str = opt("2,1 2,2 3,1 3,2", "Hybrid-Model CFG pairs w_c,w_s it is also sampled at ('' to skip)")
    decor_strength: float = opt(1.0, "DECOR's a for subject-lora-decor")
    seed: int = opt(0, "draws the subjects, seeds training and samples")

    def budget(self) -> "PersonalizeBench":
        if not self.quick:
            return self
        cap = {"train_subjects": 64, "heldout_subjects": 4, "hyper_steps": 200, "easyref_steps": 100, "lora_steps": 80,
               "samples": 4, "sample_steps": 15}
        return PersonalizeBench(**{**asdict(self), **{k: min(getattr(self, k), v) for k, v in cap.items()}})


def prompts_for(subject: Subject) -> dict[str, str]:
    """The subject prompt and two compositional ones: another colour, another background."""
    colours, backgrounds = list(COLOURS), list(BACKGROUNDS)
    other = colours[(colours.index(subject.attributes["colour"]) + 1) % len(colours)]
    return {"subject": subject.prompt, "colour": f"a {other} character",
            "background": f"a character on a {backgrounds[(subject_index(subject) % len(backgrounds))]} background"}


def subject_index(subject: Subject) -> int:
    return int(subject.name.split("-")[0])


class Judge:
    """The testbed CLIP's figures: CLIP-I, CLIP-T and the probability of a colour."""

    def __init__(self, clip_folder: Path):
        self.clip, self.processor, self.tokenizer = load_clip(clip_folder)
        self.colours = list(COLOURS)
        with torch.no_grad():
            self.colour_text = text_features(self.clip, self.tokenizer, [f"a {c} character" for c in self.colours])

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return image_features(self.clip, pixels(self.processor, images))

    @torch.no_grad()
    def fidelity(self, samples: torch.Tensor, references: torch.Tensor) -> float:
        return float((self.embed(samples) @ self.embed(references).T).mean())

    @torch.no_grad()
    def alignment(self, samples: torch.Tensor, prompt: str) -> float:
        return float((self.embed(samples) @ text_features(self.clip, self.tokenizer, [prompt]).T).mean())

    @torch.no_grad()
    def colour_probability(self, samples: torch.Tensor, colour: str) -> float:
        logits = self.clip.logit_scale.exp() * self.embed(samples) @ self.colour_text.T
        return float(logits.softmax(-1)[:, self.colours.index(colour)].mean())


def bench_personalize(bench: PersonalizeBench, sheet_path: Path | None = None,
                      log: Callable[[str], None] = print) -> dict[str, Any]:
    """Rows of {system, subject_fidelity, prompt_alignment, leakage, seconds}; a contact sheet where asked."""
    bench = bench.budget()
    testbed = Path(bench.testbed) if bench.testbed else testbed_dir(bench.quick)
    if not (testbed / "diffusion" / "unet").is_dir() or not (testbed / "clip").is_dir():
        raise LoraforgeError(f"{testbed}: no testbed; build it with `loraforge testbed build glyphs"
                             f"{' --quick' if bench.quick else ''}`")
    diffusion, clip_folder = testbed / "diffusion", testbed / "clip"
    w_c, w_s = parse_hm_cfg(bench.hm_cfg)
    cfg_weights = [parse_hm_cfg(f"{g},0")[0] for g in bench.cfg_sweep.replace(",", " ").split()]  # range-checked
    hm_pairs = [parse_hm_cfg(pair) for pair in bench.hm_cfg_sweep.split()]
    sweep: dict[tuple, list[dict[str, float]]] = {}
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-personalize-") as work:
        work = Path(work)
        train = glyph_subjects(work / "train", bench.train_subjects, bench.images_per_subject, False, bench.seed)
        heldout = glyph_subjects(work / "heldout", bench.heldout_subjects, bench.images_per_subject, True, bench.seed + 1)
        shared = {}
        t0 = time.monotonic()
        train_hyper(diffusion, clip_folder, train, work / "H", HyperConfig(rank=bench.rank, steps=bench.hyper_steps,
                                                                          seed=bench.seed), log)
        shared["hypernet_train_seconds"] = round(time.monotonic() - t0, 1)
        for kind in ("easyref", "mean"):
            t0 = time.monotonic()
            train_easyref(diffusion, clip_folder, train, work / kind,
                          EasyRefConfig(encoder=kind, align_steps=bench.easyref_steps, adapter_steps=bench.easyref_steps,
                                        references=bench.references, seed=bench.seed), log)
            shared[f"{kind}_train_seconds"] = round(time.monotonic() - t0, 1)
        hyper = TrainedHyper(work / "H")
        judge = Judge(clip_folder)
        per_system: dict[str, list[dict[str, float]]] = {s: [] for s in (*SYSTEMS, "base")}
        sheet_rows: list[torch.Tensor] = []
        for s in heldout:
            refs = s.images[: bench.references]
            prompts = prompts_for(s)
            runs = _personalise(s, refs, bench, work, diffusion, hyper, (w_c, w_s), log)
            for system, (condition, seconds, models) in runs.items():
                figures, samples = measure(judge, s, prompts, models, condition, bench.guidance, bench)
                per_system[system].append({**figures, "seconds": seconds})
                if s is heldout[0]:
                    sheet_rows.append(torch.cat([samples["subject"], samples["colour"]]))
                log(f"{s.name} {system}: " + " ".join(f"{k} {v:.3f}" for k, v in per_system[system][-1].items()))
            if s is heldout[0]:
                sheet_rows.insert(0, s.images)
            # the trade-off curves: plain CFG and HM-CFG at several weights; the rows' own points are reused
            plain, _, models = runs["hypernet"]
            sampled = {("cfg", bench.guidance): per_system["hypernet"][-1],
                       ("hm-cfg", (w_c, w_s)): per_system["hypernet-hm-cfg"][-1]}
            for key in [("cfg", g) for g in cfg_weights] + [("hm-cfg", pair) for pair in hm_pairs]:
                if key not in sampled:  # HM-CFG's weights replace the plain guidance
                    condition = plain if key[0] == "cfg" else Conditioning(adapter=plain.adapter, hm=key[1])
                    guidance = key[1] if key[0] == "cfg" else bench.guidance
                    sampled[key] = measure(judge, s, prompts, models, condition, guidance, bench)[0]
                sweep.setdefault(key, []).append(sampled[key])
    rows = [{"system": system, **_mean(per_system[system], ROW_KEYS[1:])} for system in SYSTEMS]
    result = {"rows": rows, "base": _mean(per_system["base"], ROW_KEYS[1:]), "guidance_sweep": [
                  {"sampling": kind, "weights": list(w) if kind == "hm-cfg" else [w], **_mean(got, ROW_KEYS[1:4])}
                  for (kind, w), got in sweep.items()],
              "training": shared, "targets": targets(rows),
              "sheet_rows": ["references", *runs], "minutes": round((time.monotonic() - start) / 60, 2),
              "config": asdict(bench)}
    if sheet_path is not None:
        sheet(sheet_rows).save(sheet_path)
    if bench.json:
        atomic_write_text(bench.json, json.dumps(result, indent=2) + "\n")
    return result


def _mean(records: list[dict[str, float]], keys: tuple[str, ...]) -> dict[str, float]:
    """Each key's mean over the held-out subjects, to 4 places."""
    return {k: round(sum(r[k] for r in records) / len(records), 4) for k in keys}


def measure(judge: Judge, s: Subject, prompts: dict[str, str], models: tuple, condition: Conditioning,
            guidance: float, bench: PersonalizeBench) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """One system on one subject: the three figures and the samples of each prompt."""
    unet, scheduler, text_encoder, tokenizer = models
    samples = {k: generate(unet, scheduler.config, text_encoder, tokenizer, p, bench.samples, condition,
                           guidance=guidance, steps=bench.sample_steps, seed=bench.seed) for k, p in prompts.items()}
    return {"subject_fidelity": judge.fidelity(samples["subject"], s.images),
            "prompt_alignment": (judge.alignment(samples["colour"], prompts["colour"])
                                 + judge.alignment(samples["background"], prompts["background"])) / 2,
            "leakage": judge.colour_probability(samples["colour"], s.attributes["colour"])}, samples


def _personalise(s: Subject, refs: torch.Tensor, bench: PersonalizeBench, work: Path, diffusion: Path,
                 hyper: TrainedHyper, hm: tuple[float, float], log: Callable[[str], None]) -> dict[str, tuple]:
    """Each system's (Conditioning, seconds to personalise, (unet, scheduler, text encoder, tokenizer))."""
    models = load_diffusion(diffusion)
    unet, scheduler, text_encoder, tokenizer = models
    runs: dict[str, tuple] = {"base": (Conditioning(), 0.0, models)}
    t0 = time.monotonic()
    subject_lora = fit_lora(unet, scheduler, text_encoder, tokenizer, s.images, s.prompt, bench.rank, bench.lora_steps,
                            seed=bench.seed)
    runs["subject-lora"] = (Conditioning(adapter=subject_lora), time.monotonic() - t0, models)
    out = work / "adapters" / s.name
    paths = sorted((work / "heldout" / s.name).glob("*.png"), key=lambda p: int(p.stem))[: bench.references]
    timing = hyper.personalize(paths, out, diffusion)
    config, _, state = read_adapter(out)
    adapter = rows_from_state(config, state, 1)
    runs["hypernet"] = (Conditioning(adapter=adapter), timing["seconds"], models)
    runs["hypernet-hm-cfg"] = (Conditioning(adapter=adapter, hm=hm), timing["seconds"], models)
    for system, folder in (("easyref", "easyref"), ("embedding-mean", "mean")):
        own = load_diffusion(diffusion)  # the decoupled attention is installed on its own UNet
        t0 = time.monotonic()
        tokens = TrainedEasyRef(work / folder, own[0], own[3], diffusion).tokens(refs)
        runs[system] = (Conditioning(reference_tokens=tokens), time.monotonic() - t0, own)
    t0 = time.monotonic()
    group = fit_lora(unet, scheduler, text_encoder, tokenizer, refs, EasyRefConfig().instruction, bench.rank,
                     bench.lora_steps, seed=bench.seed)
    runs["group-lora"] = (Conditioning(adapter=group), time.monotonic() - t0, models)
    t0 = time.monotonic()
    basis = unwanted_basis(word_states(text_encoder, tokenizer, [s.attributes["colour"]]))
    runs["subject-lora-decor"] = (Conditioning(adapter=subject_lora, decor_basis=basis,
                                               decor_strength=bench.decor_strength),
                                  runs["subject-lora"][1] + time.monotonic() - t0, models)
    log(f"{s.name}: personalised ({', '.join(f'{k} {v[1]:.2f}s' for k, v in runs.items())})")
    return {k: runs[k] for k in (*SYSTEMS, "base")}


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets, each with the figures it compares."""
    by = {r["system"]: r for r in rows}
    lora, hyper, hm = by["subject-lora"], by["hypernet"], by["hypernet-hm-cfg"]

    def against_lora(row: dict[str, Any]) -> tuple[float, float]:
        ratio = row["subject_fidelity"] / lora["subject_fidelity"] if lora["subject_fidelity"] else float("nan")
        return round(ratio, 4), round(row["prompt_alignment"] - lora["prompt_alignment"], 4)

    # judged with the spec's inference (one forward of H, then HM-CFG); plain CFG's figures beside it
    ratio, delta = against_lora(hm)
    plain_ratio, plain_delta = against_lora(hyper)
    return {
        "hypernet_under_1s": {"seconds": hyper["seconds"], "met": hyper["seconds"] < 1.0},
        "hypernet_fidelity_ratio": {"sampler": "hm-cfg", "ratio": ratio, "alignment_delta": delta,
                                    "plain_cfg_ratio": plain_ratio, "plain_cfg_alignment_delta": plain_delta,
                                    "met": ratio >= 0.8 and delta >= 0},
        "hm_cfg_raises_alignment": {"delta": round(hm["prompt_alignment"] - hyper["prompt_alignment"], 4),
                                    "met": hm["prompt_alignment"] > hyper["prompt_alignment"]},
        "decor_lowers_leakage": {"delta": round(by["subject-lora-decor"]["leakage"] - lora["leakage"], 4),
                                 "fidelity_cost": round(lora["subject_fidelity"] - by["subject-lora-decor"]["subject_fidelity"], 4),
                                 "met": by["subject-lora-decor"]["leakage"] < lora["leakage"]},
        "easyref_beats_mean": {"delta": round(by["easyref"]["subject_fidelity"] - by["embedding-mean"]["subject_fidelity"], 4),
                               "met": by["easyref"]["subject_fidelity"] > by["embedding-mean"]["subject_fidelity"]},
    }


def summary_table(result: dict[str, Any]) -> str:
    lines = ["| system | subject fidelity (CLIP-I) | prompt alignment (CLIP-T) | leakage | seconds |",
             "|---|---:|---:|---:|---:|"]
    for r in [*result["rows"], {"system": "base (no personalisation)", **result["base"]}]:
        lines.append(f"| {r['system']} | {r['subject_fidelity']:.4f} | {r['prompt_alignment']:.4f} | {r['leakage']:.4f} "
                     f"| {r['seconds']:.2f} |")
    lines.append("")
    if result.get("guidance_sweep"):
        lines += ["| hypernet sampled with | weights | subject fidelity | prompt alignment | leakage |", "|---|---|---:|---:|---:|"]
        lines += [f"| {r['sampling']} | {','.join(f'{w:g}' for w in r['weights'])} | {r['subject_fidelity']:.4f} "
                  f"| {r['prompt_alignment']:.4f} | {r['leakage']:.4f} |" for r in result["guidance_sweep"]]
        lines.append("")
    lines += [f"- {name}: " + ", ".join(f"{k} {v}" for k, v in t.items()) for name, t in result["targets"].items()]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any]):
    """Subject fidelity against prompt alignment, one point per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in [*result["rows"], {"system": "base", **result["base"]}]:
        ax.scatter(r["prompt_alignment"], r["subject_fidelity"])
        ax.annotate(r["system"], (r["prompt_alignment"], r["subject_fidelity"]), fontsize=8)
    for kind, style in (("cfg", "o--"), ("hm-cfg", "s:")):
        points = [r for r in result.get("guidance_sweep", []) if r["sampling"] == kind]
        if points:
            ax.plot([r["prompt_alignment"] for r in points], [r["subject_fidelity"] for r in points], style, alpha=0.5,
                    label=f"hypernet, {kind} at " + " ".join(",".join(f"{w:g}" for w in r["weights"]) for r in points))
    if result.get("guidance_sweep"):
        ax.legend(fontsize=7)
    ax.set_xlabel("prompt alignment (CLIP-T)")
    ax.set_ylabel("subject fidelity (CLIP-I)")
    ax.set_title("bench personalize: fidelity vs alignment")
    return fig
