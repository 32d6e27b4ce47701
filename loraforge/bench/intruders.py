"""`loraforge bench intruders`: "LoRA vs Full Fine-tuning: An Illusion of Equivalence" (arXiv 2410.21228)
at laptop scale.

For each (model, task) pair, the same trainer, data and steps train

    LoRA  r in --ranks, alpha = 2r, plain scale alpha/r and rank-stabilised alpha/sqrt(r)
    full  fine-tuning of every weight (--method full, its own --full-lr)

and each trained model is measured for
    task score   dev accuracy (MiniLM + SST-2) or held-out loss (SmolLM2 + advising)
    intruders    k = 10, epsilon swept over 0.05 .. 0.95 (analysis.analyze against a fresh base)
    forgetting   on text the fine-tuning never saw, GSM8K test questions ($LORAFORGE_DATA/gsm8k/test.jsonl,
                 or --forget-data PATH):
                   causal LM: held-out loss change on GSM8K question + answer (tuned - base)
                   encoder:   mean |cos_tuned(a, b) - cos_base(a, b)| over pairs of questions,
                              mean-pooled sentence embeddings (how far the embedding geometry moved)
    mitigation   each LoRA adapter with its intruders scaled by lambda (default 0.75), re-factored
                 to rank r: its task score and forgetting again.

The closing paragraph of the section is computed from the table: which of the paper's findings
held at this scale and which did not. The section is printed; `--report PATH` appends it, with
its figure, to that Markdown file.
"""

from __future__ import annotations

import copy
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.bench import append_section, figure_line
from loraforge.bench.methods import BenchRun, load_rows
from loraforge.core.configs import opt
from loraforge.core.errors import LoraforgeError
from loraforge.training.data import data_path

TASKS = {"minilm-l6": "sst2", "smollm2-135m": "advising"}  # the pairs; other models name --data


@dataclass
class IntruderBench:
    models: str = opt("minilm-l6", "comma-separated; each trains on TASKS[model] unless --data is given")
    data: str | None = opt(None, "a TSV/CSV (classification) or JSONL (causal LM) instead of TASKS[model]")
    ranks: str = opt("1,8,64", "comma-separated LoRA ranks")
    steps: int = opt(60, "optimizer steps per run")
    batch_size: int = opt(16, "sequences per step")
    lr: float = opt(1e-3, "LoRA's learning rate at every rank (rsLoRA r = 64 at alpha = 2r has scale 16: 2e-3 diverged here)")
    full_lr: float = opt(1e-4, "learning rate of full fine-tuning, which moves every weight: about 10-20x smaller, as usual")
    max_length: int = opt(64, "tokens per sequence")
    dev_size: int = opt(200, "held-out rows")
    forget_rows: int = opt(64, "GSM8K test rows (or rows of --forget-data) used to measure forgetting")
    forget_data: str = opt("gsm8k", "JSONL with question/answer rows, or gsm8k: $LORAFORGE_DATA/gsm8k/test.jsonl")
    lam: float = opt(0.75, "mitigation: intruder singular values scaled by this")
    k: int = opt(10, "top singular vectors of the trained weight examined")
    epsilon: float = opt(0.5, "cosine below which a singular vector is an intruder")
    seed: int = opt(0, "seed of data order and initialisation")
    out: str = opt("runs/bench-intruders", "folder for the runs")

    def rank_list(self) -> list[int]:
        try:
            ranks = [int(r) for r in self.ranks.split(",")]
        except ValueError:
            raise LoraforgeError(f"--ranks must be comma-separated integers, got {self.ranks!r}") from None
        if not ranks or min(ranks) < 1:
            raise LoraforgeError(f"--ranks must be positive, got {self.ranks!r}")
        return ranks


@dataclass
class Variant:
    label: str
    method: str
    rank: int
    use_rslora: bool
    lr: float


def variants(bench: IntruderBench) -> list[Variant]:
    """LoRA at every rank with both scalings (alpha = 2r), then full fine-tuning. At r = 1 the two
    scales alpha/r and alpha/sqrt(r) are equal, so that run is trained once."""
    runs = [Variant(f"{'rs' if rs else ''}LoRA r={r}", "lora", r, rs, bench.lr)
            for r in bench.rank_list() for rs in ((False,) if r == 1 else (False, True))]
    return runs + [Variant("full FT", "full", 1, False, bench.full_lr)]


