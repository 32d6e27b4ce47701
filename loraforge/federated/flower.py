"""`loraforge fed run`: federated LoRA fine-tuning as a Flower ServerApp + ClientApp, run in
Flower's simulation engine. With app.py, the only files that import flwr.

Round t (every client takes part) of the strategy `--strategy` names (strategies/):
  server -> clients   the global adapter G_t (PEFT-format tensors + its AdapterConfig as JSON)
  client k            start from G_t and train it (rank r), or where the strategy's clients start
                      fresh (flora): merge G_t into its base copy, attach a fresh rank-r_k LoRA, train it
  clients -> server   A_k, B_k (+ head), n_k and the client's AdapterConfig
  server              G_{t+1} = the strategy's combine of G_t and its aggregate (p_k = n_k / sum n_j):
                      the aggregate itself (fedavg, lora-fair), or [G_t ; aggregate] stacked (flora)
A reply with an error, non-finite tensors or tensors that do not fit is dropped with a logged reason.
After each round: held-out loss/accuracy, bytes each way -> metrics.jsonl (+ accuracy.png at the
end); G_{t+1} -> out/global; out/checkpoint holds adapter, metrics and round number, replaced in
one rename, and --resume starts after its round.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from loraforge.adapters.inject import adapter_state_dict, attach, merge_and_unload
from loraforge.adapters.io import load_adapter
from loraforge.core.config import AdapterConfig
from loraforge.core.configs import opt
from loraforge.core.errors import AdapterError, LoraforgeError
from loraforge.core.files import atomic_dir, atomic_write_text
from loraforge.federated import STRATEGIES, ClientAdapter, check_clients, read_client, write_adapter
from loraforge.federated.strategies import Strategy, with_fresh_clients
from loraforge.training.config import TrainConfig, parse_targets
from loraforge.training.data import data_path, from_records, read_rows
from loraforge.training.evaluate import evaluate_dataset
from loraforge.training.loop import train

log = logging.getLogger("loraforge.fed")
CHECKPOINT = "checkpoint"  # global adapter + metrics + round counter of the last finished round


@dataclass
class FedRunConfig:
    """A federated run: `loraforge fed run`'s flags and the Flower app's run config are these fields."""

    model: str = field(metadata={"help": "embedded name, local HF folder or .gguf file"})
    data: str = field(metadata={"help": "TSV/CSV (classification) or JSONL (causal-lm), or sst2 / gsm8k: that set "
                                        "under $LORAFORGE_DATA; the last --eval-fraction of rows is the held-out split"})
    out: str = opt("runs/fed", "run folder: global adapter, metrics.jsonl, accuracy.png, checkpoint")
    task: str = opt("classification", "classification | causal-lm")
    clients: int = opt(10, "clients, each training on its partition of the data")
    partition: str = opt("iid", "iid or dirichlet:ALPHA (label skew, smaller = more skewed)")
    rounds: int = opt(5, "communication rounds")
    local_steps: int = opt(10, "optimizer steps each client takes per round")
    strategy: str = opt("fedavg", "aggregation strategy, a name from loraforge/federated/strategies/")
    ranks: str = opt("8", "one rank, or one per client (cycled) where the strategy's clients start fresh")
    targets: str = opt("all-linear", "all-linear, comma-separated names, or one regex")
    lr: float = opt(1e-3, "clients' learning rate")
    batch_size: int = opt(16, "rows per client batch")
    max_length: int = opt(64, "tokens per row")
    eval_fraction: float = opt(0.1, "share of the rows held out for the global evaluation")
    lam: float = opt(1e-2, "lora-fair: ridge weight of the server residual")
    seed: int = opt(0, "seeds the partition, the clients' adapters and data order")
    resume: bool = opt(False, "continue after the last finished round in --out")
    num_labels: int | None = opt(None, "classification: read from the data when not given")

    def rule(self) -> Strategy:
        """The strategy, with its settings (lam) from this config's fields of the same names."""
        settings = {name: getattr(self, name) for name in STRATEGIES.settings(self.strategy) if hasattr(self, name)}
        return STRATEGIES.get(self.strategy)(**settings)

    def rank_list(self) -> list[int]:
        ranks = [int(r) for r in self.ranks.split(",")]
        if not STRATEGIES.get(self.strategy).fresh_clients and len(set(ranks)) > 1:
            raise LoraforgeError(f"--ranks {self.ranks}: the clients of {self.strategy} all train the global "
                                 f"adapter, of one rank; heterogeneous ranks need --strategy "
                                 f"{' or '.join(with_fresh_clients())}")
        return ranks


