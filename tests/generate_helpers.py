"""A tiny zoo for the generator tests: tiny Llama, offset tasks, few steps at a high rate so the adapters
move far from their start (a probe test must be able to tell a wrong adapter from the right one)."""

from pathlib import Path

import torch

from loraforge.adapters.io import load_adapter
from loraforge.generate.zoo import ZooConfig, build_zoo, load_zoo
from loraforge.testing import tiny_llama, tiny_tokenizer


def tiny_model_folder(folder: Path) -> str:
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def tiny_zoo(root: Path, values: list[str], checkpoints: int = 1):
    model = tiny_model_folder(root / "tiny")
    build_zoo(ZooConfig(family="offset", values=values, model=model, out=str(root / "zoo"), steps=6, lr=0.01,
                        checkpoints=checkpoints, restart_steps=2, rank=2, batch_size=4, n_train=24, n_test=4),
              progress=False)
    return load_zoo(root / "zoo")


def probe_logits(adapter: str | None, seed: int = 0) -> torch.Tensor:
    """The tiny Llama's logits on fixed random tokens, with the adapter loaded (None: the base)."""
    model = tiny_llama()
    if adapter is not None:
        load_adapter(model, adapter)
    ids = torch.randint(5, 100, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits
