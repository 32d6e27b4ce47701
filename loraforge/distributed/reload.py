"""The trained model back in the caller's process: the workers of a `--num-processes` run train
copies of their own and leave only files, which the parent reads into the model it was given."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from loraforge.training.config import TrainConfig


def trained_model(config: TrainConfig, out: Path, model: nn.Module | None, tokenizer: Any) -> tuple[nn.Module, Any]:
    """The caller's model (or a freshly loaded base) carrying the adapter the workers wrote."""
    from safetensors.torch import load_file

    from loraforge.adapters.inject import adapter_state_dict, is_attached
    from loraforge.adapters.io import load_adapter, load_pretrained
    from loraforge.training.checkpoint import CHECKPOINT_DIR

    if model is None:
        return load_pretrained(config.model, out / "adapter", task=config.task, num_labels=config.num_labels)
    if not is_attached(model):
        # The workers attached and initialised their own copies; the export is what they trained,
        # written for the untouched base this model still is (PiSSA's residual folded back, LoRA-XS's
        # frozen factors multiplied in), so it is loaded rather than the native tensors.
        load_adapter(model, out / "adapter", trainable=True)
        return model.eval(), tokenizer
    # The caller attached the adapter: the checkpoint holds its tensors exactly as trained.
    own = adapter_state_dict(model)
    with torch.no_grad():
        for key, tensor in load_file(str(out / CHECKPOINT_DIR / "trainable.safetensors")).items():
            own[key].copy_(tensor)
    model.eval()
    return model, tokenizer
