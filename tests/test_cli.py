"""The CLI end to end on a tiny model saved as a local folder: train, eval, generate, merge, bad input."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from loraforge.cli import main
from loraforge.testing import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny_llama().save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    rows = [{"instruction": f"Add {i} and {i}.", "output": f"### Sum\n- {2 * i}"} for i in range(16)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    gsm = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(4)]
    (root / "gsm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gsm))
    return root


def test_train_eval_generate_merge(workspace, capsys):
    out = workspace / "run"
    assert main(["train", "--model", str(workspace / "model"), "--data", str(workspace / "train.jsonl"),
                 "--method", "lora", "--rank", "4", "--alpha", "8", "--targets", "q_proj,v_proj", "--steps", "3",
                 "--lr", "1e-2", "--batch-size", "4", "--grad-accum", "2", "--out", str(out)]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["adapter"]["target_modules"] == ["q_proj", "v_proj"]

    assert main(["eval", "--model", str(workspace / "model"), "--adapter", str(out / "adapter"),
                 "--data", str(workspace / "gsm.jsonl"), "--max-new-tokens", "4", "--json", str(workspace / "m.json")]) == 0
    metrics = json.loads((workspace / "m.json").read_text())
    assert {"loss", "perplexity", "exact_match"} <= set(metrics) and metrics["perplexity"] > 1

    capsys.readouterr()
    assert main(["generate", "--model", str(workspace / "model"), "--adapter", str(out / "adapter"),
                 "--prompt", "Add 2 and 2.", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() != ""

    assert main(["merge", "--model", str(workspace / "model"), "--adapter", str(out / "adapter"),
                 "--out", str(workspace / "merged")]) == 0
    # The merged folder is a plain transformers model with the adapter inside its weights.
    from loraforge.adapters.io import load_pretrained

    adapted, _ = load_pretrained(str(workspace / "model"), out / "adapter")
    plain = AutoModelForCausalLM.from_pretrained(workspace / "merged").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, adapted(ids).logits, atol=1e-5, rtol=0)
    assert "loraforge" not in (workspace / "merged" / "config.json").read_text()


def test_yaml_config_with_flag_override(workspace):
    config = workspace / "run.yaml"
    config.write_text(f"model: {workspace / 'model'}\ndata: {workspace / 'train.jsonl'}\nrank: 2\nsteps: 5\n"
                      f"batch-size: 4\nout: {workspace / 'yaml-run'}\n")
    assert main(["train", "--config", str(config), "--steps", "2"]) == 0
    saved = json.loads((workspace / "yaml-run" / "config.json").read_text())["train"]
    assert saved["rank"] == 2 and saved["steps"] == 2


def test_methods_lists_lora(capsys):
    assert main(["methods", "--shape", "64x64", "--rank", "4"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("lora "))
    assert "512" in line and "2106.09685" in line


@pytest.mark.parametrize("content, message", [
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a"\n', "train.jsonl:2"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": ""}\n', "train.jsonl:2"),
    ('{"prompt": "a"}\n', "train.jsonl:1"),
])
def test_bad_data_exits_2_without_traceback(workspace, tmp_path, content, message):
    (tmp_path / "train.jsonl").write_text(content)
    proc = subprocess.run([sys.executable, "-m", "loraforge.cli", "train", "--model", str(workspace / "model"),
                           "--data", str(tmp_path / "train.jsonl"), "--steps", "1", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "adapter").exists()  # nothing trained on half-read data


def test_unknown_model_and_bad_settings(workspace, tmp_path, capsys):
    assert main(["train", "--model", "meta-llama/Llama-3-8B", "--data", str(workspace / "train.jsonl"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "local folder" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("stepz: 3\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "stepz" in capsys.readouterr().err
