"""ABMLL: Amortized Bayesian Meta-Learning for Low-Rank Adaptation of LLMs (arXiv 2508.14285).

Each adapted matrix W0 (d_out x d_in) carries four LoRA pairs: the global prior's (theta) and the current
task's posterior (phi), each a mean and a standard deviation, both low rank:

    mu = B_mu A_mu,   sigma = |B_s A_s| + c          (c > 0; |.| keeps sigma >= 0 and is 0 at B_s = 0)
    W  = W0 + mu + sigma * eps,  eps ~ N(0, I)       one eps per forward (reparameterised)

Meta-objective over a meta-batch of tasks i (minimised; KL terms per adapted weight, so that beta and
gamma do not scale with the model's size, the mismatch the paper's two weights exist to fix):

    sum_i [ -log p(D_i^query | phi_i) + beta KL(q(phi_i) || p(phi_i | theta)) ] + gamma KL(q(theta) || p(theta))

    q(phi_i) = N(mu_phi, sigma_phi^2),  p(phi_i | theta) = N(mu_theta, sigma_theta^2),  p(theta) = N(0, prior_std^2)

Amortised inference of q(phi_i) (ABML): phi_i starts at theta and takes `inner_steps` Adam steps on the
support set's -log p + beta KL. The outer gradient is first order: phi_i = theta + stop_grad(phi_i - theta),
so the query loss reaches theta without second-order terms. Prediction on a new task: adapt phi from theta
on its few examples, then average the label probabilities over S weight samples (calibration.py).

The paper leaves the shape of c.I for d_out != d_in, the positivity transform, the inner steps and S open:
here c is added to every entry, |.| is the transform, 5 inner steps, S = 8.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.core.errors import LoraforgeError
from loraforge.core.modules import replace_module, submodule

FACTORS = ("mu_A", "mu_B", "sigma_A", "sigma_B")


@dataclass
class ABMLLConfig:
    rank: int = 4
    c: float = 1e-3  # sigma's floor
    prior_std: float = 1e-2  # p(theta) = N(0, prior_std^2)
    beta: float = 1e-2  # task fidelity: KL(q(phi) || p(phi | theta)) per weight
    gamma: float = 1e-3  # global regularisation: KL(q(theta) || p(theta)) per weight
    meta_steps: int = 200
    tasks_per_step: int = 4
    support: int = 8  # rows per task's support set
    query: int = 8
    inner_steps: int = 5
    inner_lr: float = 5e-3
    outer_lr: float = 1e-3
    samples: int = 8  # S weight samples for prediction
    max_length: int = 256  # an SST-2 row and its answer fit whole
    seed: int = 0


def gaussian_kl(mu_q: torch.Tensor, sigma_q: torch.Tensor, mu_p: torch.Tensor, sigma_p: torch.Tensor) -> torch.Tensor:
    """KL(N(mu_q, sigma_q^2) || N(mu_p, sigma_p^2)), summed over entries (diagonal Gaussians)."""
    return (torch.log(sigma_p / sigma_q) + (sigma_q ** 2 + (mu_q - mu_p) ** 2) / (2 * sigma_p ** 2) - 0.5).sum()


class BayesLoRALinear(nn.Module):
    """A frozen Linear with theta's and phi's (mu, sigma) factor pairs. `mode` picks the factors the forward
    uses: "theta", "phi" (the task's own leaf tensors: inner steps), "outer" (theta + stop_grad(phi - theta))."""

    def __init__(self, base: nn.Linear, rank: int, c: float):
        super().__init__()
        self.base, self.c = base, c
        d_out, d_in = base.weight.shape
        self.theta, self.phi = nn.ParameterDict(), nn.ParameterDict()
        for name, shape in (("mu_A", (rank, d_in)), ("mu_B", (d_out, rank)), ("sigma_A", (rank, d_in)),
                            ("sigma_B", (d_out, rank))):
            tensor = torch.zeros(shape, device=base.weight.device)
            if name.endswith("A"):
                nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))  # LoRA's start: B = 0, so mu = 0, sigma = c
            self.theta[name] = nn.Parameter(tensor)
            self.phi[name] = nn.Parameter(tensor.clone())
        self.mode, self.sample = "theta", True

    def factors(self, mode: str | None = None) -> dict[str, torch.Tensor]:
        mode = mode or self.mode
        if mode == "theta":
            return dict(self.theta)
        if mode == "phi":
            return dict(self.phi)
        return {k: self.theta[k] + (self.phi[k] - self.theta[k]).detach() for k in FACTORS}

    def moments(self, mode: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.factors(mode)
        return f["mu_B"] @ f["mu_A"], (f["sigma_B"] @ f["sigma_A"]).abs() + self.c  # (d_out, d_in) each

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu, sigma = self.moments()
        delta = mu + sigma * torch.randn_like(mu) if self.sample else mu  # (d_out, d_in)
        return self.base(x) + F.linear(x, delta.to(x.dtype))


def attach_bayes(model: nn.Module, targets: list[str], config: ABMLLConfig) -> list[BayesLoRALinear]:
    """Wrap each target Linear (module paths) in a BayesLoRALinear; freeze the base. Returns the layers."""
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(config.seed)
    layers = []
    for name in targets:
        base = submodule(model, name)
        if not isinstance(base, nn.Linear):
            raise LoraforgeError(f"ABMLL adapts nn.Linear layers; {name} is a {type(base).__name__}")
        layer = BayesLoRALinear(base, config.rank, config.c)
        replace_module(model, name, layer)
        layers.append(layer)
    return layers


def detach_bayes(model: nn.Module, targets: list[str]) -> None:
    """Put back the plain Linear layers `attach_bayes` wrapped."""
    for name in targets:
        replace_module(model, name, submodule(model, name).base)


def set_mode(layers: list[BayesLoRALinear], mode: str, sample: bool = True) -> None:
    for layer in layers:
        layer.mode, layer.sample = mode, sample


def task_kl(layers: list[BayesLoRALinear], mode: str = "phi") -> torch.Tensor:
    """KL(q(phi) || p(phi | theta)) per adapted weight."""
    total = sum(gaussian_kl(*layer.moments(mode), *layer.moments("theta")) for layer in layers)
    return total / sum(layer.base.weight.numel() for layer in layers)


def prior_kl(layers: list[BayesLoRALinear], prior_std: float) -> torch.Tensor:
    """KL(q(theta) || N(0, prior_std^2)) per adapted weight."""
    total = 0.0
    for layer in layers:
        mu, sigma = layer.moments("theta")
        total = total + gaussian_kl(mu, sigma, torch.zeros_like(mu), torch.full_like(sigma, prior_std))
    return total / sum(layer.base.weight.numel() for layer in layers)


def adapt(layers: list[BayesLoRALinear], nll: Any, support: list[Any], config: ABMLLConfig, steps: int) -> None:
    """Amortised inference: phi <- theta, then `steps` Adam steps on the support's -log p + beta KL."""
    with torch.no_grad():
        for layer in layers:
            for k in FACTORS:
                layer.phi[k].copy_(layer.theta[k])
    params = [layer.phi[k] for layer in layers for k in FACTORS]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=config.inner_lr)
    set_mode(layers, "phi")
    for _ in range(steps):
        loss = nll(support) + (config.beta * task_kl(layers) if config.beta else 0.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    for p in params:
        p.requires_grad_(False)
        p.grad = None


def meta_train(layers: list[BayesLoRALinear], nll: Any, tasks: list[list[Any]], config: ABMLLConfig,
               progress: bool = True) -> list[dict[str, float]]:
    """The meta-objective over `tasks` (each a list of rows nll() takes); returns the log."""
    from tqdm.auto import tqdm

    theta = [layer.theta[k] for layer in layers for k in FACTORS]
    for p in theta:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(theta, lr=config.outer_lr)
    rng = random.Random(config.seed)
    history = []
    bar = tqdm(range(config.meta_steps), disable=not progress, desc="abmll", unit="step")
    for step in bar:
        chosen = rng.sample(range(len(tasks)), min(config.tasks_per_step, len(tasks)))
        query_sum = 0.0
        optimizer.zero_grad(set_to_none=True)
        for i in chosen:
            rows = rng.sample(tasks[i], min(config.support + config.query, len(tasks[i])))
            support, query = rows[:config.support], rows[config.support:] or rows[:config.support]
            adapt(layers, nll, support, config, config.inner_steps)
            set_mode(layers, "outer")
            query_nll = nll(query)
            loss = query_nll + (config.beta * task_kl(layers, "outer") if config.beta else 0.0)
            (loss / len(chosen)).backward()
            query_sum += query_nll.item() / len(chosen)
        if config.gamma:
            set_mode(layers, "theta")
            (config.gamma * prior_kl(layers, config.prior_std)).backward()
        optimizer.step()
        if (step + 1) % 10 == 0 or step + 1 == config.meta_steps:
            history.append({"step": step + 1, "query_nll": query_sum})
            bar.set_postfix(query_nll=f"{query_sum:.4f}")
    for p in theta:
        p.requires_grad_(False)
    set_mode(layers, "theta")
    return history


def factor_tensors(layers: list[BayesLoRALinear], targets: list[str], which: str) -> dict[str, torch.Tensor]:
    params = {"theta": lambda layer: layer.theta, "phi": lambda layer: layer.phi}[which]
    return {f"{name}.{k}": params(layer)[k].detach().cpu() for name, layer in zip(targets, layers) for k in FACTORS}


def load_factors(layers: list[BayesLoRALinear], targets: list[str], tensors: dict[str, torch.Tensor], which: str,
                 where: str) -> None:
    with torch.no_grad():
        for name, layer in zip(targets, layers):
            for k in FACTORS:
                key = f"{name}.{k}"
                own = getattr(layer, which)[k]
                if key not in tensors or tensors[key].shape != own.shape:
                    raise LoraforgeError(f"{where}: {key} is missing or has another shape than the model's layer")
                own.copy_(tensors[key])