def partition(labels: list[int], clients: int, scheme: str, seed: int) -> list[list[int]]:
    """Row indices per client: iid (shuffled, equal split) or dirichlet:a (per label, client shares
    ~ Dir(a), the usual label-skew split); every client gets at least one row."""
    g = torch.Generator().manual_seed(seed)
    if scheme == "iid":
        order = torch.randperm(len(labels), generator=g).tolist()
        return [order[k::clients] for k in range(clients)]
    if not scheme.startswith("dirichlet:"):
        raise LoraforgeError(f"--partition must be iid or dirichlet:ALPHA, got {scheme!r}")
    concentration = torch.full((clients,), float(scheme.split(":", 1)[1]))
    parts: list[list[int]] = [[] for _ in range(clients)]
    for label in sorted(set(labels)):
        rows = [i for i, y in enumerate(labels) if y == label]
        rows = [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]
        shares = torch.distributions.Dirichlet(concentration).sample()  # seeded by the global RNG below
        cuts = (shares.cumsum(0) * len(rows)).round().long().tolist()
        for k in range(clients):
            parts[k] += rows[(cuts[k - 1] if k else 0):cuts[k]]
    for k in range(clients):  # a client with no rows cannot train: lend it one from the largest
        if not parts[k]:
            parts[k].append(max(parts, key=len).pop())
    return parts


def split_rows(cfg: FedRunConfig) -> tuple[list[dict], list[list[dict]]]:
    rows = read_rows(data_path(cfg.data), task=cfg.task)
    n_eval = max(1, int(len(rows) * cfg.eval_fraction))
    train_rows, held_out = rows[:-n_eval], rows[-n_eval:]
    torch.manual_seed(cfg.seed)  # the Dirichlet draws
    labels = [r.get("label", 0) for r in train_rows]
    return held_out, [[train_rows[i] for i in part] for part in partition(labels, cfg.clients, cfg.partition, cfg.seed)]


_BASES: dict[tuple[str, str], tuple] = {}  # (model, task) -> (model, tokenizer): loaded once per process


def base_model(cfg: FedRunConfig) -> tuple[torch.nn.Module, object]:
    from loraforge.core.models import load_model

    if (cfg.model, cfg.task) not in _BASES:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # a new classification head starts the same in every process
            _BASES[cfg.model, cfg.task] = load_model(cfg.model, task=cfg.task, num_labels=cfg.num_labels)
    model, tokenizer = _BASES[cfg.model, cfg.task]
    return copy.deepcopy(model), tokenizer


def with_global(cfg: FedRunConfig, glob: ClientAdapter | None, trainable: bool) -> tuple[torch.nn.Module, object]:
    """A fresh base model carrying the global adapter (merged into the weights for a client that
    starts fresh)."""
    model, tokenizer = base_model(cfg)
    if glob is not None:
        with tempfile.TemporaryDirectory() as tmp:
            write_adapter(glob, Path(tmp) / "g")
            load_adapter(model, Path(tmp) / "g", trainable=trainable)
        if trainable and STRATEGIES.get(cfg.strategy).fresh_clients:
            model = merge_and_unload(model)
    return model, tokenizer


# ---- messages --------------------------------------------------------------------------------------
def encode(adapter: ClientAdapter, **metrics: float) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord({k: v.detach().cpu().contiguous() for k, v in adapter.tensors.items()}),
                       "adapter": ConfigRecord({"config": json.dumps(adapter.config.to_dict()),
                                                "targets": json.dumps(adapter.targets)}),
                       "metrics": MetricRecord(metrics)})


def decode(content: RecordDict, name: str) -> ClientAdapter:
    tensors = content["arrays"].to_torch_state_dict()
    for key, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"{name}: tensor {key!r} holds NaN or inf values")
    config = AdapterConfig.from_dict(json.loads(content["adapter"]["config"]))
    return ClientAdapter(name, config, json.loads(content["adapter"]["targets"]), tensors)


def nbytes(content: RecordDict) -> int:
    return sum(a.numpy().nbytes for a in content["arrays"].values())


