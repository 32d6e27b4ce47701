"""Dead-run detection: stop a run whose adapter no longer learns, before it is saved as if it had.

A run with a learning rate far too high (`--lr 1e9`) need not produce a NaN: AdamW's step is
about lr in size whatever the gradient, so the weights jump to ~1e9, the activations saturate,
and the gradient norm is exactly 0 from then on while the loss stays finite. Four signs are read
once per optimizer step, never per micro-batch:

- non-finite: the gradient norm or the weights' norm is inf or NaN;
- vanishing gradients: the gradient norm at most `health_min_grad_norm` for `health_window`
  steps in a row;
- weights beyond bounds: the trainable weights' RMS above `health_max_growth` times its value
  at the start (floored at FLOOR, as LoRA's B starts at 0), or one step changing the weights'
  norm by more than `health_max_update` times it: |‖θ_t‖ - ‖θ_{t-1}‖| / ‖θ_{t-1}‖ is a lower bound
  of the update-to-weight ratio ‖Δθ‖ / ‖θ‖ that needs no copy of the weights;
- divergence: the loss above `health_max_loss` times the run's first loss, floored at LOSS_FLOOR
  (a run that starts on an adapter already fitted, a second phase, may begin at a loss of 0.07
  and meet 0.7 on its first batch of new rows: that is learning, not divergence).

The weights' squared norm is read in the same device-to-host copy as the gradient norm, which the
loop reads anyway, so a step with the check on waits for the device no more often than without.
Not run under FSDP or ZeRO (`--fsdp`, `--zero-stage`): their parameters are shards. The check runs
before the step's checkpoint is written, so the checkpoint on disk holds weights
that passed it (the loss of a step's update shows one step later).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from loraforge.core.errors import TrainingError
from loraforge.training.config import TrainConfig

FLOOR = 0.1  # RMS below which a weight's scale counts as this: a zero start must not make every step a blow-up
LOSS_FLOOR = 1.0  # mean loss per label token below which the first loss counts as this


class HealthCheck:
    """The signs of a dead run, updated once per optimizer step (see the module docstring)."""

    def __init__(self, config: TrainConfig, params: Sequence[nn.Parameter], runtime, checkpoint: Path):
        self.config, self.params, self.runtime, self.checkpoint = config, list(params), runtime, checkpoint
        # Sharded engines (FSDP2, ZeRO) hold parameters as shards or empty placeholders whose norms do
        # not read as the weights' own: the check is not run there yet.
        sharded = config.fsdp or config.zero_stage or any(hasattr(p, "ds_id") or hasattr(p, "to_local")
                                                          for p in self.params)  # also under `accelerate launch`
        self.on = config.health_check and bool(self.params) and not sharded
        self.first_loss: float | None = None
        self.quiet_steps = 0
        if self.on:
            self.numel = self.runtime.sum([float(sum(p.numel() for p in self.params))])[0]
            self.start_rms = self.prev_rms = self._rms(self._squared_norm().item())

    def _squared_norm(self) -> torch.Tensor:
        return torch.stack([p.detach().float().pow(2).sum() for p in self.params]).sum()

    def _rms(self, local_squared: float) -> float:
        return math.sqrt(self.runtime.sum([local_squared])[0] / max(1.0, self.numel))

    def read(self, grad_norm: torch.Tensor | float) -> tuple[float, float | None]:
        """The gradient norm and (check on) the weights' RMS, in one read from the device."""
        if not self.on:
            return float(grad_norm), None
        squared = self._squared_norm()
        if isinstance(grad_norm, torch.Tensor):
            norm, local = torch.stack([grad_norm.detach().float().to(squared.device), squared]).tolist()
        else:
            norm, local = float(grad_norm), squared.item()
        return norm, self._rms(local)

    def check(self, step: int, loss: float, grad_norm: float, rms: float | None) -> None:
        """Raise TrainingError naming what went wrong and the flag that controls that check."""
        if not self.on or rms is None:
            return
        c = self.config
        if self.first_loss is None:
            self.first_loss = loss
        self.quiet_steps = self.quiet_steps + 1 if grad_norm <= c.health_min_grad_norm else 0
        change = abs(rms - self.prev_rms) / max(self.prev_rms, FLOOR)
        problem = None
        if not (math.isfinite(grad_norm) and math.isfinite(rms)):
            problem = f"the gradient norm ({grad_norm}) or the weights' RMS ({rms}) is not finite", None
        elif c.health_window and self.quiet_steps >= c.health_window:
            problem = (f"the gradient norm has been {grad_norm:.3g} (at most --health-min-grad-norm "
                       f"{c.health_min_grad_norm:g}) for {self.quiet_steps} steps: the adapter no longer learns",
                       "--health-window")
        elif rms > c.health_max_growth * max(self.start_rms, FLOOR):
            problem = (f"the adapter weights' RMS is {rms:.3g}, more than {c.health_max_growth:g} times its start "
                       f"{self.start_rms:.3g}", "--health-max-growth")
        elif change > c.health_max_update:
            problem = (f"one step changed the weights' norm by {change:.3g} times it (RMS {self.prev_rms:.3g} -> "
                       f"{rms:.3g})", "--health-max-update")
        elif loss > c.health_max_loss * max(self.first_loss, LOSS_FLOOR):
            problem = (f"the loss {loss:.4g} is more than {c.health_max_loss:g} times the first step's "
                       f"{self.first_loss:.4g} (floored at {LOSS_FLOOR:g})", "--health-max-loss")
        self.prev_rms = rms
        if problem is not None:
            what, flag = problem
            kept = (f"the last good checkpoint in {self.checkpoint} is intact" if (self.checkpoint / "trainer_state.json").is_file()
                    else "no checkpoint had been written yet")
            bound = f"{flag} sets this check's bound, " if flag else ""
            raise TrainingError(f"dead run stopped at step {step}: {what}. Nothing was saved from this step and no "
                                f"adapter written; {kept}. Lower --lr; {bound}--no-health-check turns the checks off.")
