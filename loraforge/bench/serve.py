"""`loraforge bench serve`: many adapters on one base model, loraforge's engine against what users run.

Workload (seeded): `requests` requests, prompts of prompt_min..prompt_max random tokens, outputs of
max_tokens/4..max_tokens tokens (EOS ignored, so every system produces exactly the same tokens),
each naming one of N random-initialised adapters (ranks cycling over `ranks`, all-linear,
alpha = 2r, an update a few percent of the base output), chosen uniformly or with a power law
(p_i ~ 1/i, S-LoRA's skewed setting). `methods` cycles the adapters over kinds: lora, dora,
lora-xs (its saved form is a LoRA of A and B R), mts (a LoRA that also trains `mts_rows` rows of
the output head, modules_to_save; tied to the input embedding on SmolLM2). All requests arrive at
t = 0 (offline throughput). Every system starts with every adapter in host memory (PEFT's loaded, the
engine's pool store read, llama.cpp's files loaded); the engine still moves them into its compute
slots on demand, inside the timing.

Systems (`--systems`), in one process and on the same requests, in turn, `repeats` rounds (each
system's fastest round is reported, so that a load that comes and goes hits every system alike):
    loraforge   the continuous-batching engine, every adapter in one batch (serve/engine.py)
    (a) peft_switch   PEFT, requests grouped per adapter, set_adapter, HF generate per group
    (b) peft_mixed    PEFT's mixed batches: generate(..., adapter_names=[...]) in arrival order, on the
                      requests whose adapters PEFT can mix (not DoRA, not modules_to_save); loraforge runs those too
                      (loraforge_mixable), the pair compared
    (c) merge_swap    merge each adapter into the base in turn (PEFT merge/unmerge), its group, undo
    (d) base          loraforge's engine with no adapter: the ceiling
    (e) llamacpp      llama-cpp-python, same base as GGUF f32, one request (and adapter) at a time
                      (serve_llamacpp.py)

Reported: generated tokens/s, p50/p99 latency (arrival to completion), peak resident memory above
the level before the system ran, and the 1-minute load average when it finished. `--load` is the
load test instead: the HTTP server on loopback, `load_requests` requests at `load_concurrency` over `load_adapters` adapters through
/v1/completions, after one unmeasured pass of the same requests (warm-up); it passes with zero
errors, the engine back to idle (no request running, every KV block and adapter slot free) and
resident memory back within 5% of its level after the warm-up. `--soak` mixes the same load with
dropped streams, hostile bodies and adapter reloads (serve_soak.py): 0 5xx, 4xx counted by kind. The table is printed; `--report
PATH` appends it, with its figure, to that Markdown file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from loraforge.bench import append_section, figure_line, machine, map_large_blocks, release_freed_memory, status_mb
from loraforge.core.configs import opt
from loraforge.core.errors import LoraforgeError

B_SCALE = 0.05  # random B (nn.Linear's init) times this: an update of a few percent, like a trained adapter
XS_UPDATE = 0.02  # LoRA-XS's R scaled so that ||s B R A||_F = this times ||W0||_F in every layer
DORA_MAGNITUDE = 0.02  # DoRA's magnitude m moved by this relative spread from ||W0 + s B A||_row
SYSTEMS = ("loraforge", "peft_switch", "peft_mixed", "merge_swap", "base", "llamacpp")
KINDS = ("lora", "dora", "lora-xs", "mts")
MEMORY_SLACK = 0.05  # the load test's resident memory after may exceed its post-warm-up level by this fraction


@dataclass
class ServeBench:
    model: str = opt("smollm2-135m", "embedded name or local Hugging Face folder")
    adapters: str = opt("8", "comma-separated adapter counts; the issue's full run is 1,8,32,128")
    distributions: str = opt("uniform", "comma-separated: uniform, power")
    requests: int = opt(32, "requests per run")
    prompt_min: int = opt(32, "shortest prompt, tokens")
    prompt_max: int = opt(128, "longest prompt, tokens")
    max_tokens: int = opt(32, "tokens generated per request")
    ranks: str = opt("8,16", "comma-separated adapter ranks (cycled)")
    max_batch: int = opt(32, "requests decoded together")
    systems: str = opt("loraforge,peft_switch,peft_mixed,merge_swap,base",
                       "comma-separated systems: loraforge, peft_switch, peft_mixed, merge_swap, base, llamacpp")
    methods: str = opt("lora", "comma-separated adapter kinds cycled over the adapters: lora, dora, lora-xs, mts")
    mts_rows: int = opt(256, "rows of the output head (tied: and embedding) an mts adapter trains")
    repeats: int = opt(1, "rounds of every system in turn; each system's fastest round is reported")
    json: str | None = opt(None, "also write the runs as JSON here")
    seed: int = opt(0, "seed of the adapters and prompts")
    out: str = opt("runs/bench-serve", "the generated adapters are kept here (reused by later runs)")
    load: bool = opt(False, "run the HTTP load test instead")
    load_requests: int = opt(1000, "load test: requests sent")
    load_concurrency: int = opt(32, "load test: requests in flight")
    load_adapters: int = opt(32, "load test: adapters served")
    load_max_tokens: int = opt(8, "load test: tokens per request")
    soak: bool = opt(False, "run the hostile soak instead: the load test's requests mixed with disconnects, "
                            "bad bodies and adapter reloads (0 5xx, engine and memory back to idle)")

    def counts(self) -> list[int]:
        try:
            counts = [int(c) for c in self.adapters.split(",")]
        except ValueError:
            raise LoraforgeError(f"--adapters must be comma-separated counts, got {self.adapters!r}") from None
        if min(counts) < 1:
            raise LoraforgeError(f"--adapters counts must be positive, got {self.adapters!r}")
        return counts

    def system_list(self) -> list[str]:
        systems = self.systems.split(",")
        unknown = [s for s in systems if s not in SYSTEMS]
        if unknown or "loraforge" not in systems:
            raise LoraforgeError(f"--systems takes loraforge (always) and any of {', '.join(SYSTEMS[1:])}, "
                                 f"got {self.systems!r}")
        return [s for s in SYSTEMS if s in systems]

    def kinds(self) -> list[str]:
        kinds = self.methods.split(",")
        if not set(kinds) <= set(KINDS):
            raise LoraforgeError(f"--methods takes {', '.join(KINDS)}, got {self.methods!r}")
        return kinds

    def check(self) -> None:
        self.counts()
        self.system_list()
        self.kinds()
        if self.repeats < 1 or self.mts_rows < 1:
            raise LoraforgeError("--repeats and --mts-rows must be positive")
        unknown = set(self.distributions.split(",")) - {"uniform", "power"}
        if unknown:
            raise LoraforgeError(f"--distributions takes uniform and power, got {', '.join(sorted(unknown))}")
        if not 1 <= self.prompt_min <= self.prompt_max:
            raise LoraforgeError(f"need 1 <= --prompt-min <= --prompt-max, got {self.prompt_min}, {self.prompt_max}")
        if self.requests < 1 or self.max_tokens < 1:
            raise LoraforgeError("--requests and --max-tokens must be positive")


@dataclass
class Work:
    prompt: list[int]
    adapter: str | None
    new_tokens: int


def make_adapters(model_name: str, count: int, ranks: list[int], folder: Path, seed: int = 0,
                  kinds: list[str] | None = None, mts_rows: int = 256) -> list[str]:
    """`count` adapters a000, a001, ... in `folder`, of kinds cycling over `kinds` (default: lora);
    kept: a later run with more adapters adds only the missing."""
    import copy

    from loraforge.adapters.inject import attach, detach
    from loraforge.adapters.io import save_adapter
    from loraforge.core.config import AdapterConfig
    from loraforge.core.models import load_model
    from loraforge.methods.base import adapter_layers

    kinds = kinds or ["lora"]
    names = [f"a{i:03d}" for i in range(count)]
    missing = [i for i, n in enumerate(names) if not (folder / n / "adapter_config.json").is_file()]
    if missing:
        base, _ = load_model(model_name, task="causal-lm")
        for i in missing:
            rank, kind = ranks[i % len(ranks)], kinds[i % len(kinds)]
            generator = torch.Generator().manual_seed(seed + i)
            config = AdapterConfig(method="lora" if kind == "mts" else kind, rank=rank, alpha=2.0 * rank,
                                   init="default" if kind == "lora-xs" else "random", seed=seed + i,
                                   modules_to_save=["lm_head"] if kind == "mts" else None,
                                   base_model_name_or_path=model_name)
            model = attach(copy.deepcopy(base) if kind == "mts" else base, config)  # mts trains the head in place
            with torch.no_grad():
                for layer in adapter_layers(model).values():
                    if kind == "lora-xs":  # R starts at 0 (B, A from W0's SVD): a random R of a set size
                        layer.lora_R.normal_(generator=generator)
                        layer.lora_R.mul_(XS_UPDATE * layer._w0().norm() / layer.delta_weight().norm())
                    else:
                        layer.lora_B.weight.mul_(B_SCALE)
                    if kind == "dora":
                        m = layer.lora_magnitude_vector
                        m.copy_(layer._row_norm() * (1 + DORA_MAGNITUDE * torch.randn(m.shape, generator=generator)))
                if kind == "mts":
                    head = model.lm_head.weight
                    rows = torch.randperm(head.shape[0], generator=generator)[:mts_rows]
                    head[rows] += 0.5 * head.std() * torch.randn(len(rows), head.shape[1], generator=generator)
            save_adapter(model, folder / names[i])
            detach(model)
    return names


def workload(bench: ServeBench, names: list[str] | None, distribution: str, vocab: int) -> list[Work]:
    """The seeded requests; names=None: every request on the base model."""
    g = torch.Generator().manual_seed(bench.seed)
    low = max(1, bench.max_tokens // 4)
    if names:
        weights = (torch.ones(len(names)) if distribution == "uniform"
                   else 1.0 / torch.arange(1, len(names) + 1, dtype=torch.float64))
        picks = torch.multinomial(weights, bench.requests, replacement=True, generator=g).tolist()
    margin = min(100, vocab // 4)  # clear of the special tokens at the ends of the vocabulary
    work = []
    for i in range(bench.requests):
        length = int(torch.randint(bench.prompt_min, bench.prompt_max + 1, (), generator=g))
        prompt = torch.randint(margin, vocab - margin, (length,), generator=g).tolist()
        new = int(torch.randint(low, bench.max_tokens + 1, (), generator=g))
        work.append(Work(prompt, names[picks[i]] if names else None, new))
    return work


class PeakRss:
    """Peak resident memory above the level at entry, sampled every 5 ms on a thread: the process-wide
    ru_maxrss cannot be reset between systems."""

    def __enter__(self) -> "PeakRss":
        self.start = self.peak = status_mb()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, status_mb())

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, status_mb())

    @property
    def extra_mb(self) -> float:
        return self.peak - self.start


def measure(run: Callable[[list[Work]], list[float]], work: list[Work]) -> dict[str, float]:
    """Run one system on `work`; it returns each request's completion time (perf_counter)."""
    with PeakRss() as rss:
        t0 = time.perf_counter()
        done = run(work)
        wall = time.perf_counter() - t0
    latencies = sorted((t - t0) * 1000 for t in done)
    return {"tok_s": sum(w.new_tokens for w in work) / wall, "p50_ms": _percentile(latencies, 50),
            "p99_ms": _percentile(latencies, 99), "peak_mb": rss.extra_mb, "seconds": wall}


