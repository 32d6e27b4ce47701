"""ABMLL (abmll.md checks 1-5), calibration helpers, meta train / adapt on a tiny labels zoo and the CLI."""

import json

import pytest
import torch
from torch import nn

from loraforge.adapters.inject import attach
from loraforge.cli import main
from loraforge.core.config import AdapterConfig
from loraforge.generate.abmll import (
    FACTORS,
    ABMLLConfig,
    BayesLoRALinear,
    attach_bayes,
    gaussian_kl,
    set_mode,
    task_kl,
)
from loraforge.generate.calibration import accuracy_and_ece, answer_words, label_probs, prompt_and_first_tokens
from loraforge.generate.meta import adapt_meta, load_adapted, train_meta
from loraforge.generate.zoo import ZooConfig, build_zoo, load_zoo
from loraforge.methods.base import adapter_layers
from loraforge.testing import tiny_llama, tiny_tokenizer

TARGETS = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]


def test_gaussian_kl_zero_nonnegative_and_closed_form():
    g = torch.Generator().manual_seed(0)
    mu, sigma = torch.randn(5, 4, generator=g), torch.rand(5, 4, generator=g) + 0.1
    assert gaussian_kl(mu, sigma, mu, sigma).item() == 0.0
    mu_p, sigma_p = torch.randn(5, 4, generator=g), torch.rand(5, 4, generator=g) + 0.1
    kl = gaussian_kl(mu, sigma, mu_p, sigma_p)
    closed = sum(math_kl(*v) for v in zip(mu.flatten().tolist(), sigma.flatten().tolist(), mu_p.flatten().tolist(),
                                           sigma_p.flatten().tolist()))
    assert kl.item() >= 0
    torch.testing.assert_close(kl.double(), torch.tensor(closed, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    layer = BayesLoRALinear(nn.Linear(6, 4), rank=2, c=0.01)
    assert task_kl([layer]).item() == 0.0  # phi = theta at the start


def math_kl(mq, sq, mp, sp):
    import math

    return math.log(sp / sq) + (sq ** 2 + (mq - mp) ** 2) / (2 * sp ** 2) - 0.5


def test_zero_sigma_is_deterministic_lora_with_delta_mu():
    config = ABMLLConfig(rank=2, c=0.0, beta=0.0, gamma=0.0)
    model = tiny_llama()
    layers = attach_bayes(model, TARGETS, config)
    lora = attach(tiny_llama(), AdapterConfig(rank=2, alpha=2.0, target_modules=TARGETS))  # scale 1
    with torch.no_grad():
        for name, layer in zip(TARGETS, layers):
            layer.theta["mu_B"].normal_()  # mu != 0; sigma_B stays 0, so sigma = c = 0
            own = adapter_layers(lora)[name]
            own.lora_A.weight.copy_(layer.theta["mu_A"])
            own.lora_B.weight.copy_(layer.theta["mu_B"])
    ids = torch.randint(5, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        first, second, want = model(input_ids=ids).logits, model(input_ids=ids).logits, lora(input_ids=ids).logits
    assert torch.equal(first, second)  # sampling on, yet no noise
    torch.testing.assert_close(first, want, atol=1e-5, rtol=1e-5)


def test_reparameterised_samples_have_mean_mu_and_std_sigma():
    torch.manual_seed(0)
    layer = BayesLoRALinear(nn.Linear(3, 2, bias=False), rank=1, c=0.05)
    with torch.no_grad():
        for k in FACTORS:
            layer.theta[k].normal_(std=0.5)
    mu, sigma = layer.moments()
    n = 20000
    x = torch.eye(3)  # each forward reads W column by column
    draws = torch.stack([layer(x).T - layer.base.weight for _ in range(n)])  # (n, 2, 3): W - W0
    assert ((draws.mean(0) - mu).abs() <= 3 * sigma / n ** 0.5 + 1e-6).all()
    torch.testing.assert_close(draws.std(0), sigma, rtol=0.05, atol=1e-4)


def test_trainable_count_is_four_loras_whatever_the_tasks():
    layer = BayesLoRALinear(nn.Linear(12, 10), rank=3, c=0.01)
    lora = 3 * 12 + 10 * 3
    assert sum(p.numel() for p in layer.theta.parameters()) + sum(p.numel() for p in layer.phi.parameters()) == 4 * lora


def test_ece_calibrated_and_overconfident():
    torch.manual_seed(0)
    confidence = torch.rand(200000) * 0.5 + 0.5
    probs = torch.stack([confidence, 1 - confidence], 1)  # class 0 predicted with this confidence ...
    labels = torch.where(torch.rand(200000) < confidence, 0, 1)  # ... and right that often
    assert accuracy_and_ece(probs, labels)["ece"] < 0.01
    constant = torch.tensor([[0.9, 0.1]]).expand(1000, 2)
    labels = torch.tensor([0] * 600 + [1] * 400)
    result = accuracy_and_ece(constant, labels)
    assert result["accuracy"] == pytest.approx(0.6) and result["ece"] == pytest.approx(0.3, abs=1e-6)


@pytest.fixture(scope="module")
def labels_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("abmll")
    data = root / "data" / "sst2"
    data.mkdir(parents=True)
    lines = ["sentence\tlabel"] + [f"it was {'nice' if i % 2 else 'poor'} {i}\t{i % 2}" for i in range(80)]
    (data / "train.tsv").write_text("\n".join(lines) + "\n")
    model = root / "tiny"
    tiny_llama().save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    build_zoo(ZooConfig(family="labels", values=["good/bad", "yes/no", "up/down"], model=str(model),
                        out=str(root / "zoo"), steps=1, checkpoints=1, rank=2, batch_size=2, n_train=24, n_test=8,
                        data=str(root / "data")), progress=False)
    return root, load_zoo(root / "zoo")


def test_label_probs_score_the_answer_words(labels_zoo):
    _, zoo = labels_zoo
    from loraforge.training.data import read_rows

    rows = read_rows(zoo.tasks[0].test)
    assert answer_words(rows) == ["bad", "good"]
    probs, labels = label_probs(tiny_llama(), tiny_tokenizer(), rows, ["bad", "good"], batch_size=3)
    assert probs.shape == (len(rows), 2) and torch.allclose(probs.sum(1), torch.ones(len(rows)))
    one_at_a_time, _ = label_probs(tiny_llama(), tiny_tokenizer(), rows, ["bad", "good"], batch_size=1)
    torch.testing.assert_close(probs, one_at_a_time, atol=1e-5, rtol=1e-4)  # left padding changes nothing
    assert labels.tolist() == [["bad", "good"].index(r["messages"][-1]["content"]) for r in rows]


def test_label_probs_read_the_last_answer_after_few_shot_turns():
    tokenizer = tiny_tokenizer()
    turns = [("a", "yes"), ("b", "no")]
    row = {"messages": [{"role": role, "content": text} for pair in turns
                        for role, text in zip(("user", "assistant"), pair)]}
    prompt, firsts = prompt_and_first_tokens(row, ["no", "yes"], tokenizer)
    assert tokenizer.decode(prompt).endswith("b<|im_end|>\n<|im_start|>assistant\n")  # up to the last answer
    assert firsts == tokenizer.convert_tokens_to_ids(["n", "y"])


def test_meta_train_adapt_and_predict(labels_zoo, tmp_path):
    root, zoo = labels_zoo
    config = ABMLLConfig(rank=2, meta_steps=4, tasks_per_step=2, support=4, query=4, inner_steps=2, inner_lr=1e-2,
                         outer_lr=1e-2, samples=2)
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    meta = train_meta(zoo, tmp_path / "meta", config, model=model, tokenizer=tokenizer, progress=False)
    record = json.loads((meta / "meta.json").read_text())
    assert record["algo"] == "abmll" and len(record["history"]) == 1 and record["targets"] == zoo.targets
    adapted = adapt_meta(meta, zoo.tasks[1].train, tmp_path / "adapter", steps=3, model=tiny_llama(),
                         tokenizer=tokenizer)
    from peft import PeftModel

    PeftModel.from_pretrained(tiny_llama(), adapted.path)  # the posterior mean, as a plain LoRA
    # The PEFT adapter is the posterior mean: the Bayesian model without sampling gives the same logits.
    reloaded = tiny_llama()
    layers = load_adapted(reloaded, adapted.path)
    set_mode(layers, "phi", sample=False)
    ids = torch.randint(5, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    peft = PeftModel.from_pretrained(tiny_llama(), adapted.path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, peft(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    assert any(not torch.equal(a.phi[k], a.theta[k]) for a in adapted.layers for k in FACTORS)  # it adapted


def test_meta_cli(labels_zoo, tmp_path, capsys):
    root, zoo = labels_zoo
    assert main(["meta", "train", "--algo", "abmll", "--zoo", str(zoo.root), "--out", str(tmp_path / "meta"),
                 "--steps", "1"]) == 0
    assert main(["meta", "adapt", "--meta", str(tmp_path / "meta"), "--examples", zoo.tasks[2].train,
                 "--steps", "1", "--eval", zoo.tasks[2].test, "--out", str(tmp_path / "adapter")]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= scores["accuracy"] <= 1 and 0 <= scores["ece"] <= 1
    assert main(["meta", "adapt", "--meta", str(tmp_path / "nothing"), "--examples", zoo.tasks[2].train,
                 "--out", str(tmp_path / "x")]) == 2