class ForgettingProbe:
    """Forgetting on text the fine-tuning never touched, measured against the base model's own value.

    Causal LM: loss on GSM8K question + answer, tuned minus base (> 0: forgot). Encoder: mean
    |cos_tuned - cos_base| over pairs of consecutive questions, so a model whose embedding geometry
    kept its shape scores ~0 whatever its classification head does."""

    def __init__(self, base: nn.Module, tokenizer: Any, task: str, rows: list[dict], max_length: int = 256):
        from loraforge.training.data import from_records

        self.task, self.tokenizer = task, tokenizer
        if task == "causal-lm":
            self.data = from_records(rows, tokenizer, task="causal-lm", max_length=max_length)  # GSM8K rows
        else:
            self.texts = [r["question"] for r in rows]
        self.reference = self._measure(base)

    @torch.no_grad()
    def _measure(self, model: nn.Module) -> torch.Tensor:
        """Causal LM: the held-out loss (0-d). Encoder: cosines of consecutive text pairs (n - 1,)."""
        from loraforge.training.evaluate import evaluate_dataset

        if self.task == "causal-lm":
            pad = self.tokenizer.pad_token_id or 0
            return torch.tensor(evaluate_dataset(model, self.data, batch_size=16, pad_id=pad)["loss"])
        model.eval()
        batch = self.tokenizer(self.texts, return_tensors="pt", padding=True, truncation=True, max_length=128)
        hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (n, T, 1)
        emb = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # (n, d)
        return (emb[:-1] * emb[1:]).sum(-1)  # (n - 1,)

    def __call__(self, model: nn.Module) -> float:
        now = self._measure(model)
        if self.task == "causal-lm":
            return float(now - self.reference)
        return float((now - self.reference).abs().mean())


def task_score(model: nn.Module, data: Any, pad_id: int) -> float:
    from loraforge.training.evaluate import evaluate_dataset

    metrics = evaluate_dataset(model, data, batch_size=64, pad_id=pad_id)
    return metrics.get("accuracy", metrics["loss"])


def count_by_epsilon(analysis: dict) -> list[int]:
    from loraforge.analysis.intruder_dims import count_intruders
    from loraforge.analysis.report import EPSILONS

    return [sum(count_intruders(m.intruders.max_cosine, e) for m in analysis.values()) for e in EPSILONS]


def reproduce(bench: IntruderBench, model_name: str) -> dict[str, Any]:
    """Every variant on one model: the rows of its table."""
    from loraforge.adapters.inject import trainable_parameters
    from loraforge.adapters.io import load_adapter
    from loraforge.analysis import analyze, mitigate
    from loraforge.core.models import load_model
    from loraforge.training.config import TrainConfig
    from loraforge.training.data import from_records
    from loraforge.training.loop import train

    data = bench.data or TASKS.get(model_name)
    if data is None:
        raise LoraforgeError(f"no task for {model_name!r}: give --data (known pairs: {TASKS})")
    task, train_rows, dev_rows = load_rows(BenchRun(model=model_name, data=data, dev_size=bench.dev_size,
                                                    seed=bench.seed))
    forget_path = data_path(bench.forget_data, "--forget-data")
    forget_rows = [json.loads(line) for line in forget_path.read_text().splitlines()[:bench.forget_rows]]
    if len(forget_rows) < 2 or not all({"question", "answer"} <= set(r) for r in forget_rows):
        raise LoraforgeError(f"{forget_path}: need at least 2 JSON rows with 'question' and 'answer'")
    num_labels = 2 if task == "classification" else None
    torch.manual_seed(bench.seed)  # a classification head starts the same in every copy
    base, tokenizer = load_model(model_name, task=task, num_labels=num_labels)
    pad = tokenizer.pad_token_id or 0
    train_data = from_records(train_rows, tokenizer, task=task, max_length=bench.max_length)
    dev_data = from_records(dev_rows, tokenizer, task=task, max_length=bench.max_length)
    probe = ForgettingProbe(base, tokenizer, task, forget_rows)
    rows = [{"label": "base", "method": "none", "params": 0, "score": task_score(base, dev_data, pad),
             "forgetting": 0.0}]
    out = Path(bench.out) / model_name.replace("/", "_")
    for v in variants(bench):
        config = TrainConfig(model=model_name, task=task, method=v.method, rank=v.rank, alpha=2.0 * v.rank,
                             use_rslora=v.use_rslora, steps=bench.steps, batch_size=bench.batch_size, lr=v.lr,
                             max_length=bench.max_length, seed=bench.seed, out=str(out / v.label.replace(" ", "_")))
        result = train(config, model=copy.deepcopy(base), tokenizer=tokenizer, train_data=train_data, progress=False)
        adapter = result.out / "adapter"
        row = {"label": v.label, "method": v.method, "rank": v.rank, "rslora": v.use_rslora,
               "params": trainable_parameters(result.model), "score": task_score(result.model, dev_data, pad),
               "forgetting": probe(result.model),
               "final_loss": statistics.mean([r["loss"] for r in result.history if "loss" in r][-5:])}
        analysis = analyze(copy.deepcopy(base), adapter, bench.k, bench.epsilon, label=v.label)
        row["counts_by_epsilon"] = count_by_epsilon(analysis)
        row["intruders"] = sum(m.intruders.count for m in analysis.values())
        if v.method == "lora":
            mitigate(copy.deepcopy(base), adapter, result.out / "mitigated", lam=bench.lam, k=bench.k,
                     epsilon=bench.epsilon)
            mitigated = load_adapter(copy.deepcopy(base), result.out / "mitigated")
            row["mitigated_score"] = task_score(mitigated, dev_data, pad)
            row["mitigated_forgetting"] = probe(mitigated)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "counts_by_epsilon"}), flush=True)
    metric = "dev accuracy" if task == "classification" else "held-out loss"
    forgetting = ("mean abs change of sentence-pair cosine" if task == "classification"
                  else "GSM8K loss change")
    return {"model": model_name, "data": data, "task": task, "metric": metric, "forgetting_metric": forgetting,
            "rows": rows}


