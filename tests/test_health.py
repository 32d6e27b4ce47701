"""Dead-run detection (issue 19, item 6): a run whose adapter stops learning ends with a named error,
exit 2, its last good checkpoint kept; a healthy run is bit for bit what it was without the check."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from loraforge.cli import main
from loraforge.core.errors import LoraforgeError, TrainingError
from loraforge.testing import tiny_llama, tiny_tokenizer
from loraforge.training.config import TrainConfig
from loraforge.training.data import from_records
from loraforge.training.health import HealthCheck
from loraforge.training.loop import train

TOK = tiny_tokenizer()
ROWS = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                      {"role": "assistant", "content": f"## Sum\n- {2 * i}"}]} for i in range(16)]


def run(tmp_path, name, **kw):
    config = TrainConfig(out=str(tmp_path / name), **(dict(rank=4, alpha=8, steps=8, lr=5e-3, batch_size=4,
                                                           precision="fp32", targets="q_proj,v_proj") | kw))
    torch.manual_seed(0)
    return train(config, model=tiny_llama(), tokenizer=TOK, train_data=from_records(ROWS, TOK, max_length=48),
                 progress=False)


def test_huge_lr_stops_at_once_naming_the_bound(tmp_path):
    with pytest.raises(TrainingError, match=r"dead run stopped at step 1: the adapter weights' RMS is .* "
                                            r"--health-max-growth sets .*--no-health-check"):
        run(tmp_path, "dead", lr=1e9, steps=30, save_every=1)
    assert not (tmp_path / "dead" / "adapter").exists()  # no adapter that looks like a result
    # With the growth bound lifted, the same run turns non-finite at the next step: that is named too.
    with pytest.raises(TrainingError, match=r"step 2: .* is not finite"):
        run(tmp_path, "dead2", lr=1e9, steps=30, health_max_growth=math.inf, health_max_update=math.inf)


def test_vanished_gradients_keep_the_last_good_checkpoint(tmp_path):
    # Every gradient norm counts as vanished: the window of 3 ends the run at step 3, and the checkpoint
    # on disk is step 2's, the last one written before the failed check.
    with pytest.raises(TrainingError, match=r"step 3: the gradient norm .* for 3 steps.*intact.*--health-window") as err:
        run(tmp_path, "quiet", steps=10, save_every=1, health_window=3, health_min_grad_norm=1e9)
    out = tmp_path / "quiet"
    assert str(out / "checkpoint") in str(err.value) and not (out / "adapter").exists()
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    weights = load_file(str(out / "checkpoint" / "trainable.safetensors"))
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    assert run(tmp_path, "window-off", steps=4, health_window=0, health_min_grad_norm=1e9).history[-1]["step"] == 4


def test_healthy_run_is_bitwise_unchanged(tmp_path):
    on = run(tmp_path, "on", steps=6)
    off = run(tmp_path, "off", steps=6, health_check=False)
    assert [r["loss"] for r in on.history] == [r["loss"] for r in off.history]
    assert [r["grad_norm"] for r in on.history] == [r["grad_norm"] for r in off.history]
    a, b = (load_file(str(r.out / "adapter" / "adapter_model.safetensors")) for r in (on, off))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_negative_bound_refused():
    with pytest.raises(LoraforgeError, match="--health-max-loss"):
        TrainConfig(health_max_loss=-1.0).validate()


def test_cli_exit_2_names_the_check(tmp_path, capsys):
    tiny_llama().save_pretrained(tmp_path / "model")
    TOK.save_pretrained(tmp_path / "model")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    code = main(["train", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "d.jsonl"), "--lr", "1e9",
                 "--steps", "30", "--rank", "4", "--batch-size", "4", "--targets", "q_proj,v_proj",
                 "--out", str(tmp_path / "cli")])
    err = capsys.readouterr().err
    assert code == 2 and "dead run stopped" in err and "--no-health-check" in err and "Traceback" not in err


class _OneRank:
    @staticmethod
    def sum(values):
        return values


def test_divergence_bound_floors_a_fitted_start(tmp_path):
    """A second phase on a fitted adapter starts near 0 loss: 10x of that is not divergence; 10x the floor is."""
    weight = torch.nn.Parameter(torch.ones(4))
    check = HealthCheck(TrainConfig(health_max_loss=10.0), [weight], _OneRank(), tmp_path)
    check.check(1, 0.07, 1.0, 1.0)
    check.check(2, 0.7, 1.0, 1.0)  # 10x the first loss, below 10x the floor of 1.0
    with pytest.raises(TrainingError, match=r"the loss 11 is more than 10 times the first step's 0.07 \(floored at 1\)"):
        check.check(3, 11.0, 1.0, 1.0)
