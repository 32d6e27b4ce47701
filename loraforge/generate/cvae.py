"""The conditional VAE over flat adapters that ICM-LoRA (arXiv 2501.17635) and SG-LoRA (arXiv 2509.10535)
share, after ICM-LoRA's reference (model/CVAE_design.py):

    x (B, D) ─pad to a multiple of 2^n─> (B, 1, L) ─ n x [Conv1d k=7 s=2, BN, LeakyReLU] ─> (B, C_n, L / 2^n)
        ─flatten, Linear─> h (B, latent);  mu, log sigma^2 = Linear([h; c])
    z = mu + sigma * eps
    [z; c] ─Linear─> (B, C_n, L / 2^n) ─ mirrored (n-1) x [ConvTranspose1d s=2, BN, ELU]
        ─> ConvTranspose1d s=2, BN, ELU, Conv1d k=7 -> 1 channel ─> x_hat (B, L) ─cut─> (B, D)

    loss = MSE(x_hat, x) + beta KL(N(mu, sigma^2) || N(0, I)),  beta = 0.005   (the reference's kld_weight)

The reference's channels are 8,16,32,64,128,256,256,128,64,32,16,8 (n = 12, so L is a multiple of 4096);
`channels` may be narrower for a small machine. The padding is zeros and the loss covers it too, as in
the reference; the decoder's output is cut back to D.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

REFERENCE_CHANNELS = (8, 16, 32, 64, 128, 256, 256, 128, 64, 32, 16, 8)


@dataclass
class CVAEConfig:
    latent_dim: int = 64
    channels: tuple[int, ...] = REFERENCE_CHANNELS
    kernel_size: int = 7
    kld_weight: float = 0.005  # beta, the reference default
    steps: int = 2000
    lr: float = 1e-3
    batch_size: int = 16
    seed: int = 0


def kl_standard_normal(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(log_var)) || N(0, I)) summed over the latent, averaged over the batch (the reference's form)."""
    return (-0.5 * (1 + log_var - mu.pow(2) - log_var.exp()).sum(dim=1)).mean()


