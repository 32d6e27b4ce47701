"""ICM-LoRA on a tiny zoo (icm-lora.md checks 4-5, the generator folder, the CLI)."""

import json

import pytest
import torch
from generate_helpers import probe_logits, tiny_zoo

from loraforge.cli import main
from loraforge.core.errors import LoraforgeError
from loraforge.generate.cvae import CVAEConfig
from loraforge.generate.generator import write_generated
from loraforge.generate.icm_lora import ICMLoRA, ICMLoRAConfig, train_icm_lora

CHANNELS = (8, 16, 32, 32, 32, 32, 32, 32, 32, 32, 16, 8)


@pytest.fixture(scope="module")
def one_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("icm")
    zoo = tiny_zoo(root, ["3"])
    config = ICMLoRAConfig(cvae=CVAEConfig(channels=CHANNELS, latent_dim=16, steps=800, lr=3e-3), prompts=2, shots=2)
    gen = train_icm_lora(zoo, root / "gen", config, progress=False)
    return root, zoo, gen


def test_overfit_one_task_reproduces_the_checkpoint(one_task):
    root, zoo, gen = one_task
    icm = ICMLoRA.load(gen)
    vector = icm.vector_of(zoo.tasks[0].train)  # the task's own vector, as in training
    out = write_generated(root / "sampled", icm.record, icm.generate(vector, seed=None), {"z": "zero"})
    base, want, got = probe_logits(None), probe_logits(zoo.tasks[0].final), probe_logits(str(out))
    assert (want - base).norm() / base.norm() > 1e-2  # the checkpoint changes the outputs
    assert (got - want).norm() / want.norm() < 1e-3
    assert (got - want).norm() / (want - base).norm() < 0.05  # and the generated one changes them the same way


def test_sampling_is_deterministic_per_seed(one_task):
    _, zoo, gen = one_task
    icm = ICMLoRA.load(gen)
    vector = torch.randn(32)
    first, again = icm.generate(vector, seed=7), icm.generate(vector, seed=7)
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_generator_records_zoo_base_and_shapes_and_refuses_another_base(one_task):
    root, zoo, gen = one_task
    record = json.loads((gen / "generator.json").read_text())
    assert record["kind"] == "icm-lora" and record["base_model"] == zoo.model
    assert record["zoo"] == str(zoo.root.resolve()) and len(record["keys"]) == len(record["shapes"]) == 8
    with pytest.raises(LoraforgeError, match="makes adapters for"):
        ICMLoRA.load(gen, model="smollm2-135m")


def test_cli_train_and_sample(one_task, tmp_path, capsys):
    root, zoo, _ = one_task
    gen = tmp_path / "gen"
    assert main(["generator", "train", "--kind", "icm-lora", "--zoo", str(zoo.root), "--out", str(gen),
                 "--steps", "2", "--channels", "4,4,4,4,4,4,4,4,4,4,4,4", "--latent-dim", "4"]) == 0
    out = tmp_path / "adapter"
    assert main(["generator", "sample", "--generator", str(gen), "--examples", zoo.tasks[0].train, "--seed", "1",
                 "--out", str(out)]) == 0
    from peft import PeftModel

    from loraforge.testing import tiny_llama

    PeftModel.from_pretrained(tiny_llama(), out)  # an ordinary PEFT LoRA folder
    assert main(["generator", "sample", "--generator", str(gen), "--description", "Add 3 to the number.",
                 "--out", str(tmp_path / "x")]) == 2
    assert main(["generator", "sample", "--generator", str(gen), "--examples", zoo.tasks[0].train,
                 "--model", "smollm2-135m", "--out", str(tmp_path / "x")]) == 2
    assert "conditions on examples" in capsys.readouterr().err