def findings(result: dict[str, Any]) -> list[str]:
    """The paper's claims, each checked against this model's rows: held / did not hold."""
    rows = {r["label"]: r for r in result["rows"] if r["method"] != "none"}
    lora = [r for r in rows.values() if r["method"] == "lora"]
    full = next(r for r in rows.values() if r["method"] == "full")
    out = []
    small = [r for r in lora if r["rank"] <= 8]
    if small:
        mean_small = statistics.mean(r["intruders"] for r in small)
        out.append(f"LoRA with r <= 8 has more intruders than full fine-tuning ({mean_small:.1f} vs "
                   f"{full['intruders']}): {'held' if mean_small > full['intruders'] else 'did not hold'}.")
    rs = sorted((r for r in lora if r["rslora"] or r["rank"] == 1), key=lambda r: r["rank"])
    if len(rs) > 1:
        counts = [r["intruders"] for r in rs]
        falling = all(a >= b for a, b in zip(counts, counts[1:])) and counts[0] > counts[-1]
        out.append(f"With rsLoRA (alpha = 2r) intruders fall as the rank grows ({' -> '.join(map(str, counts))} for "
                   f"r = {', '.join(str(r['rank']) for r in rs)}): {'held' if falling else 'did not hold'}.")
    trained = list(rows.values())
    if len(trained) > 2:
        rho = spearman([r["intruders"] for r in trained], [r["forgetting"] for r in trained])
        out.append(f"More intruders go with more forgetting (Spearman rho over the {len(trained)} trained models = "
                   f"{rho:+.2f}): {'held' if rho > 0.3 else 'did not hold'} (rho > 0.3 counted as held).")
    mitigated = [r for r in lora if r["intruders"] > 0]
    if mitigated:
        less = statistics.mean(abs(r["forgetting"]) - abs(r["mitigated_forgetting"]) for r in mitigated)
        change = statistics.mean(r["mitigated_score"] - r["score"] for r in mitigated)
        out.append(f"Scaling intruders down reduces forgetting at little task cost: forgetting changed by "
                   f"{-less:+.4f} on average, the {result['metric']} by {change:+.4f}: "
                   f"{'held' if less > 0 else 'did not hold'}.")
    return out


def spearman(x: list[float], y: list[float]) -> float:
    """Rank correlation (ties averaged); 0 when either side is constant."""
    def ranks(values: list[float]) -> torch.Tensor:
        t = torch.tensor(values, dtype=torch.float64)
        return torch.stack([((t < v).sum() + ((t == v).sum() + 1) / 2) for v in t])

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return 0.0
    return float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])


def write_section(bench: IntruderBench, results: list[dict[str, Any]], command: str,
                  plot_dir: Path | None = None) -> str:
    """The section's text, and its figure in `plot_dir` when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from loraforge.analysis.report import EPSILONS

    parts = []
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, result in zip(axes.flat, results):
        lines = [f"### {result['model']} on {Path(result['data']).stem}: {result['metric']}, forgetting = "
                 f"{result['forgetting_metric']}", "",
                 f"| run | trainable params | {result['metric']} | intruders (k={bench.k}, eps={bench.epsilon}) | "
                 f"forgetting | mitigated (lambda={bench.lam}) {result['metric']} | mitigated forgetting |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        for r in result["rows"]:
            mitigated = (f"{r['mitigated_score']:.4f} | {r['mitigated_forgetting']:+.4f}"
                         if "mitigated_score" in r else " | ")
            lines.append(f"| {r['label']} | {r['params']:,} | {r['score']:.4f} | {r.get('intruders', '')} | "
                         f"{r['forgetting']:+.4f} | {mitigated} |")
            if "counts_by_epsilon" in r:
                ax.plot(EPSILONS, r["counts_by_epsilon"], marker=".", label=r["label"])
        ax.set(xlabel="epsilon", ylabel="intruder dimensions (all modules)", title=result["model"])
        ax.legend(fontsize=7)
        lines += ["", "Against the paper:", ""] + [f"- {f}" for f in findings(result)]
        parts.append("\n".join(lines))
    return (f"{bench.steps} steps of {bench.batch_size} rows each, LoRA lr {bench.lr}, full FT lr {bench.full_lr}, "
            f"alpha = 2r, all-linear.\n\n" + "\n\n".join(parts)
            + figure_line(fig, "bench-intruders", "Intruders vs epsilon", plot_dir, dpi=110))


def bench_intruders(bench: IntruderBench, command: str = "", report: Path | None = None) -> list[dict[str, Any]]:
    results = [reproduce(bench, name.strip()) for name in bench.models.split(",") if name.strip()]
    body = write_section(bench, results, command, report.parent if report else None)
    if report:
        append_section(report, "bench intruders: LoRA vs full fine-tuning, intruder dimensions and forgetting", command, body)
    print(body)
    return results