def _percentile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values) + 0.5) - 1))  # nearest rank
    return sorted_values[index]


def engine_runner(engine: Any) -> Callable[[list[Work]], list[float]]:
    from loraforge.serve import SamplingParams

    def run(work: list[Work]) -> list[float]:
        reqs = [engine.add_request(w.prompt, w.adapter, SamplingParams(max_tokens=w.new_tokens, ignore_eos=True))
                for w in work]
        finished: dict[int, float] = {}
        while len(finished) < len(reqs):
            engine.step()
            now = time.perf_counter()
            for i, r in enumerate(reqs):
                if i not in finished and r.done.is_set():
                    if r.finish_reason != "length":
                        raise LoraforgeError(f"engine request {i} ended with {r.finish_reason!r}")
                    finished[i] = now
        return [finished[i] for i in range(len(reqs))]

    return run


def _hf_generate(model: Any, work: list[Work], pad_id: int, **kw: Any) -> None:
    """One left-padded HF generate over `work`, every row producing the batch's longest output."""
    length = max(len(w.prompt) for w in work)
    ids = torch.tensor([[pad_id] * (length - len(w.prompt)) + w.prompt for w in work])
    mask = torch.tensor([[0] * (length - len(w.prompt)) + [1] * len(w.prompt) for w in work])
    new = max(w.new_tokens for w in work)
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       pad_token_id=pad_id, **kw)


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def peft_runners(peft_model: Any, pad_id: int, max_batch: int) -> dict[str, Callable[[list[Work]], list[float]]]:
    """(a) switch, (b) mixed, (c) merge-swap over a PeftModel holding every adapter."""

    def grouped(work: list[Work]) -> list[tuple[str, list[int]]]:
        groups: dict[str, list[int]] = {}
        for i, w in enumerate(work):
            groups.setdefault(w.adapter, []).append(i)
        return [(name, chunk) for name, rows in groups.items() for chunk in _chunks(rows, max_batch)]

    def switch(work: list[Work]) -> list[float]:
        done = [0.0] * len(work)
        for name, rows in grouped(work):
            peft_model.set_adapter(name)
            _hf_generate(peft_model, [work[i] for i in rows], pad_id)
            for i in rows:
                done[i] = time.perf_counter()
        return done

    def mixed(work: list[Work]) -> list[float]:
        done = [0.0] * len(work)
        for rows in _chunks(list(range(len(work))), max_batch):
            _hf_generate(peft_model, [work[i] for i in rows], pad_id, adapter_names=[work[i].adapter for i in rows])
            for i in rows:
                done[i] = time.perf_counter()
        return done

    def merge_swap(work: list[Work]) -> list[float]:
        done = [0.0] * len(work)
        for name, rows in grouped(work):
            peft_model.set_adapter(name)
            peft_model.merge_adapter()
            try:
                _hf_generate(peft_model, [work[i] for i in rows], pad_id)
            finally:
                peft_model.unmerge_adapter()
            for i in rows:
                done[i] = time.perf_counter()
        return done

    return {"peft_switch": switch, "peft_mixed": mixed, "merge_swap": merge_swap}


