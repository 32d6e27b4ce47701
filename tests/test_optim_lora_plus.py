"""LoRA+ (loraforge/optim/lora_plus.py): PEFT's param groups, lambda = 1 is AdamW, Adam's first step sizes,
and the ratio kept through the trainer's schedule."""

import json

import pytest
import torch

import loraforge as lf
from loraforge.testing import tiny_bert, tiny_llama, tiny_tokenizer
from loraforge.training.config import TrainConfig
from loraforge.training.data import from_records
from loraforge.training.loop import train

TOK = tiny_tokenizer()


def _peft_name(name: str) -> str:
    return name.removeprefix("base_model.model.").replace(".default", "").replace("modules_to_save.", "")


@pytest.mark.parametrize("make, task_type, modules_to_save", [(tiny_llama, "CAUSAL_LM", None),
                                                               (tiny_bert, "SEQ_CLS", ["classifier"])])
def test_param_groups_match_peft(make, task_type, modules_to_save):
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    targets = ["q_proj", "v_proj", "up_proj"] if make is tiny_llama else ["query", "value", "dense"]
    reference = peft.get_peft_model(make(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type=task_type,
                                                            modules_to_save=modules_to_save))
    expected = create_loraplus_optimizer(reference, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0,
                                         loraplus_weight_decay=0.01)
    names = {id(p): _peft_name(n) for n, p in reference.named_parameters()}
    want = sorted((sorted(names[id(p)] for p in g["params"]), g["lr"], g["weight_decay"])
                  for g in expected.param_groups if g["params"])

    model = lf.attach(make(), lf.AdapterConfig(rank=4, alpha=8, target_modules=targets))
    ours = lf.make_optimizer(model, "lora-plus", lr=1e-3, weight_decay=0.01, loraplus_lr_ratio=16.0)
    names = {id(p): n for n, p in model.named_parameters()}
    got = sorted((sorted(names[id(p)] for p in g["params"]), g["lr"], g["weight_decay"]) for g in ours.param_groups)
    assert got == want
    every = [id(p) for g in ours.param_groups for p in g["params"]]
    assert len(every) == len(set(every)) == sum(p.requires_grad for p in model.parameters())


def _steps(name: str, n: int = 3, **kw) -> dict[str, torch.Tensor]:
    model = lf.attach(tiny_llama(), lf.AdapterConfig(rank=4, alpha=8, seed=0, init="random"))
    optimizer = lf.make_optimizer(model, name, lr=1e-2, weight_decay=0.0, **kw)
    torch.manual_seed(1)
    for _ in range(n):
        ids = torch.randint(5, 100, (2, 12))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.detach().clone() for k, v in lf.adapter_state_dict(model).items()}


def test_ratio_one_is_plain_adamw():
    plain, plus = _steps("adamw"), _steps("lora-plus", loraplus_lr_ratio=1.0)
    for key in plain:
        torch.testing.assert_close(plus[key], plain[key], atol=1e-7, rtol=0)


def test_first_adam_step_moves_b_lambda_times_further():
    model = lf.attach(tiny_llama(), lf.AdapterConfig(rank=4, alpha=8, seed=0, init="random"))
    before = {k: v.detach().clone() for k, v in lf.adapter_state_dict(model).items()}
    optimizer = lf.make_optimizer(model, "lora-plus", lr=1e-3, weight_decay=0.0, loraplus_lr_ratio=8.0)
    ids = torch.randint(5, 100, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {k: v.grad.clone() for k, v in lf.adapter_state_dict(model).items()}
    optimizer.step()
    for key, value in lf.adapter_state_dict(model).items():
        moved = (value.detach() - before[key]).abs()[grads[key].abs() > 1e-4]  # Adam step 1: lr * g / (|g| + eps)
        expected = 8e-3 if "lora_B" in key else 1e-3
        torch.testing.assert_close(moved, torch.full_like(moved, expected), rtol=1e-2, atol=0)


def test_b_zero_start_moves_only_b_on_the_first_step():
    model = lf.attach(tiny_llama(), lf.AdapterConfig(rank=4, alpha=8, seed=0))
    optimizer = lf.make_optimizer(model, "lora-plus", lr=1e-3, weight_decay=0.0)
    before = {k: v.detach().clone() for k, v in lf.adapter_state_dict(model).items()}
    ids = torch.randint(5, 100, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    for key, value in lf.adapter_state_dict(model).items():
        assert torch.equal(value, before[key]) == ("lora_A" in key), key


def test_trainer_keeps_the_ratio_through_the_schedule(tmp_path):
    records = [{"prompt": f"q{i}", "completion": f" a{i % 3}"} for i in range(16)]
    data = from_records(records, TOK, max_length=32)
    config = TrainConfig.from_dict(dict(out=str(tmp_path / "run"), optimizer="lora-plus", loraplus_lr_ratio=4.0, rank=4, alpha=8, steps=3,
                         lr=1e-3, batch_size=4, precision="fp32", warmup=0.5))
    train(config, model=tiny_llama(), tokenizer=TOK, train_data=data, progress=False)
    groups = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())["param_groups"]
    lrs = sorted(g["lr"] for g in groups)
    assert lrs[0] > 0 and lrs[-1] == pytest.approx(4.0 * lrs[0], rel=1e-12)
    assert sorted(g["lr_scale"] for g in groups) == [1.0, 4.0]


def test_needs_lora_b():
    model = lf.attach(tiny_llama(), lf.AdapterConfig(method="lora-xs", rank=4, alpha=8))  # trains only its r x r R
    with pytest.raises(lf.LoraforgeError, match="lora_B"):
        lf.make_optimizer(model, "lora-plus", lr=1e-3)
