"""`loraforge bench ...`: each benchmark is a sub-command whose flags are the fields of its settings
dataclasses, parsed by the one config mechanism of `loraforge.core.configs` (as `train` and `fed run`
are), so `--help` shows each field's help and a misspelt flag is refused. A new benchmark is one
entry of `BENCHES`."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import shlex
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loraforge.core.configs import field_names, opt, parse_flags

PROJECT_REPORT = Path("docs/benchmarks.md")  # `--report` alone: the benchmarks page of the project run from


@dataclasses.dataclass
class MethodsSweep:
    """What `bench methods` runs: one BenchRun per combination of these (its own method, init and rule
    fields are set by them)."""

    methods: str | None = opt(None, "comma-separated subset; not given: every registered method")
    rules: str = opt("adamw", "comma-separated optimizers, regularizers and selectors, each run with every method "
                              "(e.g. adamw,lora-plus,lora-pro,allora,glad,lisa)")
    pairs: str | None = opt(None, "comma-separated METHOD/RULE combinations to run instead of crossing --methods with "
                                  "--rules (e.g. lora/adamw,dora/adamw,lora/lisa)")
    lrs: str | None = opt(None, "comma-separated learning rates: sweep them all (e.g. 1e-5,1e-4,1e-3,1e-2)")
    inits: str | None = opt(None, "comma-separated initialisers, each run on plain LoRA; not given: every one that "
                                  "starts LoRA, unless --methods is given; '' for none")
    method_lrs: str = opt("", "learning rates per method or initialiser, e.g. full=1e-4,pissa=5e-4 (others: --lr)")
    jobs: int = opt(1, "runs at a time, each pinned to one core with one thread")


@dataclasses.dataclass
class ParityRun:
    model: str = opt("smollm2-135m", "embedded name or local Hugging Face folder")
    rank: int = opt(8, "LoRA rank")


@dataclasses.dataclass
class JsonOut:
    json: str | None = opt(None, "also write the figures to this JSON file")


@dataclasses.dataclass(frozen=True)
class Bench:
    help: str
    settings: Callable[[], tuple[type, ...]]  # the dataclasses whose fields are the flags (imported when run)
    run: Callable[[dict[str, Any], str, Path | None], object]  # (field values, command line, report) -> figures
    drop: tuple[str, ...] = ()  # fields of `settings` that are not flags


def _methods(values: dict[str, Any], command: str, report: Path | None) -> object:
    from loraforge.bench.methods import BenchRun, bench_methods

    sweep = _build(MethodsSweep, values)
    base = _build(BenchRun, values)
    methods = _items(sweep.methods) if sweep.methods else None
    rules = _items(sweep.rules)
    inits = None if sweep.inits is None else _items(sweep.inits)
    pairs = _pairs(sweep.pairs) if sweep.pairs else None
    if pairs:
        if sweep.methods or sweep.inits or sweep.rules != "adamw":
            raise SystemExit("--pairs names the combinations itself: drop --methods, --rules and --inits")
        rules, inits = None, []
    if sweep.lrs:
        from loraforge.bench.sweep import bench_sweep

        return bench_sweep(base, methods, rules, [float(x) for x in _items(sweep.lrs)], command=command, inits=inits,
                           jobs=sweep.jobs, pairs=pairs, report=report)
    return bench_methods(base, methods, command=command, rules=rules, inits=inits,
                         method_lrs=_method_lrs(sweep.method_lrs), jobs=sweep.jobs, pairs=pairs, report=report)


def _parity(values: dict[str, Any], command: str, report: Path | None) -> object:
    from loraforge.bench.parity import bench_parity

    run = _build(ParityRun, values)
    return bench_parity(run.model, run.rank, command=command, report=report)


def _speed(values: dict[str, Any], command: str, report: Path | None) -> object:
    from loraforge.bench.speed import SpeedRun, bench_speed

    return bench_speed(_build(SpeedRun, values), values["json"], command=command, report=report)


def _transfer(values: dict[str, Any], command: str, report: Path | None) -> object:
    from loraforge.bench.transfer import TransferTasks, run
    from loraforge.transfer.bench import TransferBench

    return run(_build(TransferBench, values), _build(TransferTasks, values), command, report)


def _personalize(values: dict[str, Any], command: str, report: Path | None) -> object:
    from loraforge.bench import append_section, figure_line, figure_name
    from loraforge.personalize.bench import PersonalizeBench, bench_personalize, plot, summary_table

    bench = _build(PersonalizeBench, values)
    sheet = report.parent / figure_name("personalize-sheet", report.parent) if report else None
    result = bench_personalize(bench, sheet)
    table = summary_table(result)
    if report:
        body = (table + f"\nContact sheet (rows: {', '.join(result['sheet_rows'])}; subject prompt, then the colour "
                f"prompt): ![]({sheet.name})\n" + figure_line(plot(result), "personalize", "Fidelity vs alignment",
                                                                 report.parent))
        append_section(report, f"bench personalize{' --quick' if bench.quick else ''}: held-out glyph subjects",
                       command, body)
    print(table)
    return result


def _vision(values: dict[str, Any], command: str, report: Path | None) -> object:
    import shutil

    from loraforge.bench import append_section, figure_line, figure_name
    from loraforge.vision.bench import VisionBench, bench_vision, contact_sheet_path, plot, summary_table

    bench = _build(VisionBench, values)
    result = bench_vision(bench)
    table = summary_table(result)
    if report:
        body = table + figure_line(plot(result), "vision", "Accuracy against shots", report.parent)
        sheet = contact_sheet_path(result)
        if sheet is not None:
            name = figure_name("datadream-sheet", report.parent)
            shutil.copyfile(sheet, report.parent / name)
            body += f"\nDataDream on digits (per class: the real shots, then the generated images): ![]({name})\n"
        append_section(report, f"bench vision{' --quick' if bench.quick else ''}: CLIP few-shot and DataDream on the testbed",
                       command, body)
    print(table)
    return result


def _class(module: str, name: str) -> type:
    return getattr(importlib.import_module(module), name)


def _tabled(help_text: str, module: str, settings: str, runner: str, title: Callable[[Any], str]) -> Bench:
    """A stage's benchmark: `module.runner(settings)` gives the figures and `module.summary_table` their table,
    printed, and appended under `title(settings)` with --report (with `module.plot`'s figure where it has one)."""
    def run(values: dict[str, Any], command: str, report: Path | None) -> object:
        from loraforge.bench import append_section, figure_line

        stage = importlib.import_module(module)
        bench = _build(getattr(stage, settings), values)
        result = getattr(stage, runner)(bench)
        table = stage.summary_table(result)
        if report:
            figure = figure_line(stage.plot(result), runner.removeprefix("bench_"), "Every system per held-out task",
                                 report.parent) if hasattr(stage, "plot") else ""
            append_section(report, title(bench), command, table + figure)
        print(table)
        return result
    return Bench(help_text, lambda: (_class(module, settings),), run)


def _single(help_text: str, module: str, settings: str, runner: str) -> Bench:
    """A benchmark of one settings dataclass: `module.runner(module.settings(**values), command, report)`."""
    def run(values: dict[str, Any], command: str, report: Path | None) -> object:
        return getattr(importlib.import_module(module), runner)(_build(_class(module, settings), values),
                                                                command=command, report=report)
    return Bench(help_text, lambda: (_class(module, settings),), run)


BENCHES: dict[str, Bench] = {
    "methods": Bench("train every registered method with one budget and compare",
                     lambda: (_class("loraforge.bench.methods", "BenchRun"), MethodsSweep), _methods,
                     drop=("method", "init", "rule")),
    "parity": Bench("loraforge and PEFT load each other's adapters: logit differences", lambda: (ParityRun,), _parity),
    "speed": Bench("a LoRA training step against the frozen-base limit and PEFT, per precision",
                   lambda: (_class("loraforge.bench.speed", "SpeedRun"), JsonOut), _speed),
    "intruders": _single("LoRA ranks vs full fine-tuning: intruder dimensions, forgetting, mitigation",
                         "loraforge.bench.intruders", "IntruderBench", "bench_intruders"),
    "fed": _single("FedAvg vs FLoRA vs LoRA-FAIR vs centralised on Flower's simulation engine",
                   "loraforge.bench.fed", "FedBench", "bench_fed"),
    "serve": _single("multi-adapter serving throughput against PEFT and merging; --load: HTTP load test",
                     "loraforge.bench.serve", "ServeBench", "bench_serve"),
    "generate": _tabled("adapters for held-out tasks: zoo neighbours, generators, ABMLL, multi-task LoRA, few-shot",
                        "loraforge.generate.bench", "GenerateBench", "bench_generate",
                        lambda b: f"bench generate{' --quick' if b.quick else ''}: adapters for held-out tasks, {b.model}"),
    "vision": Bench("CLIP few-shot (LoRA, Block-LoRA, Comp-LoRA, GLAD) and DataDream on the vision testbed",
                    lambda: (_class("loraforge.vision.bench", "VisionBench"),), _vision),
    "transfer": Bench("Trans-LoRA SmolLM2-135M -> Gemma-3-270M on offset k=9 and the demo's advisor (--quick: offset)",
                      lambda: (_class("loraforge.transfer.bench", "TransferBench"),
                               _class("loraforge.bench.transfer", "TransferTasks")), _transfer),
    "personalize": Bench("hypernetwork LoRA (+ HM-CFG), EasyRef, embedding mean, per-subject / per-group LoRA, DECOR "
                         "on held-out glyph subjects", lambda: (_class("loraforge.personalize.bench", "PersonalizeBench"),),
                         _personalize),
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks: each prints its table; --report PATH also appends it "
                                                "to that Markdown file")
    kinds = bench.add_subparsers(required=True, metavar=" | ".join(BENCHES))
    for name, spec in BENCHES.items():
        p = kinds.add_parser(name, help=f"{spec.help} (loraforge bench {name} --help lists its flags)", add_help=False)
        p.set_defaults(run=lambda argv, name=name: run_bench(name, argv), config_flags=True)


def run_bench(name: str, argv: list[str]) -> int:
    """`loraforge bench NAME ARGS`: the settings' fields as flags, plus `--report [PATH]`."""
    spec = BENCHES[name]
    reporting = argparse.ArgumentParser(add_help=False)
    reporting.add_argument("--report", type=Path, nargs="?", const=PROJECT_REPORT, default=None)
    given, rest = reporting.parse_known_args(argv)
    flags = _flags_class(name, spec.settings(), spec.drop)
    help_text = (f"{spec.help}. --report [PATH] appends a dated section (machine, command, table) to that Markdown "
                 f"file, its figures beside it; --report alone: {PROJECT_REPORT}. Default: print the table only.")
    values = parse_flags(flags, rest, prog=f"loraforge bench {name}", description=help_text)
    spec.run(values, _command(), given.report)
    return 0


def _flags_class(name: str, configs: tuple[type, ...], drop: tuple[str, ...]) -> type:
    """One dataclass holding the fields of `configs` (less `drop`): the flags of `bench NAME`."""
    fields = []
    for config in configs:
        hints = typing.get_type_hints(config)
        fields += [(f.name, hints[f.name], dataclasses.field(default=f.default, default_factory=f.default_factory,
                                                             metadata=f.metadata))
                   for f in dataclasses.fields(config) if f.name not in drop]
    return dataclasses.make_dataclass(f"Bench{name.title()}Flags", fields)


def _build(config: type, values: dict[str, Any]) -> Any:
    """`config` from the parsed values that are its fields (the others belong to its sibling settings)."""
    return config(**{k: values[k] for k in field_names(config) if k in values})


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _pairs(text: str) -> list[tuple[str, str]]:
    """'lora/adamw,dora/adamw' -> [('lora', 'adamw'), ('dora', 'adamw')], with an error that names a bad item."""
    pairs = []
    for item in _items(text):
        method, slash, rule = item.partition("/")
        if not slash or not method.strip() or not rule.strip():
            raise SystemExit(f"--pairs: {item!r} is not METHOD/RULE")
        pairs.append((method.strip(), rule.strip()))
    return pairs


def _method_lrs(text: str) -> dict[str, float]:
    """'full=1e-4,bone=5e-4' -> {'full': 1e-4, 'bone': 5e-4}, with an error that names a bad item."""
    rates = {}
    for item in _items(text):
        name, _, value = item.partition("=")
        try:
            rates[name.strip()] = float(value)
        except ValueError:
            raise SystemExit(f"--method-lrs: {item!r} is not NAME=RATE") from None
    return rates


def _command() -> str:
    return "loraforge " + " ".join(shlex.quote(a) for a in sys.argv[1:])