# ---- client ----------------------------------------------------------------------------------------
def client_train(msg: Message, context: Context) -> Message:
    cfg = FedRunConfig(**json.loads(msg.content["run"]["config"]))
    k, round_ = int(context.node_config["partition-id"]), int(msg.content["run"]["round"])
    glob = decode(msg.content, "global") if "arrays" in msg.content else None
    model, tokenizer = with_global(cfg, glob, trainable=True)
    if STRATEGIES.get(cfg.strategy).fresh_clients or glob is None:  # a fresh rank-r_k LoRA, alpha = 2 r_k as in FLoRA
        rank = cfg.rank_list()[k % len(cfg.rank_list())]
        attach(model, AdapterConfig(rank=rank, alpha=2.0 * rank, target_modules=parse_targets(cfg.targets),
                                    seed=cfg.seed + 1000 * round_ + k, base_model_name_or_path=cfg.model))
    _, parts = split_rows(cfg)
    data = rows_dataset(parts[k], tokenizer, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        result = train(TrainConfig(model=cfg.model, task=cfg.task, out=tmp, steps=cfg.local_steps, lr=cfg.lr,
                                   batch_size=cfg.batch_size, max_length=cfg.max_length, seed=cfg.seed + round_,
                                   warmup=0.0), model=model, tokenizer=tokenizer, train_data=data, progress=False)
    adapter = ClientAdapter(f"client {k}", result.model.loraforge_config, list(result.model.loraforge_targets),
                            {key: t.detach().clone() for key, t in adapter_state_dict(result.model).items()})
    losses = [r["loss"] for r in result.history if "loss" in r]
    return Message(encode(adapter, num_examples=len(data), train_loss=sum(losses) / len(losses)), reply_to=msg)


client_app = ClientApp()  # what `flwr run` deploys (app.py) and `run` simulates
client_app.train()(client_train)


def rows_dataset(rows: list[dict], tokenizer, cfg: FedRunConfig):
    records = [{k: v for k, v in r.items() if k != "line"} for r in rows]
    columns = {}
    if cfg.task == "classification":
        columns = {"text_column": "text", "label_column": "label", "num_labels": cfg.num_labels}
    return from_records(records, tokenizer, task=cfg.task, max_length=cfg.max_length, **columns)


# ---- server ----------------------------------------------------------------------------------------
def server_main(grid: Grid, context: Context, cfg: FedRunConfig) -> None:
    out = Path(cfg.out)
    rule = cfg.rule()
    glob, start, history = None, 0, []
    if cfg.resume and (out / CHECKPOINT / "state.json").is_file():
        start = json.loads((out / CHECKPOINT / "state.json").read_text())["round"]
        glob = read_client(out / CHECKPOINT / "global")
        history = [json.loads(line) for line in (out / CHECKPOINT / "metrics.jsonl").read_text().splitlines()]
        print(f"resuming after round {start}", flush=True)
    elif not rule.fresh_clients:  # every client starts from one global init
        model, _ = base_model(cfg)
        rank = cfg.rank_list()[0]
        attach(model, AdapterConfig(rank=rank, alpha=2.0 * rank, target_modules=parse_targets(cfg.targets),
                                    seed=cfg.seed, base_model_name_or_path=cfg.model))
        glob = ClientAdapter("global", model.loraforge_config, list(model.loraforge_targets),
                             {k: t.detach().clone() for k, t in adapter_state_dict(model).items()})
    held_out, _ = split_rows(cfg)
    while len(list(grid.get_node_ids())) < cfg.clients:  # simulated nodes register asynchronously
        time.sleep(0.1)
    nodes = sorted(grid.get_node_ids())[:cfg.clients]
    for round_ in range(start + 1, cfg.rounds + 1):
        t0 = time.perf_counter()
        content = encode(glob) if glob is not None else RecordDict()
        content["run"] = ConfigRecord({"config": json.dumps(dataclasses.asdict(cfg)), "round": round_})
        replies = grid.send_and_receive([Message(content, message_type="train", dst_node_id=n) for n in nodes])
        bytes_down = nbytes(content) * len(nodes) if "arrays" in content else 0
        clients, counts, losses, dropped, bytes_up = [], [], [], {}, 0
        for reply in replies:
            name = f"node {reply.metadata.src_node_id}"
            try:
                if reply.has_error():
                    raise LoraforgeError(reply.error.reason)
                client = decode(reply.content, name)
                reference = glob or (clients[0] if clients else client)
                check_clients([reference, client], [0.5, 0.5])
                wrong = [k for k, t in client.tensors.items() if t.shape != reference.tensors[k].shape]
                if wrong and not rule.fresh_clients:  # a client that trained the global keeps its ranks
                    raise AdapterError(f"{name}: key {wrong[0]!r} has shape {tuple(client.tensors[wrong[0]].shape)}, "
                                       f"the global adapter {tuple(reference.tensors[wrong[0]].shape)}")
            except LoraforgeError as exc:
                dropped[name] = str(exc)
                log.warning("round %d: dropped %s: %s", round_, name, exc)
                continue
            clients.append(client)
            counts.append(float(reply.content["metrics"]["num_examples"]))
            losses.append(float(reply.content["metrics"]["train_loss"]))
            bytes_up += nbytes(reply.content)
        if not clients:
            raise LoraforgeError(f"round {round_}: every client failed: {dropped}")
        weights = [n / sum(counts) for n in counts]
        glob = rule.combine(glob, rule.aggregate(clients, weights))
        model, _ = with_global(cfg, glob, trainable=False)
        tokenizer = base_model(cfg)[1]
        metrics = evaluate_dataset(model, rows_dataset(held_out, tokenizer, cfg), batch_size=32,
                                   pad_id=tokenizer.pad_token_id or 0)
        row = {"round": round_, "strategy": cfg.strategy, **{f"eval_{k}": v for k, v in metrics.items()},
               "train_loss": sum(p * x for p, x in zip(weights, losses)), "clients": len(clients),
               "dropped": dropped, "bytes_down": bytes_down,
               "bytes_up": bytes_up, "seconds": time.perf_counter() - t0}
        history.append(row)
        lines = "".join(json.dumps(r) + "\n" for r in history)
        with atomic_dir(out / CHECKPOINT) as tmp:  # adapter, metrics and round counter replaced together
            write_adapter(glob, tmp / "global")
            (tmp / "metrics.jsonl").write_text(lines)
            (tmp / "state.json").write_text(json.dumps({"round": round_, "config": dataclasses.asdict(cfg)}) + "\n")
        write_adapter(glob, out / "global")
        atomic_write_text(out / "metrics.jsonl", lines)
        print(f"round {round_}/{cfg.rounds}: " + " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "strategy"),
            flush=True)
    plot_rounds(history, out / "accuracy.png", cfg)


def plot_rounds(history: list[dict], path: Path, cfg: FedRunConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "eval_accuracy" if cfg.task == "classification" else "eval_loss"
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["round"] for r in history], [r[key] for r in history], "o-", label=cfg.strategy)
    ax.set_xlabel("round")
    ax.set_ylabel(key.removeprefix("eval_") + " (held out)")
    ax.set_title(f"{cfg.model}, {cfg.clients} clients, {cfg.partition}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def prepare(cfg: FedRunConfig) -> None:
    """Refuse bad settings before the simulation starts, and make the output folder."""
    cfg.rule()  # refuses an unknown strategy or a bad setting of it
    cfg.rank_list()
    held_out, parts = split_rows(cfg)
    if cfg.task == "classification":
        cfg.num_labels = max(2, 1 + max(r["label"] for r in held_out + [r for part in parts for r in part]))
    out = Path(cfg.out)
    if cfg.resume and (out / CHECKPOINT / "state.json").is_file():
        saved = json.loads((out / CHECKPOINT / "state.json").read_text())["config"]
        changed = [k for k, v in dataclasses.asdict(cfg).items() if k not in ("rounds", "resume") and saved.get(k) != v]
        if changed:
            raise LoraforgeError(f"--resume: {out} was run with other settings ({', '.join(changed)}); "
                                 "resume with the same ones, or choose another --out")
    elif cfg.resume:
        print(f"no finished round in {out}: starting from round 1", flush=True)
    elif out.is_dir() and any(out.iterdir()):
        raise LoraforgeError(f"{out} is not empty: pass --resume to continue that run, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)


def run(cfg: FedRunConfig, num_cpus: int = 2) -> Path:
    """Run `cfg` in Flower's simulation engine (Ray; one CPU per simulated client at a time)."""
    prepare(cfg)
    server = ServerApp()  # app.server_app reads its settings from Flower's run config; here they are in hand
    server.main()(lambda grid, context: server_main(grid, context, cfg))
    run_simulation(server, client_app, num_supernodes=cfg.clients,
                   backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": num_cpus}})
    return Path(cfg.out)
