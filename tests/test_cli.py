"""The CLI end to end on a tiny model saved as a local folder: train, eval, generate, merge, bad input."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import loraforge as lf
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
                 "--data", str(workspace / "gsm.jsonl"), "--metric", "exact-match", "--max-new-tokens", "4", "--json", str(workspace / "m.json")]) == 0
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


def test_methods_json_lists_each_method_its_options_and_whether_its_paper_was_read(capsys):
    assert main(["methods", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    methods = {m["name"]: m for m in listed["methods"]}
    assert set(methods) == {m.name for m in lf.methods()}
    assert all(set(m) == {"name", "axis", "paper", "merges", "peft_loads", "verified", "serves", "options"}
               for m in methods.values())
    assert methods["lora"]["peft_loads"] and methods["lora"]["merges"] and not methods["mixlora"]["merges"]
    assert methods["lora"]["verified"] and not methods["block-lora"]["verified"] and not methods["comp-lora"]["verified"]
    (n_blocks,) = methods["block-lora"]["options"]
    assert {k: n_blocks[k] for k in ("name", "type", "default")} == {"name": "n_blocks", "type": "int", "default": 8}
    assert n_blocks["help"]
    assert [o["name"] for o in methods["randlora"]["options"]] == ["projection_prng_key", "sparse", "very_sparse"]
    assert [(o["name"], o["default"]) for o in methods["lora-sb"]["options"]] == [("svd_niter", 10)]  # its own start's
    assert methods["bone"]["options"] == []
    inits = {i["name"]: i for i in listed["initializers"]}
    assert [o["name"] for o in inits["eva"]["options"]] == ["eva_rho", "eva_tau"]
    assert main(["methods", "--shape", "64x64"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "interpretation" in next(l for l in table if l.startswith("block-lora "))
    assert "interpretation" not in next(l for l in table if l.startswith("lora "))


def test_option_flags_are_yaml_scalars_and_add_to_the_config_files_options(tmp_path):
    from loraforge.cli import train_config_from_argv

    config, _ = train_config_from_argv(["--method", "randlora", "--option", "projection_prng_key=3",
                                        "--option", "sparse=true"])
    assert config.options == {"projection_prng_key": 3, "sparse": True}
    path = tmp_path / "run.yaml"
    path.write_text("method: block-lora\noptions:\n  n_blocks: 2\n")
    trained, _ = train_config_from_argv(["--config", str(path), "--option", "n_blocks=4"])
    assert trained.options == {"n_blocks": 4} and trained.adapter_config().options == {"n_blocks": 4}
    with pytest.raises(lf.LoraforgeError, match="--option takes KEY=VALUE, got 'n_blocks'"):
        train_config_from_argv(["--option", "n_blocks"])


def test_print_config_writes_yaml_that_config_reads_back_to_the_same_run(tmp_path, capsys):
    from loraforge.cli import train_config_from_argv

    argv = ["--method", "block-lora", "--option", "n_blocks=4", "--rank", "2", "--use-rslora", "--num-labels", "3",
            "--targets", "q_proj,v_proj", "--lr", "1e-3", "--out", str(tmp_path / "run")]
    assert main(["train", *argv, "--print-config"]) == 0
    path = tmp_path / "effective.yaml"
    path.write_text(capsys.readouterr().out)
    assert train_config_from_argv(["--config", str(path)])[0] == train_config_from_argv(argv)[0]
    assert not (tmp_path / "run").exists()  # printing ran nothing


def test_train_help_lists_the_fields_with_their_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "--use-rslora" in text and "--batch-size" in text and "rows per micro-batch" in text


def test_unknown_train_flag_and_config_key_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--bacth-size", "4"])
    assert exit_.value.code == 2
    path = tmp_path / "bad.yaml"
    path.write_text("bacth-size: 4\n")
    assert main(["train", "--config", str(path)]) == 2
    assert "unknown settings bacth_size" in capsys.readouterr().err


def test_options_reach_the_saved_adapter(workspace):
    config = workspace / "options.yaml"
    config.write_text(f"model: {workspace / 'model'}\ndata: {workspace / 'train.jsonl'}\nmethod: block-lora\nrank: 2\n"
                      f"steps: 1\nbatch-size: 4\nout: {workspace / 'options-run'}\noptions:\n  n_blocks: 2\n")
    assert main(["train", "--config", str(config), "--option", "n_blocks=4"]) == 0
    saved = json.loads((workspace / "options-run" / "adapter" / "loraforge_config.json").read_text())
    assert saved["options"] == {"n_blocks": 4} and saved["provenance"] == {}


@pytest.mark.parametrize("option, message", [
    ("blocks=4", "block-lora: unknown option 'blocks'; valid options: n_blocks (int, default 8)"),
    ("n_blocks=0", "option 'n_blocks' must be a positive integer, got 0; valid options: n_blocks"),
    ("n_blocks=four", "must be a positive integer, got 'four'"),
])
def test_bad_option_exits_2_naming_the_valid_ones(workspace, tmp_path, capsys, option, message):
    assert main(["train", "--model", str(workspace / "model"), "--data", str(workspace / "train.jsonl"),
                 "--method", "block-lora", "--option", option, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything ran


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
