"""Full fine-tuning: every weight of the model trains. The baseline LoRA is measured against.

"LoRA vs Full Fine-tuning: An Illusion of Equivalence" (Shuttleworth et al., arXiv 2410.21228)
compares the two through the same task; `loraforge train --method full` runs it through the same
trainer, checkpoints and resume as any adapter, so the only difference between two runs is the
parametrisation. Nothing is wrapped: `attach` unfreezes the base parameters, and the method's state
(what `save_adapter` writes as `adapter_model.safetensors` and the checkpoint holds) is every
parameter of the model, tied ones once. `loraforge analyze` reads such a folder as full weights
(W' itself, not an update) against a freshly loaded base.

Since the weights change in place, `detach` cannot give W0 back: load the base again instead.
Use a learning rate about ten times smaller than LoRA's (1e-5 to 1e-4).
"""

from __future__ import annotations

from torch import nn

from loraforge.core.config import AdapterConfig
from loraforge.core.registry import register


@register("full", axis="baseline", paper="Full fine-tuning, the baseline of LoRA vs Full Fine-tuning: An Illusion "
                                         "of Equivalence (arXiv 2410.21228)", trains_base=True)
def attach_full(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Unfreeze every parameter; no module is replaced, so no path is returned."""
    for param in model.parameters():
        param.requires_grad_(True)
    return []
