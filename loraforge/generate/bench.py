"""`bench generate`: every way of getting an adapter for a task nothing was trained on, side by side.

    OUT/zoo                  the zoo (offset + labels; built, or reused task by task)
    OUT/oracle               one LoRA per held-out task, trained on its own data (the oracle; same recipe)
    OUT/multitask/<family>   one LoRA trained on all of the family's zoo tasks at once
    OUT/generators/<kind>    icm-lora, sg-lora, hypernet: ready for `loraforge generator sample`
    OUT/meta                 the ABMLL prior
    OUT/adapters/<task>/<system>   every adapter scored

For each held-out task: exact match (offset) or accuracy + ECE (labels) of base, oracle, nearest (the zoo
adapter of the nearest value; for labels, of the most similar description), zoo-average (delta W of the
family's zoo adapters, averaged exactly), icm-lora (from `examples` examples), sg-lora and hypernet (from
the description), abmll (adapted on the same examples, S weight samples), multitask-lora, few-shot
(the base model after `few_shot` example turns), and `<kind>:random` for each description-conditioned
generator given a random string as long as the description (the description must matter). Also the
cosine between each generated delta W and the oracle's, seconds to get each adapter, generator sizes.

A killed run resumes: the zoo and the oracles task by task (zoo.py), the multi-task LoRAs, generators and
prior when OUT/stages.json records them done with the same settings (it keeps their seconds too).
"""

from __future__ import annotations

import dataclasses
import json
import random
import string
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from loraforge.adapters.inject import detach
from loraforge.adapters.io import load_adapter, read_adapter
from loraforge.core.config import read_adapter_config
from loraforge.core.configs import opt
from loraforge.core.files import atomic_write_text, write_jsonl
from loraforge.generate.abmll import ABMLLConfig, detach_bayes, set_mode
from loraforge.generate.calibration import accuracy_and_ece, label_probs
from loraforge.generate.conditions import embed_texts, load_text_encoder
from loraforge.generate.cvae import REFERENCE_CHANNELS, CVAEConfig
from loraforge.generate.families import LABEL_PAIRS, LABEL_PAIRS_HELD_OUT, OFFSET_HELD_OUT, OFFSET_ZOO
from loraforge.generate.flat import read_states, write_merged
from loraforge.generate.generator import write_generated
from loraforge.generate.hypernet import Hypernet, HypernetConfig, train_hypernet
from loraforge.generate.icm_lora import ICMLoRA, ICMLoRAConfig, train_icm_lora
from loraforge.generate.meta import adapt_meta, train_meta
from loraforge.generate.sg_lora import SGLoRA, SGLoRAConfig, train_sg_lora
from loraforge.generate.zoo import Zoo, ZooConfig, ZooTask, build_zoo, load_zoo
from loraforge.training.data import read_rows
from loraforge.training.evaluate import generate

QUICK_OFFSET, QUICK_OFFSET_HELD_OUT = (2, 4, 6, 8, 10, 12, 14, 16, 18, 20), (7, 13)
# --quick's CVAE: ten stride-2 blocks at half the reference's widths, batches of 8. The reference's twelve
# blocks run 5.4 s a step of 16 over a 230,400-long adapter on 2 cores, these 0.7 s a step of 8 (2026-12-06):
# most of a step is the first and last blocks, at full length, whatever the middle's width.
QUICK_CHANNELS = (4, 8, 16, 32, 64, 64, 32, 16, 8, 4)
QUICK_PAIRS, QUICK_PAIRS_HELD_OUT = LABEL_PAIRS[:4], LABEL_PAIRS_HELD_OUT[:2]
GENERATORS = ("icm-lora", "sg-lora", "hypernet")