def peft_with(base: Any, folder: Path, names: list[str]) -> Any:
    """A PeftModel on a copy of `base` holding the adapters `names` of `folder`."""
    import copy

    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base), folder / names[0], adapter_name=names[0]).eval()
    for name in names[1:]:
        model.load_adapter(folder / name, adapter_name=name)
    return model


def run_count(bench: ServeBench, count: int, folder: Path, base: Any, tokenizer: Any) -> list[dict[str, Any]]:
    """Every system at `count` adapters, for each distribution: one row each."""
    import os

    from loraforge.adapters.io import read_adapter
    from loraforge.serve import Engine

    systems = bench.system_list()
    names = [f"a{i:03d}" for i in range(count)]
    ranks = [int(r) for r in bench.ranks.split(",")]
    max_kv = bench.max_batch * (bench.prompt_max + bench.max_tokens + 16)
    engine = Engine(base, tokenizer, adapters_dir=str(folder), max_loaded=min(count, bench.max_batch),
                    max_rank=max(ranks), max_batch=bench.max_batch, max_kv_tokens=max_kv,
                    max_batch_tokens=max_kv, model_name=bench.model)
    vocab = base.config.vocab_size
    for name in names:  # every adapter read into host memory before timing, as PEFT's are loaded before it
        engine.pool.check(name)
    engine_runner(engine)(workload(dataclasses.replace(bench, requests=2, max_tokens=2), names, "uniform", vocab))  # warm-up
    runners: dict[str, Callable[[list[Work]], list[float]]] = {"loraforge": engine_runner(engine)}
    peft_model, llama, mixable, conversion = None, None, set(names), {}
    if {"peft_switch", "peft_mixed", "merge_swap"} & set(systems):
        configs = {n: read_adapter(folder / n)[0] for n in names}
        # PEFT refuses DoRA in mixed batches, and a model holding an adapter with modules_to_save fails
        # (KeyError in ModulesToSaveWrapper) on every mixed batch: it mixes the plain LoRA ones (LoRA-XS's
        # saved form included), loaded into a model of their own
        mixable = {n for n, c in configs.items() if c.method == "lora" and not c.modules_to_save}
        peft_model = peft_with(base, folder, names)
        pad = tokenizer.pad_token_id or 0
        runners |= {k: v for k, v in peft_runners(peft_model, pad, bench.max_batch).items() if k in systems}
        if "peft_mixed" in systems and mixable != set(names):
            mixing = [n for n in names if n in mixable]
            runners["peft_mixed"] = peft_runners(peft_with(base, folder, mixing), pad, bench.max_batch)["peft_mixed"]
    runners["base"] = engine_runner(engine)
    if "llamacpp" in systems:
        from loraforge.bench.serve_llamacpp import LlamaCpp, prepare_gguf

        files = prepare_gguf(bench.model, base, tokenizer, folder, names, max(ranks))
        conversion = files[3]
        llama = LlamaCpp(*files[:3], n_ctx=bench.prompt_max + bench.max_tokens + 8, threads=torch.get_num_threads())
        runners["llamacpp"] = llama.run
    rows = []
    try:
        for distribution in bench.distributions.split(","):
            work = workload(bench, names, distribution, vocab)
            inputs = {system: work for system in runners}
            inputs["base"] = [dataclasses.replace(w, adapter=None) for w in work]
            if "peft_mixed" in runners:
                inputs["peft_mixed"] = [w for w in work if w.adapter in mixable]
                if len(inputs["peft_mixed"]) < len(work):  # loraforge on the same requests, for the pair
                    runners["loraforge_mixable"] = runners["loraforge"]
                    inputs["loraforge_mixable"] = inputs["peft_mixed"]
            rounds: dict[str, list[dict[str, float]]] = {system: [] for system in runners}
            for _ in range(bench.repeats):  # every system in turn, so that a passing load hits all alike
                for system, run in runners.items():
                    rounds[system].append(measure(run, inputs[system]) | {"load": os.getloadavg()[0]})
            row: dict[str, Any] = {"adapters": count, "distribution": distribution, "requests": len(work),
                                   "generated_tokens": sum(w.new_tokens for w in work), "methods": bench.methods}
            for system, results in rounds.items():
                r = max(results, key=lambda r: r["tok_s"])  # the fastest round: the one least slowed by other load
                row[f"{system}_tok_s"] = round(r["tok_s"], 2)
                row[f"{system}_peak_mb"] = round(r["peak_mb"], 1)
                row[f"{system}_p50_ms"], row[f"{system}_p99_ms"] = round(r["p50_ms"], 1), round(r["p99_ms"], 1)
                row[f"{system}_requests"] = len(inputs[system])
                row[f"{system}_load"] = round(r["load"], 2)
                if bench.repeats > 1:
                    row[f"{system}_tok_s_rounds"] = [round(r["tok_s"], 2) for r in results]
            row["p50_ms"], row["p99_ms"] = row["loraforge_p50_ms"], row["loraforge_p99_ms"]
            row["pool_misses"], row["pool_evictions"] = engine.pool.misses, engine.pool.evictions
            row["loraforge_reserved_mb"] = round(reserved_mb(engine), 1)
            row["loraforge_kernel"] = lora_kernel_used(engine)
            if conversion:  # llama.cpp got these adapters through a rank-R LoRA conversion
                row["llamacpp_converted"] = {n: round(e, 4) for n, e in conversion.items()}
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        if llama is not None:
            llama.close()
    del peft_model
    return rows


