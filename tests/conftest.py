"""Test-wide settings, and the fixture that kills a training run mid-way."""

import contextlib
from typing import Callable, ContextManager

import pytest
import torch

# The suite's models are tiny: one thread is faster than two fighting over small matmuls,
# and it leaves the second core to whatever else the machine runs.
torch.set_num_threads(1)


@pytest.fixture
def kill_at_step(monkeypatch) -> Callable[[int], ContextManager[None]]:
    """`with kill_at_step(k): train(...)`: the run stops as a kill would (KeyboardInterrupt) when
    optimizer step k (0-based) begins, and must; after the block the trainer is whole again."""
    from loraforge.training.loop import lr_at

    @contextlib.contextmanager
    def killed(step: int):
        def lr_or_kill(at: int, config) -> float:
            if at == step:
                raise KeyboardInterrupt
            return lr_at(at, config)

        monkeypatch.setattr("loraforge.training.loop.lr_at", lr_or_kill)
        try:
            with pytest.raises(KeyboardInterrupt):
                yield
        finally:
            monkeypatch.setattr("loraforge.training.loop.lr_at", lr_at)

    return killed


def pytest_collection_modifyitems(items):
    """Tests parametrised over the pool's kernels skip "native", with the compiler's reason, only on a
    machine where lowrank.c cannot be built (everywhere else they run it)."""
    from loraforge.serve import native

    for item in items:
        if getattr(item, "callspec", None) is not None and item.callspec.params.get("kernel") == "native" \
                and native.library() is None:
            item.add_marker(pytest.mark.skip(reason=f"lowrank.c cannot be built here: {native.load()[1]}"))