@dataclass
class GenerateBench:
    model: str = opt("smollm2-135m", "base model: embedded name or local Hugging Face folder")
    out: str = opt("runs/bench-generate", "where the zoo, oracles, generators, prior and adapters go")
    json: str | None = opt(None, "also write the figures to this JSON file")
    quick: bool = opt(False, "offset k in 2..20 step 2 (held out 7, 13), 4 training label pairs (2 held out); "
                             "at most 40 steps a LoRA, 2 checkpoints, 50 test rows, 60 hypernetwork steps, 12 ABMLL "
                             "meta steps (each is 24 passes of 8 rows), 120 CVAE steps of 8 on QUICK_CHANNELS where "
                             "--channels is the reference's: under 45 minutes on 2 cores")
    data: str | None = opt(None, "folder holding sst2/train.tsv; default $LORAFORGE_DATA")
    offset_values: str | None = opt(None, "comma-separated zoo offsets (default: the standard or quick zoo)")
    offset_held_out: str | None = opt(None, "comma-separated held-out offsets")
    label_pairs: str | None = opt(None, "comma-separated zoo label pairs POS/NEG")
    label_held_out: str | None = opt(None, "comma-separated held-out label pairs")
    steps: int = opt(150, "LoRA steps per zoo task, oracle and multi-task LoRA")
    checkpoints: int = opt(5, "checkpoints kept per zoo task")
    rank: int = opt(4, "LoRA rank")
    n_train: int = opt(600, "training rows per task")
    n_test: int = opt(100, "test rows per task (scored)")
    cvae_steps: int = opt(2000, "CVAE steps (icm-lora, sg-lora)")
    cvae_batch: int = opt(16, "flat adapters a CVAE step reads")
    channels: str = opt(",".join(map(str, REFERENCE_CHANNELS)), "CVAE encoder channels")
    hypernet_steps: int = opt(300, "hypernetwork steps")
    meta_steps: int = opt(200, "ABMLL meta steps")
    examples: int = opt(8, "examples an example-conditioned system sees (icm-lora, abmll)")
    few_shot: int = opt(4, "example turns before the question (few-shot)")
    seed: int = opt(0, "seeds every stage")

    def resolved(self) -> "GenerateBench":
        """The settings a run uses: --quick caps every stage. Its first complete run (60 LoRA steps, 100
        hypernetwork, 20 ABMLL, 200 CVAE) took 56.5 minutes on 2 cores (2026-12-06): 30 in the 20 LoRA
        runs (1.06 s a step of offset rows, 1.6 s of SST-2 rows), 10 in ABMLL, 7 in the hypernetwork."""
        if not self.quick:
            return self
        reference = self.channels == ",".join(map(str, REFERENCE_CHANNELS))
        return dataclasses.replace(self, steps=min(self.steps, 40), checkpoints=min(self.checkpoints, 2),
                                   n_test=min(self.n_test, 50), hypernet_steps=min(self.hypernet_steps, 60),
                                   meta_steps=min(self.meta_steps, 12), cvae_steps=min(self.cvae_steps, 120),
                                   cvae_batch=min(self.cvae_batch, 8),
                                   channels=",".join(map(str, QUICK_CHANNELS)) if reference else self.channels)

    def values(self, family: str) -> tuple[list[str], list[str]]:
        """(zoo values, held-out values) of a family."""
        if family == "offset":
            zoo, held = (QUICK_OFFSET, QUICK_OFFSET_HELD_OUT) if self.quick else (OFFSET_ZOO, OFFSET_HELD_OUT)
            given = (self.offset_values, self.offset_held_out)
        else:
            zoo, held = (QUICK_PAIRS, QUICK_PAIRS_HELD_OUT) if self.quick else (LABEL_PAIRS, LABEL_PAIRS_HELD_OUT)
            given = (self.label_pairs, self.label_held_out)
        return [g.split(",") if g else [str(v) for v in d] for g, d in zip(given, (zoo, held))]