def lora_kernel_used(engine: Any) -> str:
    """The engine's low-rank kernel in float32 on the CPU, and why not the native one where it is not."""
    from loraforge.serve import native

    if engine.lora_kernel != "auto":
        return engine.lora_kernel
    return "native (lowrank.c)" if native.library() is not None else f"segment/padded ({native.load()[1]})"


def reserved_mb(engine: Any) -> float:
    """What the engine allocates up front, before any request (so outside its peak figure): the paged
    KV cache and the adapter slots of the compute pool."""
    tensors = [engine.kv.k, engine.kv.v, *engine.pool.A.values(), *engine.pool.Bt.values()]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def targets(row: dict[str, Any]) -> list[str]:
    """The issue's targets, checked on one row: >= 6x PEFT switching, >= 2x PEFT mixed batches (on the
    requests PEFT can mix), within 1.15x of the no-adapter ceiling, above llama.cpp one request at a time."""
    out = []
    ours = row["loraforge_tok_s"]
    if "peft_switch_tok_s" in row:
        ratio = ours / row["peft_switch_tok_s"]
        out.append(f"at least 6x PEFT switching: {ratio:.1f}x, {'met' if ratio >= 6 else 'not met'}")
    if "peft_mixed_tok_s" in row:
        ratio = row.get("loraforge_mixable_tok_s", ours) / row["peft_mixed_tok_s"]
        out.append(f"at least 2x PEFT mixed batches: {ratio:.2f}x, {'met' if ratio >= 2 else 'not met'}")
    if "base_tok_s" in row:
        ratio = row["base_tok_s"] / ours
        out.append(f"within 1.15x of the no-adapter ceiling: {ratio:.2f}x below it, "
                   f"{'met' if ratio <= 1.15 else 'not met'}")
    if "llamacpp_tok_s" in row:
        ratio = ours / row["llamacpp_tok_s"]
        out.append(f"faster than llama.cpp one adapter at a time: {ratio:.2f}x, {'met' if ratio > 1 else 'not met'}")
    return out


