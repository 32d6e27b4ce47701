"""`loraforge bench parity`: loraforge and PEFT load each other's LoRA adapters and agree.

Both directions on one base model, float32, adapters with non-zero A and B (so the check is not
trivially 0): loraforge saves -> PEFT loads, and PEFT saves -> loraforge loads; and a RandLoRA
adapter (random lambda, PEFT's bases rebuilt from the key) saved by loraforge and loaded by PEFT.
The figure is the largest absolute difference of the logits over a batch of chat prompts. PEFT is
imported here only: it is a reference, never a dependency of the library's code paths.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from loraforge.bench import append_section


def parity(model_name: str = "smollm2-135m", rank: int = 8, seed: int = 0) -> dict[str, float]:
    from peft import LoraConfig, PeftModel, get_peft_model

    from loraforge.adapters.inject import attach
    from loraforge.adapters.io import load_adapter, save_adapter
    from loraforge.core.config import AdapterConfig
    from loraforge.core.models import load_model

    prompts = ["When is the application deadline?", "How much is tuition per year?", "Tell me about visas."]
    model, tokenizer = load_model(model_name)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True)

    def logits(m) -> torch.Tensor:
        with torch.no_grad():
            return m(**batch).logits

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        ours = attach(model, AdapterConfig(rank=rank, alpha=2 * rank, init="random", seed=seed))
        expected = logits(ours)
        save_adapter(ours, Path(tmp) / "loraforge")
        base, _ = load_model(model_name)
        peft_model = PeftModel.from_pretrained(base, Path(tmp) / "loraforge").eval()
        results["loraforge -> PEFT"] = float((logits(peft_model) - expected).abs().max())

        base, _ = load_model(model_name)
        torch.manual_seed(seed)
        peft_model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                                     init_lora_weights=False)).eval()
        expected = logits(peft_model)
        peft_model.save_pretrained(Path(tmp) / "peft")
        fresh, _ = load_model(model_name)
        results["PEFT -> loraforge"] = float((logits(load_adapter(fresh, Path(tmp) / "peft")) - expected).abs().max())

        base, _ = load_model(model_name)
        ours = attach(base, AdapterConfig(method="randlora", rank=rank, alpha=20 * rank, init="random", seed=seed))
        expected = logits(ours)
        save_adapter(ours, Path(tmp) / "randlora")
        base, _ = load_model(model_name)
        peft_model = PeftModel.from_pretrained(base, Path(tmp) / "randlora").eval()
        results["RandLoRA: loraforge -> PEFT"] = float((logits(peft_model) - expected).abs().max())
    return results


def bench_parity(model_name: str, rank: int, command: str, report: Path | None = None) -> dict[str, float]:
    results = parity(model_name, rank)
    body = "| direction | max abs logit difference (float32) |\n|---|---|\n" + "".join(
        f"| {k} | {v:.2e} |\n" for k, v in results.items())
    if report:
        append_section(report, f"bench parity: {model_name}, LoRA and RandLoRA r={rank}, all-linear", command, body)
    print(body)
    return results