def bench_generate(bench: GenerateBench, progress: bool = True) -> dict[str, Any]:
    """Run the benchmark; the figures (also in bench.json when given) as the issue's JSON keys."""
    from loraforge.core.models import default_device, load_model

    bench = bench.resolved()
    out = Path(bench.out)
    zoo_config = ZooConfig(family="offset", values=[], model=bench.model, out=str(out / "zoo"), steps=bench.steps,
                           checkpoints=bench.checkpoints, rank=bench.rank, n_train=bench.n_train, n_test=bench.n_test,
                           data=bench.data, seed=bench.seed)
    oracle_config = dataclasses.replace(zoo_config, out=str(out / "oracle"), checkpoints=1)
    stages = Stages(out)
    oracle_seconds = 0.0  # training the held-out tasks' own LoRAs
    for family in ("offset", "labels"):
        zoo_values, held_out = bench.values(family)
        build_zoo(dataclasses.replace(zoo_config, family=family, values=zoo_values), progress=progress)
        config = dataclasses.replace(oracle_config, family=family, values=held_out)
        recipe = {k: v for k, v in dataclasses.asdict(config).items() if k != "out"}  # OUT may be spelt another way
        oracle_seconds += stages.run(f"oracle-{family}", recipe, out / "oracle" / "index.json",
                                     lambda: build_zoo(config, progress=progress))
    zoo, oracles = load_zoo(out / "zoo"), load_zoo(out / "oracle")
    seconds = {"oracle": oracle_seconds / len(oracles.tasks)}
    model, tokenizer = load_model(bench.model, task="causal-lm")
    model.to(default_device())
    multitask = {family: _multitask(zoo, family, zoo_config, model, tokenizer, out, progress)
                 for family in ("offset", "labels")}
    encoder = load_text_encoder()
    generators = _train_generators(bench, zoo, model, tokenizer, encoder, out, stages, progress)
    meta, meta_config = out / "meta", ABMLLConfig(rank=bench.rank, meta_steps=bench.meta_steps, seed=bench.seed)

    def meta_train() -> None:
        train_meta(zoo, meta, meta_config, model=model, tokenizer=tokenizer, progress=progress)
        detach_bayes(model, zoo.targets)  # the model goes on without the prior's layers

    train_seconds = stages.run("abmll", {"config": dataclasses.asdict(meta_config), "tasks": [t.id for t in zoo.tasks]},
                               meta / "meta.json", meta_train)
    generators["abmll"] = {"train_seconds": train_seconds, "bytes": _bytes(meta)}

    loaded = {"icm-lora": ICMLoRA.load(out / "generators" / "icm-lora"),
              "sg-lora": SGLoRA.load(out / "generators" / "sg-lora", encoder=encoder),
              "hypernet": Hypernet.load(out / "generators" / "hypernet", encoder=encoder)}
    tasks = []
    for held in oracles.tasks:
        scores, cosine = _score_task(bench, held, zoo, multitask, loaded, meta, model, tokenizer, encoder, out,
                                     seconds)
        tasks.append({"family": held.family, "value": held.value, "scores": scores, "cosine_to_oracle": cosine})
    zoo_bytes = sum(_bytes(Path(a)) for t in zoo.tasks for a in t.adapters)
    result = {"tasks": tasks, "generators": {**generators, "zoo_bytes": zoo_bytes},
              "adapt_seconds": seconds, "config": dataclasses.asdict(bench)}
    if bench.json:
        atomic_write_text(bench.json, json.dumps(result, indent=2) + "\n")
    return result


