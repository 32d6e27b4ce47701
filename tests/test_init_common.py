"""Checks every initialiser passes, as a table over (method, init) x tiny model, plus the registry:
composition with every registered method, bad input, the trainer and the CLI."""

import json

import pytest
import torch
from peft import PeftModel
from test_methods_common import logits, perturb
from torch import nn

import loraforge as lf
from loraforge.cli import train_config_from_argv
from loraforge.core.registry import initializers, resolve_initializer
from loraforge.testing import TINY_MODELS, assert_same_outputs, tiny_llama, tiny_tokenizer
from loraforge.training.config import TrainConfig
from loraforge.training.data import from_records
from loraforge.training.loop import train

STARTS = [("lora", "pissa"), ("lora", "lora-ga"), ("lora", "eva"), ("lora-xs", "default"), ("lora-sb", "default")]
OUTPUT_KEPT = {"pissa", "lora-ga", "eva"}  # the output equals the base model's at init (spec check 1)


def data_for(model_name: str, n: int = 24):
    tok = tiny_tokenizer()
    if model_name == "bert":
        return from_records([{"text": f"row {i} " + "ab" * (i % 5), "label": i % 2} for i in range(n)], tok,
                            task="classification")
    return from_records([{"prompt": f"q {i} " * 2, "completion": f"a {i % 7}"} for i in range(n)], tok)


def started(model_name: str, method: str, init: str, **kw) -> nn.Module:
    cfg = lf.AdapterConfig(**{"method": method, "init": init, "rank": 4, "alpha": 8, "seed": 0, **kw})
    model = lf.attach(TINY_MODELS[model_name](), cfg)
    lf.initialize(model, data_for(model_name), batches=3, batch_size=8, lr=1e-3, progress=False)
    return model


@pytest.mark.filterwarnings("ignore:EVA")
@pytest.mark.parametrize("model_name", TINY_MODELS)
@pytest.mark.parametrize("method,init", STARTS)
def test_started_adapter_round_trips_onto_a_fresh_base(method, init, model_name, tmp_path):
    base_logits = logits(TINY_MODELS[model_name]())
    model = started(model_name, method, init)
    fresh = dict(TINY_MODELS[model_name]().named_parameters())
    for name, p in model.named_parameters():  # the start never writes into the base weights
        assert p.requires_grad or torch.equal(p, fresh[name.replace(".base_layer", "")]), name
    if init in OUTPUT_KEPT:
        torch.testing.assert_close(logits(model), base_logits, atol=1e-5, rtol=0)
    trained = logits(perturb(model, seed=1))
    lf.save_adapter(model, tmp_path / "a")
    # A saved adapter is relative to the original base: loraforge and PEFT reload it on a fresh one.
    reloaded = lf.load_adapter(TINY_MODELS[model_name](), tmp_path / "a")
    torch.testing.assert_close(logits(reloaded), trained, atol=1e-5, rtol=0)
    assert_same_outputs(reloaded, PeftModel.from_pretrained(TINY_MODELS[model_name](), tmp_path / "a").eval(), logits)
    lf.merge(model)
    torch.testing.assert_close(logits(model), trained, atol=1e-5, rtol=0)
    lf.unmerge(model)
    lf.detach(model)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            torch.testing.assert_close(p, fresh[name], atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("method", [m.name for m in lf.methods()])
@pytest.mark.parametrize("init", [i.name for i in initializers()])
def test_every_initialiser_with_every_method_starts_or_says_why(init, method):
    compatible = method in next(i for i in initializers() if i.name == init).methods
    if compatible:
        assert resolve_initializer(lf.AdapterConfig(method=method, init=init)).name == init
    else:
        with pytest.raises(lf.AdapterError, match=rf"init '{init}' cannot start method '{method}': .*fits only"):
            lf.AdapterConfig(method=method, init=init)


def test_initialisers_name_their_compatible_methods():
    serves = {i.name: i.methods for i in initializers()}
    assert {"pissa", "lora-ga", "eva"} <= {name for name, methods in serves.items() if "lora" in methods}
    with pytest.raises(lf.AdapterError, match="'pissa'.*'lora-xs'.*singular components of W0"):
        lf.AdapterConfig(method="lora-xs", init="pissa")


def test_unknown_init_lists_the_registered_ones():
    with pytest.raises(lf.AdapterError, match="init must be one of default, gaussian, random, .*got 'olora'") as error:
        lf.AdapterConfig(init="olora")
    assert all(name in str(error.value) for name in ("pissa", "lora-ga", "eva"))


def test_initialize_bad_input():
    with pytest.raises(lf.AdapterError, match="no adapter"):
        lf.initialize(tiny_llama(), data_for("llama"))
    model = lf.attach(tiny_llama(), lf.AdapterConfig(init="lora-ga", rank=2))
    with pytest.raises(lf.AdapterError, match="starts from data"):
        lf.initialize(model, [])
    with pytest.raises(lf.AdapterError, match="at least 1"):
        lf.initialize(model, data_for("llama"), batches=0)
    assert lf.initialize(lf.attach(tiny_llama(), lf.AdapterConfig(init="pissa")), None).init == "pissa"  # ran in attach


def test_peft_adapter_relative_to_a_residual_base_is_refused():
    with pytest.raises(lf.AdapterError, match="init_lora_weights='pissa'.*path_initial_model_for_weight_conversion"):
        lf.AdapterConfig.from_peft_dict({"peft_type": "LORA", "init_lora_weights": "pissa"})
    assert lf.AdapterConfig.from_peft_dict({"peft_type": "LORA", "init_lora_weights": "eva"}).init == "default"


@pytest.mark.filterwarnings("ignore:EVA")
def test_trainer_runs_the_data_start_and_records_it(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q {i}", "completion": f"a {i % 3}"}) + "\n" for i in range(16)))
    config, _ = train_config_from_argv(["--data", str(data), "--out", str(tmp_path / "run"), "--init", "lora-ga",
                                        "--init-batches", "2", "--rank", "2", "--steps", "2", "--batch-size", "4",
                                        "--lr", "1e-2", "--precision", "fp32"])
    assert (config.init, config.init_batches) == ("lora-ga", 2)
    result = train(config, model=tiny_llama(), tokenizer=tiny_tokenizer(), progress=False)
    recorded = json.loads((result.out / "config.json").read_text())["init"]
    assert recorded["init"] == "lora-ga" and recorded["batches"] == 2 and recorded["seconds"] > 0
    reloaded = lf.load_adapter(tiny_llama(), result.out / "adapter")
    assert reloaded.loraforge_config.rank == 4  # the rank-2r plain LoRA of a rank-2 LoRA-GA run
    torch.testing.assert_close(logits(reloaded), logits(result.model), atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:EVA")
@pytest.mark.parametrize("init", ["lora-ga", "eva"])
def test_resume_after_kill_reaches_the_same_weights(init, tmp_path, kill_at_step):
    """The checkpoint holds the start (A0, B0) and EVA's ranks are rebuilt before it is read."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q {i}", "completion": f"a {i % 3}"}) + "\n" for i in range(16)))
    settings = dict(data=str(data), init=init, init_batches=2, rank=2, batch_size=4, lr=1e-2, precision="fp32",
                    steps=3, save_every=2)

    def run(name: str, **kw):
        config = TrainConfig(out=str(tmp_path / name), **settings, **kw)
        return train(config, model=tiny_llama(), tokenizer=tiny_tokenizer(), progress=False)

    full = run("full")
    with kill_at_step(2):
        run("killed")
    resumed = run("killed", resume=True)
    expected, got = lf.adapter_state_dict(full.model), lf.adapter_state_dict(resumed.model)
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
