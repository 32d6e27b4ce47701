"""The adapter zoo: one LoRA per task of a procedural family, K checkpoints per task (the training set
of every generator; ICM-LoRA, arXiv 2501.17635, samples a task's adapter distribution by keeping many
checkpoints of one trajectory).

    ZOO/index.json         {"model", "tasks": [{id, family, value, description, train, test, adapters, final}]}
    ZOO/zoo_config.json    the ZooConfig of the last build
    ZOO/<id>/train.jsonl, test.jsonl, ckpt-0/ ... ckpt-{K-1}/   (PEFT-format adapter folders)

Checkpoint 0 ends the main run (`steps` steps, warm-up + cosine to 0); each further checkpoint ends a
short restart from the previous one (`restart_steps` at a quarter of the rate), as snapshot ensembles
do (Huang et al., arXiv 1704.00109): samples around the task's minimum rather than early, unconverged
points. Every task starts from the same adapter init (one seed), so the zoo's adapters share a basin
and differences between them are differences between the tasks, not between random starts.

Paths in the index are relative to ZOO. The index is rewritten after each task, so a killed build
resumes at the first task it lacks; a build with another training recipe than the zoo's (steps, rank,
learning rate, ...) is refused, so that a zoo never mixes adapters trained two ways.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraforge.core.config import read_adapter_config
from loraforge.core.errors import LoraforgeError
from loraforge.core.files import atomic_write_text, write_jsonl
from loraforge.generate.families import Task, make_task

INDEX = "index.json"
# ZooConfig fields that say which task a build trains, or where: the rest is the training recipe
TASK_FIELDS = ("family", "values", "out", "data")


@dataclass
class ZooConfig:
    family: str
    values: list[str]
    model: str = "smollm2-135m"
    out: str = "runs/zoo"
    steps: int = 150  # the measurement: k=11 reaches exact match 0.97 after 150 steps of 16 at 2e-3
    checkpoints: int = 5  # K adapters per task
    restart_steps: int = 15  # steps of each restart after the main run
    rank: int = 4
    alpha: float = 8.0  # PEFT's default lora_alpha: scale 2 at rank 4
    targets: str = "q_proj,v_proj"
    lr: float = 2e-3
    batch_size: int = 16
    n_train: int = 600
    n_test: int = 100
    max_length: int = 256  # tokens per row: an SST-2 sentence and its answer fit whole
    data: str | None = None  # folder holding sst2/train.tsv (labels family); None: $LORAFORGE_DATA
    seed: int = 0  # one adapter init for every task

    def validate(self) -> None:
        for name in ("steps", "checkpoints", "restart_steps", "rank", "batch_size", "n_train", "n_test"):
            if getattr(self, name) < 1:
                raise LoraforgeError(f"zoo: {name} must be at least 1, got {getattr(self, name)}")
        if not self.values:
            raise LoraforgeError("zoo: --values names no task")


@dataclass
class ZooTask:
    id: str
    family: str
    value: str
    description: str
    train: str
    test: str
    adapters: list[str] = field(default_factory=list)
    final: str = ""


@dataclass
class Zoo:
    """A loaded zoo: its folder, base model and tasks. Paths are absolute once loaded."""

    root: Path
    model: str
    tasks: list[ZooTask]
    targets: list[str]
    rank: int

    def task(self, task_id: str) -> ZooTask:
        for t in self.tasks:
            if t.id == task_id:
                return t
        raise LoraforgeError(f"{self.root}: no task {task_id!r} in the zoo")

    def family(self, name: str) -> list[ZooTask]:
        return [t for t in self.tasks if t.family == name]


def read_index(root: Path) -> dict[str, Any]:
    path = root / INDEX
    if not path.is_file():
        raise LoraforgeError(f"{root}: no {INDEX} (build a zoo with `loraforge zoo build`)")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LoraforgeError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(index, dict) or not isinstance(index.get("tasks"), list):
        raise LoraforgeError(f"{path}: expected an object with a 'tasks' list")
    return index


def load_zoo(root: str | Path) -> Zoo:
    """Read ZOO/index.json and check that every adapter of every task has the first one's base model,
    targets and ranks; a disagreeing adapter is named."""
    root = Path(root)
    index = read_index(root)
    tasks, reference = [], None
    for entry in index["tasks"]:
        try:
            task = ZooTask(**entry)
        except TypeError as exc:
            raise LoraforgeError(f"{root / INDEX}: a task entry does not fit the index's schema ({exc})") from None
        task.train, task.test, task.final = (str(root / p) for p in (task.train, task.test, task.final))
        task.adapters = [str(root / p) for p in task.adapters]
        if not task.adapters:
            raise LoraforgeError(f"{root / INDEX}: task {task.id} lists no adapters")
        for adapter in task.adapters + [task.final]:
            config, peft_json = read_adapter_config(adapter)
            signature = {"base model": config.base_model_name_or_path,
                         "targets": sorted(peft_json.get("target_modules") or []),
                         "ranks": (config.rank, sorted(config.rank_pattern.items()))}
            if reference is None:
                reference = (adapter, signature)
            for key, value in signature.items():
                if value != reference[1][key]:
                    raise LoraforgeError(f"zoo {root}: adapter {adapter} has {key} {value}, but {reference[0]} has "
                                         f"{reference[1][key]}: a zoo's adapters must share base model, targets "
                                         f"and ranks")
        tasks.append(task)
    if reference is None:
        raise LoraforgeError(f"{root / INDEX}: the zoo has no tasks")
    if reference[1]["base model"] != index.get("model"):
        raise LoraforgeError(f"zoo {root}: adapter {reference[0]} is for base {reference[1]['base model']!r}, the "
                             f"index says {index.get('model')!r}")
    return Zoo(root, index["model"], tasks, reference[1]["targets"], reference[1]["ranks"][0])


def build_zoo(config: ZooConfig, progress: bool = True) -> Path:
    """Train the tasks of `config` that ZOO does not hold yet; returns ZOO. Tasks already in the index
    (by id) are kept, so a zoo grows by family and a killed build resumes."""
    from loraforge.adapters.inject import detach
    from loraforge.core.models import load_model
    from loraforge.training.config import TrainConfig
    from loraforge.training.loop import train

    config.validate()
    tasks = [make_task(config.family, str(v)) for v in config.values]  # refuses a bad value before any work
    root = Path(config.out)
    index = read_index(root) if (root / INDEX).is_file() else {"model": config.model, "tasks": []}
    if index["model"] != config.model:
        raise LoraforgeError(f"{root}: this zoo's base model is {index['model']!r}, not {config.model!r}")
    if index["tasks"]:
        _check_recipe(root, config)
    done = {t["id"] for t in index["tasks"]}
    todo = [t for t in tasks if t.id not in done]
    # bad data fails here, before anything is written and before any model loads
    rows = [task.rows(config.n_train, config.n_test, config.data) for task in todo]
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "zoo_config.json", json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    if not todo:
        return root
    entries = [_write_data(root, task, *task_rows) for task, task_rows in zip(todo, rows)]
    model, tokenizer = load_model(config.model, task="causal-lm")
    for n, (task, entry) in enumerate(zip(todo, entries)):
        if progress:
            print(f"zoo: task {task.id} ({n + 1}/{len(todo)}): {task.description}")
        train_config = TrainConfig(model=config.model, data=str(root / entry.train), rank=config.rank,
                                   alpha=config.alpha, targets=config.targets, steps=config.steps, lr=config.lr,
                                   batch_size=config.batch_size, seed=config.seed, max_length=config.max_length, log_every=10)
        for k in range(config.checkpoints):
            run = Path(task.id) / f"ckpt-{k}"
            if k > 0:  # a restart of the adapter the model carries
                train_config = dataclasses.replace(train_config, steps=config.restart_steps, lr=config.lr / 4,
                                                   warmup=0.0, seed=config.seed + k)
            result = train(dataclasses.replace(train_config, out=str(root / run / "run")), model, tokenizer,
                           progress=progress)
            entry.adapters.append(str(run / "run" / "adapter"))
        entry.final = entry.adapters[-1]
        detach(result.model)
        index["tasks"].append(dataclasses.asdict(entry))
        atomic_write_text(root / INDEX, json.dumps(index, indent=2) + "\n")
    return root


def _check_recipe(root: Path, config: ZooConfig) -> None:
    """Refuse to add tasks to a zoo whose adapters were trained with another recipe, naming the field."""
    path = root / "zoo_config.json"
    try:
        built = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LoraforgeError(f"{root}: the zoo has tasks but {path.name} cannot be read ({exc})") from None
    wanted = dataclasses.asdict(config)
    for name, value in wanted.items():
        if name not in TASK_FIELDS and built.get(name) != value:
            raise LoraforgeError(f"zoo {root}: its adapters were trained with {name}={built.get(name)!r}, this build "
                                 f"asks for {name}={value!r}; use the zoo's recipe or another --out")


def _write_data(root: Path, task: Task, train_rows: list[dict], test_rows: list[dict]) -> ZooTask:
    folder = root / task.id
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train_rows), ("test", test_rows)):
        write_jsonl(folder / f"{name}.jsonl", rows)
    return ZooTask(task.id, task.family, task.value, task.description, f"{task.id}/train.jsonl",
                   f"{task.id}/test.jsonl")