def summary_table(result: dict[str, Any]) -> str:
    """Markdown tables, one row per held-out task: each system's exact match (or accuracy / ECE), then the
    cosine of its delta W to the oracle's; then each generator's size against the zoo's, its training
    seconds and seconds to adapt to one task."""
    lines = []
    for key, title in (("scores", "exact match, or accuracy / ECE"), ("cosine_to_oracle", "cosine of delta W to the oracle's")):
        systems = list(result["tasks"][0][key]) if result["tasks"] else []
        lines += [f"| task: {title} | " + " | ".join(systems) + " |", "|---|" + "---:|" * len(systems)]
        for task in result["tasks"]:
            lines.append(f"| {task['family']} {task['value']} | " + " | ".join(map(_cell, task[key].values())) + " |")
        lines.append("")
    sizes, adapt = result["generators"], result["adapt_seconds"]
    lines += ["| generator | bytes | x zoo | train s | adapt s |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {kind} | {v['bytes']:,} | {v['bytes'] / sizes['zoo_bytes']:.3f} | {v['train_seconds']:.0f} | "
              f"{adapt[kind]:.3f} |" for kind, v in sizes.items() if kind != "zoo_bytes"]
    lines.append(f"| oracle (trains a LoRA) | | | | {adapt['oracle']:.0f} |")
    return "\n".join(lines) + "\n"


def _cell(value: float | dict[str, float]) -> str:
    """A cosine, an exact match, or accuracy / ECE."""
    if not isinstance(value, dict):
        return f"{value:.2f}"
    return f"{value['exact_match']:.2f}" if "exact_match" in value else f"{value['accuracy']:.2f} / {value['ece']:.2f}"