def write_section(bench: ServeBench, rows: list[dict[str, Any]], command: str, plot_dir: Path | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = [s for s in (*SYSTEMS, "loraforge_mixable") if f"{s}_tok_s" in rows[0]]
    lines = ["| adapters | distribution | system | requests | tok/s | p50 ms | p99 ms | peak MB | load (1 min) |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        for s in systems:
            lines.append(f"| {r['adapters']} | {r['distribution']} | {s} | {r[f'{s}_requests']} | {r[f'{s}_tok_s']:.1f} | "
                         f"{r[f'{s}_p50_ms']:.0f} | {r[f'{s}_p99_ms']:.0f} | {r[f'{s}_peak_mb']:.0f} | {r[f'{s}_load']:.2f} |")
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    for distribution, style in (("uniform", "-"), ("power", "--")):
        picked = [r for r in rows if r["distribution"] == distribution]
        for n, system in enumerate(systems):
            if picked:
                ax.plot([r["adapters"] for r in picked], [r[f"{system}_tok_s"] for r in picked], style, marker="o",
                        color=f"C{n}", label=f"{system} ({distribution})")
    ax.set(xscale="log", xlabel="adapters", ylabel="generated tokens/s", title=f"{bench.model}, {bench.requests} requests")
    ax.legend(fontsize=7)
    reference = max(rows, key=lambda r: (r["adapters"] == 32, r["adapters"]))
    shown = [s for s in systems if s != "loraforge_mixable"]
    for n, system in enumerate(shown):
        bx.bar([n - 0.2, n + 0.2], [reference[f"{system}_p50_ms"] / 1000, reference[f"{system}_p99_ms"] / 1000], 0.4,
               color=[f"C{systems.index(system)}"] * 2)
    bx.set(xticks=range(len(shown)), ylabel="latency, s (left p50, right p99)",
           title=f"{reference['adapters']} adapters, {reference['distribution']}")
    bx.set_xticklabels(shown, rotation=30, fontsize=7)
    checks = [f"- {t}" for t in targets(reference)]
    converted = reference.get("llamacpp_converted")
    note = ""
    if converted:
        note = (f" llama.cpp loads LoRA only: {len(converted)} adapters reached it as rank-{max(bench.ranks.split(','), key=int)}"
                f" LoRA conversions (relative logit error up to {max(converted.values()):.2g}); modules_to_save adapters "
                "as their own merged GGUF f32.")
    return (f"{bench.requests} requests, prompts {bench.prompt_min}-{bench.prompt_max} tokens, "
            f"{max(1, bench.max_tokens // 4)}-{bench.max_tokens} new tokens each (EOS ignored), adapters of ranks "
            f"{bench.ranks} and kinds {bench.methods} (cycled; mts: {bench.mts_rows} trained head rows), all-linear, "
            f"float32, max batch {bench.max_batch}, loraforge's low-rank kernel {rows[-1]['loraforge_kernel']}; "
            f"all requests arrive at t = 0; {bench.repeats} round(s) of every system in turn, each system's fastest "
            "round shown. Peak MB: resident memory above the level before that system ran; loraforge's KV cache "
            "and adapter slots are allocated before it "
            f"({rows[-1]['loraforge_reserved_mb']:.0f} MB at the last row).{note}\n\n" + "\n".join(lines) +
            f"\n\nTargets, at {reference['adapters']} adapters ({reference['distribution']}):\n\n" + "\n".join(checks) +
            figure_line(fig, "bench-serve", "Throughput vs adapters, latency per system", plot_dir, dpi=110))


# ---- the load test ------------------------------------------------------------------------------
def start_server(app: Any) -> tuple[Any, threading.Thread, str]:
    """uvicorn serving `app` on a free loopback port in a thread: (server, thread, base URL)."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # loopback only, a free port
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"


def load_engine(bench: ServeBench, base: Any, tokenizer: Any, folder: Path) -> tuple[Any, list[str]]:
    """The load test's engine over `load_adapters` generated adapters, and their names."""
    from loraforge.serve import Engine

    names = make_adapters(bench.model, bench.load_adapters, [int(r) for r in bench.ranks.split(",")], folder,
                          bench.seed)
    engine = Engine(base, tokenizer, adapters_dir=str(folder), max_loaded=min(len(names), bench.load_concurrency),
                    max_rank=max(int(r) for r in bench.ranks.split(",")), max_batch=bench.load_concurrency,
                    max_kv_tokens=bench.load_concurrency * (bench.prompt_max + 4 * bench.load_max_tokens + 32),
                    model_name=bench.model)
    return engine, names


def soak_test(bench: ServeBench, base: Any, tokenizer: Any, folder: Path) -> dict[str, Any]:
    """The server under `load_requests` hostile and valid requests at `load_concurrency` (serve_soak.py)."""
    from loraforge.bench.serve_soak import BODY_LIMIT, SWAP, soak, soak_plan
    from loraforge.serve.server import create_app

    engine, names = load_engine(bench, base, tokenizer, folder)
    engine.pool.register(SWAP, names[0])
    prompts = [tokenizer.decode(w.prompt) for w in workload(
        dataclasses.replace(bench, requests=64, prompt_max=min(bench.prompt_max, 64)), None, "uniform",
        base.config.vocab_size)]
    plan = soak_plan(bench.load_requests, names, prompts, bench.load_max_tokens, bench.seed)
    map_large_blocks()  # freed tensors leave RSS at once: what stays after the soak is memory in use
    server, thread, url = start_server(create_app(engine, max_body_bytes=BODY_LIMIT))
    try:
        return soak(engine, url, plan, bench.load_concurrency, names[0], MEMORY_SLACK)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def load_test(bench: ServeBench, base: Any, tokenizer: Any, folder: Path) -> dict[str, Any]:
    """The HTTP server on loopback under `load_requests` requests at `load_concurrency`."""
    import httpx

    from loraforge.serve.server import create_app

    engine, names = load_engine(bench, base, tokenizer, folder)
    server, thread, url = start_server(create_app(engine))
    work = workload(dataclasses.replace(bench, requests=bench.load_requests, max_tokens=bench.load_max_tokens,
                                        prompt_max=min(bench.prompt_max, 64)), names, "uniform", base.config.vocab_size)

    async def fire(batch: list[Work]) -> tuple[list[float], list[str]]:
        gate = asyncio.Semaphore(bench.load_concurrency)
        latencies: list[float] = []
        errors: list[str] = []
        limits = httpx.Limits(max_connections=bench.load_concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
            async def one(w: Work) -> None:
                async with gate:
                    t0 = time.perf_counter()
                    body = {"model": w.adapter, "prompt": tokenizer.decode(w.prompt), "max_tokens": w.new_tokens,
                            "temperature": 0}
                    try:
                        response = await client.post("/v1/completions", json=body)
                        if response.status_code != 200:
                            errors.append(f"{response.status_code}: {response.text[:200]}")
                    except httpx.HTTPError as exc:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    latencies.append((time.perf_counter() - t0) * 1000)

            await asyncio.gather(*(one(w) for w in batch))
        return sorted(latencies), errors

    map_large_blocks()  # freed tensors leave RSS at once: what stays after the test is memory in use
    try:
        # Warm-up: the whole workload once, so that every slot, block, buffer and per-shape kernel cache
        # (oneDNN keeps one per matmul shape, and prefill shapes vary) exists before the idle level is read;
        # the measured pass must then come back to it: growth after that would be a leak.
        asyncio.run(fire(work))
        release_freed_memory()
        idle_mb = status_mb()
        t0 = time.perf_counter()
        latencies, errors = asyncio.run(fire(work))
        wall = time.perf_counter() - t0
        deadline = time.monotonic() + 10
        while engine.has_work() and time.monotonic() < deadline:
            time.sleep(0.05)
        release_freed_memory()
        after_mb = status_mb()
        idle = (not engine.has_work() and engine.kv.free_blocks == engine.kv.num_blocks
                and not any(engine.pool.refs.values()))
        memory_back = after_mb <= idle_mb * (1 + MEMORY_SLACK)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    result = {"requests": len(work), "concurrency": bench.load_concurrency, "adapters": len(names),
              "errors": len(errors), "first_errors": errors[:3], "seconds": round(wall, 1),
              "requests_per_s": round(len(work) / wall, 2), "tok_s": round(sum(w.new_tokens for w in work) / wall, 1),
              "p50_ms": round(statistics.median(latencies), 1), "p99_ms": round(_percentile(latencies, 99), 1),
              "idle_rss_mb": round(idle_mb, 1), "after_rss_mb": round(after_mb, 1), "engine_idle_after": idle,
              "memory_back": memory_back, "passed": not errors and idle and memory_back}
    print(json.dumps(result), flush=True)
    return result


def bench_serve(bench: ServeBench, command: str = "", report: Path | None = None) -> dict[str, Any]:
    from loraforge.core.models import load_model

    bench.check()
    base, tokenizer = load_model(bench.model, task="causal-lm")
    folder = Path(bench.out) / f"adapters-{Path(bench.model).name}"
    if bench.soak:
        result = soak_test(bench, base, tokenizer, folder)
        if report:
            append_section(report, f"bench serve --soak: {bench.model}", command,
                           f"```json\n{json.dumps(result, indent=2)}\n```")
        if not result["passed"]:
            raise LoraforgeError(f"soak failed: {result['server_errors_5xx']} 5xx/transport errors, engine idle "
                                 f"after: {result['engine_idle_after']}, RSS {result['idle_rss_mb']} -> "
                                 f"{result['after_rss_mb']} MB (first failures: {result['first_failures']})")
        return result
    if bench.load:
        result = load_test(bench, base, tokenizer, folder)
        if report:
            body = ("| requests | concurrency | adapters | errors | req/s | tok/s | p50 ms | p99 ms | RSS idle -> after (MB) "
                    "| engine idle after |\n|---:|---:|---:|---:|---:|---:|---:|---:|---|---|\n"
                    f"| {result['requests']} | {result['concurrency']} | {result['adapters']} | {result['errors']} | "
                    f"{result['requests_per_s']} | {result['tok_s']} | {result['p50_ms']} | {result['p99_ms']} | "
                    f"{result['idle_rss_mb']} -> {result['after_rss_mb']} | {result['engine_idle_after']} |\n\n"
                    f"Load test {'passed' if result['passed'] else 'FAILED'}: {bench.load_max_tokens // 4 or 1}-"
                    f"{bench.load_max_tokens} new tokens per request over /v1/completions on loopback.")
            append_section(report, f"bench serve --load: {bench.model}", command, body)
        if not result["passed"]:
            raise LoraforgeError(f"load test failed: {result['errors']} errors, engine idle after: "
                                 f"{result['engine_idle_after']}, memory back to idle (within "
                                 f"{MEMORY_SLACK:.0%}): {result['memory_back']} (first errors: {result['first_errors']})")
        return result
    if bench.kinds() != ["lora"]:  # a folder per mix of kinds: adapter a003 is a different adapter in each
        rows = f"-mts{bench.mts_rows}" if "mts" in bench.kinds() else ""
        folder = folder.with_name(f"{folder.name}-{'+'.join(bench.kinds())}{rows}")
    make_adapters(bench.model, max(bench.counts()), [int(r) for r in bench.ranks.split(",")], folder, bench.seed,
                  bench.kinds(), bench.mts_rows)
    rows = [row for count in bench.counts() for row in run_count(bench, count, folder, base, tokenizer)]
    result = {"machine": machine(), "runs": rows}
    if bench.json:
        Path(bench.json).write_text(json.dumps(result, indent=2) + "\n")
    body = write_section(bench, rows, command, report.parent if report else None)
    if report:
        append_section(report, f"bench serve: {bench.model}, multi-adapter throughput", command, body)
    print(body)
    return result
