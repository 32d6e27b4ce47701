"""The transfer kit: what `transfer prepare` writes while the real data is at hand, and all that
`transfer run` reads.

    KIT/
      kit.json          `Kit`: the source model, the task's form, the budgets, the discriminator's accuracy
      seeds.jsonl       the seed rows S, real examples in chat form ([system,] user, assistant)
      source_adapter/   a copy of the source adapter (the teacher), PEFT format
      discriminator/    LoRA + classification head on the source model: real (label 1) vs synthetic (0)

The task form Trans-LoRA transfers here is single-turn: one user input, one assistant answer, and at
most one system message, the same on every row (it travels with the seeds and goes in front of every
synthetic input). A kit in any other form, or of another version, is refused by name.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from loraforge.core.errors import LoraforgeError
from loraforge.training.data import read_rows

KIND = "loraforge-trans-lora-kit"
VERSION = 1
FORM = "single-turn"  # [system,] user -> assistant
KIT_JSON, SEEDS, SOURCE_ADAPTER, DISCRIMINATOR = "kit.json", "seeds.jsonl", "source_adapter", "discriminator"
REAL, SYNTHETIC = 1, 0  # the discriminator's class ids


@dataclass
class Kit:
    """kit.json: what `transfer run` needs to know besides the seeds and the two adapters."""

    source_model: str  # the base the source adapter and the discriminator were trained on
    source_adapter: str  # where the adapter was when the kit was made (provenance; the kit holds a copy)
    system: str | None  # the system message of every row, or None
    input_lines: int  # the most lines a real input has: a synthetic candidate is cut there
    answer_tokens: int  # teacher labels' budget: the longest real answer in source tokens, plus a margin
    n_real: int  # real inputs the discriminator saw (training + held out)
    n_synthetic: int  # synthetic inputs it saw
    discriminator_accuracy: float  # on the held-out real and synthetic inputs, threshold 0.5
    seed: int
    form: str = FORM
    kind: str = KIND
    version: int = VERSION


def single_turn(messages: list[dict]) -> tuple[str | None, str, str]:
    """(system, user input, answer) of a single-turn conversation; ValueError for any other shape."""
    roles = [m["role"] for m in messages]
    if roles not in (["user", "assistant"], ["system", "user", "assistant"]):
        raise ValueError(f"turns {'/'.join(roles)}: Trans-LoRA transfers single-turn tasks, [system,] user, assistant")
    system = messages[0]["content"] if roles[0] == "system" else None
    user, answer = messages[-2]["content"], messages[-1]["content"]
    if not user.strip():
        raise ValueError("empty user input")
    return system, user, answer


def task_rows(path: str | Path) -> tuple[str | None, list[tuple[str, str]]]:
    """The shared system message and (input, answer) pairs of a data file in single-turn form."""
    system, pairs = None, []
    for i, row in enumerate(read_rows(path)):
        try:
            row_system, user, answer = single_turn(row["messages"])
        except ValueError as e:
            raise LoraforgeError(f"{path}:{row['line']}: {e}") from None
        if i and row_system != system:
            raise LoraforgeError(f"{path}:{row['line']}: system message differs from the first row's; a kit "
                                 "carries one system message for the whole task")
        system = row_system
        pairs.append((user, answer))
    return system, pairs


def chat_row(system: str | None, user: str, answer: str | None = None) -> dict:
    """A chat row (answer None: the conversation up to the assistant's turn)."""
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": user}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages}


def kit_json(kit: Kit) -> str:
    return json.dumps(dataclasses.asdict(kit), indent=2) + "\n"


def read_kit(path: str | Path) -> tuple[Kit, list[tuple[str, str]]]:
    """The kit at `path` and its seed (input, answer) pairs, checked: kind, version, form, files, seeds."""
    folder = Path(path)
    meta = folder / KIT_JSON
    if not meta.is_file():
        raise LoraforgeError(f"--kit {folder}: no {KIT_JSON}; make a kit with `loraforge transfer prepare`")
    try:
        values = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoraforgeError(f"{meta}: not valid JSON ({e})") from None
    if not isinstance(values, dict) or values.get("kind") != KIND:
        raise LoraforgeError(f"{meta}: not a Trans-LoRA kit (kind {values.get('kind') if isinstance(values, dict) else None!r})")
    if values.get("version") != VERSION:
        raise LoraforgeError(f"{meta}: kit version {values.get('version')!r}; this loraforge reads version {VERSION}")
    if values.get("form") != FORM:
        raise LoraforgeError(f"{meta}: a kit for the task form {values.get('form')!r}; transfer runs {FORM!r} tasks "
                             "([system,] user, assistant)")
    names = {f.name for f in dataclasses.fields(Kit)}
    if set(values) != names:
        raise LoraforgeError(f"{meta}: keys {sorted(set(values) ^ names)} missing or unknown")
    kit = Kit(**values)
    for sub in (SOURCE_ADAPTER, DISCRIMINATOR):
        if not (folder / sub / "adapter_config.json").is_file():
            raise LoraforgeError(f"--kit {folder}: {sub}/ holds no adapter")
    system, seeds = task_rows(folder / SEEDS)
    if system != kit.system:
        raise LoraforgeError(f"{folder / SEEDS}: the seeds' system message is not the one {KIT_JSON} records")
    return kit, seeds