def plot(result: dict[str, Any]):
    """Four panels, one row per system, one marker per held-out task: exact match (offset), accuracy and ECE
    (labels), and the cosine of each generated delta W to the oracle's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(result["tasks"][0]["scores"]) if result["tasks"] else []
    panels = (("offset", "exact_match", "offset: exact match"), ("labels", "accuracy", "labels: accuracy"),
              ("labels", "ece", "labels: ECE (lower is better)"), (None, "cosine", "cosine of delta W to the oracle's"))
    fig, axes = plt.subplots(1, 4, figsize=(14, 0.3 * len(systems) + 1.5), sharey=True)
    for ax, (family, key, title) in zip(axes, panels):
        for n, task in enumerate(result["tasks"]):  # one colour per task in every panel
            if family not in (None, task["family"]):
                continue
            values = task["cosine_to_oracle"] if key == "cosine" else {s: v[key] for s, v in task["scores"].items()}
            points = [(v, systems.index(s)) for s, v in values.items() if s in systems]
            ax.scatter(*zip(*points), s=18, color=f"C{n}", label=f"{task['family']} {task['value']}")
        ax.set_title(title, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=6)
    axes[0].set_yticks(range(len(systems)), systems, fontsize=8)
    axes[0].invert_yaxis()
    return fig


class Stages:
    """OUT/stages.json: each finished stage's settings and seconds. A rerun (a killed run resumed) skips a
    stage recorded with the same settings whose output is there, and still reports what it cost."""

    def __init__(self, out: Path):
        self.path = out / "stages.json"
        self.done = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def run(self, name: str, settings: dict[str, Any], output: Path, work: Callable[[], object]) -> float:
        """Seconds of stage `name`: `work()` timed, or the recorded figure when it is done already."""
        settings = json.loads(json.dumps(settings))  # as stored: tuples are lists
        entry = self.done.get(name)
        if entry is not None and entry["settings"] == settings and output.exists():
            return entry["seconds"]
        t0 = time.perf_counter()
        work()
        self.done[name] = {"settings": settings, "seconds": time.perf_counter() - t0}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self.done, indent=2) + "\n")
        return self.done[name]["seconds"]


def _train_generators(bench: GenerateBench, zoo: Zoo, model: Any, tokenizer: Any, encoder: Any, out: Path,
                      stages: Stages, progress: bool) -> dict[str, dict[str, float]]:
    cvae = CVAEConfig(channels=tuple(int(c) for c in bench.channels.split(",")), steps=bench.cvae_steps,
                      batch_size=bench.cvae_batch, seed=bench.seed)
    configs = {"icm-lora": ICMLoRAConfig(cvae=cvae, seed=bench.seed), "sg-lora": SGLoRAConfig(cvae=cvae, seed=bench.seed),
               "hypernet": HypernetConfig(steps=bench.hypernet_steps, seed=bench.seed)}
    trainers = {
        "icm-lora": lambda p: train_icm_lora(zoo, p, configs["icm-lora"], model, tokenizer, progress),
        "sg-lora": lambda p: train_sg_lora(zoo, p, configs["sg-lora"], encoder, progress),
        "hypernet": lambda p: train_hypernet(zoo, p, configs["hypernet"], model, tokenizer, encoder, progress),
    }
    sizes = {}
    for kind, trainer in trainers.items():
        path = out / "generators" / kind
        settings = {"config": dataclasses.asdict(configs[kind]), "tasks": [t.id for t in zoo.tasks]}
        seconds = stages.run(kind, settings, path / "generator.json", lambda: trainer(path))
        sizes[kind] = {"train_seconds": seconds, "bytes": _bytes(path / "generator.safetensors")}
    return sizes


def _multitask(zoo: Zoo, family: str, config: ZooConfig, model: Any, tokenizer: Any, out: Path,
               progress: bool) -> str:
    from loraforge.training.config import TrainConfig
    from loraforge.training.loop import train

    folder = out / "multitask" / family
    if (folder / "adapter" / "adapter_config.json").is_file():
        return str(folder / "adapter")
    folder.mkdir(parents=True, exist_ok=True)
    lines = [line for t in zoo.family(family) for line in Path(t.train).read_text().splitlines() if line.strip()]
    random.Random(config.seed).shuffle(lines)
    atomic_write_text(folder / "train.jsonl", "\n".join(lines) + "\n")
    result = train(TrainConfig(model=config.model, data=str(folder / "train.jsonl"), out=str(folder),
                               rank=config.rank, alpha=config.alpha, targets=config.targets, steps=config.steps,
                               lr=config.lr, batch_size=config.batch_size, seed=config.seed, max_length=config.max_length,
                               log_every=10), model, tokenizer, progress=progress)
    detach(result.model)
    return str(folder / "adapter")


def _score_task(bench: GenerateBench, held: ZooTask, zoo: Zoo, multitask: dict[str, str], loaded: dict[str, Any],
                meta: Path, model: Any, tokenizer: Any, encoder: Any, out: Path, seconds: dict[str, float]
                ) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    folder = out / "adapters" / held.id
    folder.mkdir(parents=True, exist_ok=True)
    family = zoo.family(held.family)
    train_rows = read_rows(held.train)
    examples = _support(train_rows, bench.examples, random.Random(bench.seed))
    examples_file = folder / "examples.jsonl"
    write_jsonl(examples_file, [{"messages": r["messages"]} for r in examples])
    config, peft_json = read_adapter_config(family[0].final)
    adapters: dict[str, str | None] = {
        "base": None, "oracle": held.final, "nearest": _nearest(held, family, encoder).final,
        "multitask-lora": multitask[held.family],
        "zoo-average": str(write_merged(folder / "zoo-average", config, peft_json["target_modules"],
                                        read_states([t.final for t in family]), [1 / len(family)] * len(family)))}
    rng = random.Random(bench.seed)
    random_description = "".join(rng.choice(string.ascii_lowercase + " ") for _ in held.description)
    icm, sg, hyper = loaded["icm-lora"], loaded["sg-lora"], loaded["hypernet"]
    makers = {  # z = 0: each CVAE's mean adapter for the condition
        "icm-lora": lambda: icm.generate(icm.vector_of(str(examples_file), model, tokenizer), None),
        "sg-lora": lambda: sg.generate(held.description, None)[0],
        "sg-lora:random": lambda: sg.generate(random_description, None)[0],
        "hypernet": lambda: hyper.generate(hyper.condition_of(held.description)),
        "hypernet:random": lambda: hyper.generate(hyper.condition_of(random_description)),
    }
    for system, make in makers.items():
        t0 = time.perf_counter()
        state = make()
        if ":" not in system:
            seconds[system] = time.perf_counter() - t0
        record = loaded[system.split(":")[0]].record
        adapters[system] = str(write_generated(folder / system.replace(":", "-"), record, state, {"task": held.id}))
    scores = {system: _score(held, model, tokenizer, adapter) for system, adapter in adapters.items()}
    few_shot = _support(train_rows, bench.few_shot, random.Random(bench.seed + 1))
    scores["few-shot"] = _score(held, model, tokenizer, None, few_shot=few_shot)
    t0 = time.perf_counter()
    adapted = adapt_meta(meta, examples, folder / "abmll", model=model, tokenizer=tokenizer)
    seconds["abmll"] = time.perf_counter() - t0
    try:  # the model carries the adapted posterior: labels average S samples, generation reads the mean
        set_mode(adapted.layers, "phi", sample=held.family != "offset")
        scores["abmll"] = _score(held, model, tokenizer, None, samples=adapted.config.samples)
    finally:
        detach_bayes(model, zoo.targets)
    adapters["abmll"] = str(adapted.path)
    oracle = _delta_w(held.final)
    cosine = {s: _cosine(_delta_w(adapters[s]), oracle)
              for s in ("nearest", "zoo-average", "multitask-lora", *makers, "abmll")}
    return scores, cosine


def _support(rows: list[dict], n: int, rng: random.Random) -> list[dict]:
    """n examples of a task, as many of each answer as can be (n-way k-shot), in a random order. A
    classification task's support drawn at random can hold one label six times in eight, and a learner
    adapted on it predicts that label for nearly every input (ABMLL did: 98% "red" after six reds).
    Tasks with many answers (offset) get n rows with different answers."""
    by_answer: dict[str, list[dict]] = {}
    for row in rng.sample(rows, len(rows)):
        by_answer.setdefault(row["messages"][-1]["content"], []).append(row)
    support: list[dict] = []
    for k in range(n):  # round robin over the answers: the k-th row of each
        support += [group[k] for group in by_answer.values() if k < len(group)][:n - len(support)]
    rng.shuffle(support)
    return support


def _nearest(held: ZooTask, family: list[ZooTask], encoder: Any) -> ZooTask:
    if held.family == "offset":
        return min(family, key=lambda t: abs(int(t.value) - int(held.value)))
    embeddings = embed_texts([held.description] + [t.description for t in family], encoder)
    return family[int((embeddings[1:] @ embeddings[0]).argmax())]


def _score(held: ZooTask, model: Any, tokenizer: Any, adapter: str | None, few_shot: list[dict] | None = None,
           samples: int = 1) -> dict[str, float]:
    """Exact match (offset) or accuracy + ECE (labels) on the task's test rows, with `adapter` loaded."""
    rows = read_rows(held.test)
    prefix = [m for row in few_shot or [] for m in row["messages"]]
    if adapter is not None:
        load_adapter(model, adapter)
    try:
        if held.family == "offset":
            answers = generate(model, tokenizer, [prefix + r["messages"][:-1] for r in rows], max_new_tokens=8)
            return {"exact_match": sum(a.strip() == r["messages"][-1]["content"] for a, r in zip(answers, rows))
                    / len(rows)}
        words = held.value.split("/")
        probs, labels = label_probs(model, tokenizer, [{"messages": prefix + r["messages"]} for r in rows], words,
                                    samples=samples)
        return accuracy_and_ece(probs, labels)
    finally:
        if adapter is not None:
            detach(model)


def _delta_w(adapter: str) -> torch.Tensor:
    config, _, state = read_adapter(adapter)
    scale = config.alpha / config.rank
    parts = [(state[k.replace("lora_A", "lora_B")] @ state[k]).flatten() * scale
             for k in sorted(state) if k.endswith("lora_A.weight")]
    return torch.cat(parts)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def _bytes(path: Path) -> int:
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