class CVAE(nn.Module):
    def __init__(self, length: int, condition_dim: int, config: CVAEConfig):
        super().__init__()
        self.length, self.condition_dim, self.config = length, condition_dim, config
        channels, k = list(config.channels), config.kernel_size
        block = 2 ** len(channels)
        self.padded = -(-length // block) * block  # L
        self.last = self.padded // block  # L / 2^n
        layers, c_in = [], 1
        for c in channels:
            layers.append(nn.Sequential(nn.Conv1d(c_in, c, k, 2, k // 2), nn.BatchNorm1d(c), nn.LeakyReLU()))
            c_in = c
        self.encoder = nn.Sequential(*layers)
        self.to_latent = nn.Linear(self.last * channels[-1], config.latent_dim)
        self.fc_mu = nn.Linear(config.latent_dim + condition_dim, config.latent_dim)
        self.fc_var = nn.Linear(config.latent_dim + condition_dim, config.latent_dim)
        self.to_decode = nn.Linear(config.latent_dim + condition_dim, self.last * channels[-1])
        mirrored = channels[::-1]
        self.decoder = nn.Sequential(*[
            nn.Sequential(nn.ConvTranspose1d(a, b, k, 2, k // 2, output_padding=1), nn.BatchNorm1d(b), nn.ELU())
            for a, b in zip(mirrored[:-1], mirrored[1:])])
        self.final = nn.Sequential(
            nn.ConvTranspose1d(mirrored[-1], mirrored[-1], k, 2, k // 2, output_padding=1),
            nn.BatchNorm1d(mirrored[-1]), nn.ELU(), nn.Conv1d(mirrored[-1], 1, k, 1, k // 2))

    def encode(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(F.pad(x, (0, self.padded - self.length))[:, None, :])  # (B, C_n, L / 2^n)
        h = torch.cat([self.to_latent(h.flatten(1)), c], dim=-1)  # (B, latent + cond)
        return self.fc_mu(h), self.fc_var(h)

    def decode(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.decode_padded(z, c)[:, :self.length]  # (B, D): the padding cut

    def decode_padded(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.to_decode(torch.cat([z, c], dim=-1)).view(-1, self.config.channels[-1], self.last)
        return self.final(self.decoder(h))[:, 0, :]  # (B, L)

    def loss(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, reconstruction MSE, KL) of a batch; the MSE is over the padded length, as the reference's."""
        mu, log_var = self.encode(x, c)
        z = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)
        mse = F.mse_loss(self.decode_padded(z, c), F.pad(x, (0, self.padded - self.length)))
        kld = kl_standard_normal(mu, log_var)
        return mse + self.config.kld_weight * kld, mse, kld

    @torch.no_grad()
    def sample(self, c: torch.Tensor, seed: int | None) -> torch.Tensor:
        """x_hat (B, D) for conditions c (B, cond): z ~ N(0, I) from `seed`, or z = 0 when seed is None."""
        self.eval()
        if seed is None:
            z = torch.zeros(len(c), self.config.latent_dim)
        else:
            z = torch.randn(len(c), self.config.latent_dim, generator=torch.Generator().manual_seed(seed))
        return self.decode(z, c)


def train_cvae(x: torch.Tensor, c: torch.Tensor, config: CVAEConfig, progress: bool = True) -> tuple[CVAE, list[dict]]:
    """Fit a CVAE to flat adapters x (N, D) under conditions c (N, cond); returns it (eval mode, on the CPU)
    and its log."""
    from tqdm.auto import tqdm

    from loraforge.core.models import default_device

    torch.manual_seed(config.seed)
    device = default_device()  # the GPU where there is one: the reference CVAE is ~16 GFLOP per SmolLM2 adapter
    model = CVAE(x.shape[1], c.shape[1], config).to(device)
    x, c = x.to(device), c.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps)
    rng = torch.Generator().manual_seed(config.seed)
    history = []
    model.train()
    bar = tqdm(range(config.steps), disable=not progress, desc="cvae", unit="step")
    for step in bar:
        rows = torch.randperm(len(x), generator=rng)[:config.batch_size]
        if len(rows) == 1:  # BatchNorm needs a second value per channel only at L / 2^n == 1; repeat the row
            rows = rows.repeat(2)
        loss, mse, kld = model.loss(x[rows], c[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % 50 == 0 or step + 1 == config.steps:
            history.append({"step": step + 1, "loss": loss.item(), "mse": mse.item(), "kl": kld.item()})
            bar.set_postfix(mse=f"{mse.item():.4f}", kl=f"{kld.item():.2f}")
    recalibrate_batchnorm(model, x, c)
    return model.cpu(), history


@torch.no_grad()
def recalibrate_batchnorm(model: CVAE, x: torch.Tensor, c: torch.Tensor) -> None:
    """Set every BatchNorm's running statistics to the exact (biased) statistics of the whole training set,
    encoded at z = mu, then leave the model in eval mode. Training-time running averages lag the weights and
    use the unbiased variance: at the deepest layers a channel sees only B values per batch, so eval-mode
    outputs would differ from what training fitted (by a factor 2 in variance for B = 2)."""
    if len(x) == 1:  # BatchNorm needs two values per channel where the length is 1; a repeat changes no statistic
        x, c = x.repeat(2, 1), c.repeat(2, 1)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    counts = {}
    hooks = [m.register_forward_hook(lambda m, i, o: counts.__setitem__(m, i[0].numel() // i[0].shape[1]))
             for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: after one batch, exactly that batch's statistics
    model.train()
    mu, _ = model.encode(x, c)
    model.decode(mu, c)
    for h in hooks:
        h.remove()
    for m in norms:
        n = counts[m]
        m.running_var.mul_((n - 1) / n)  # unbiased -> biased, the variance training normalised by
        m.momentum = 0.1
    model.eval()
