"""`loraforge serve` flags (the server itself is tested in test_serve_server.py)."""

from __future__ import annotations

import argparse
import importlib.util
import json

import pytest

import loraforge as lf
from loraforge.cli import main
from loraforge.serve.cli import _is_loopback, add_parser, cmd_serve
from loraforge.serve.vllm import vllm_command
from loraforge.testing import tiny_llama, tiny_tokenizer


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="loraforge")
    add_parser(parser.add_subparsers(required=True))
    return parser.parse_args(argv)


def test_serve_flags_default_to_loopback_and_the_embedded_model():
    args = parse(["serve", "--adapters", "ads", "--max-loaded", "4", "--api-key", "k"])
    assert (args.model, args.host, args.adapters, args.max_loaded, args.api_key) == ("smollm2-135m", "127.0.0.1", "ads", 4, "k")
    assert args.run is cmd_serve


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("::1", True), ("localhost", True),
                                            ("0.0.0.0", False), ("10.0.0.5", False)])
def test_loopback_detection(host, loopback):
    assert _is_loopback(host) is loopback


def test_vllm_engine_without_vllm_says_so_and_exits_2(capsys):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here: the command would start it")
    assert main(["serve", "--engine", "vllm", "--adapters", "nowhere"]) == 2
    assert "--engine vllm needs vLLM, which is not installed here" in capsys.readouterr().err


def test_vllm_command_serves_every_adapter_vllm_can_take_converting_the_rest(tmp_path, capsys):
    """Plain LoRA within the rank goes as it is; DoRA and a larger LoRA become plain LoRA of the
    max rank; an input-dependent update and an adapter with whole modules are left out, saying why."""
    tiny_llama().save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    root = tmp_path / "adapters"
    for name, config in {"plain": {}, "dora": {"method": "dora"}, "wide": {"rank": 16},
                         "moe": {"method": "mixlora"}, "head": {"modules_to_save": ["lm_head"]}}.items():
        lf.save_adapter(lf.attach(tiny_llama(), lf.AdapterConfig(**{"rank": 4, "init": "random", "seed": 0, **config})),
                        root / name)
    argv, env = vllm_command(str(tmp_path / "model"), str(root), "127.0.0.1", 8001, "sk-k", 4, 8, tensor_parallel=2)
    err = capsys.readouterr().err
    assert "'moe' left out" in err and "'head' left out: it trains whole modules" in err
    assert "dora (dora, rank 4) converted to LoRA rank 8: 14/14 layers exact" in err and "wide (lora, rank 16)" in err
    assert argv[1:4] == ["-m", "vllm.entrypoints.openai.api_server", "--model"] and argv[4] == str(tmp_path / "model")
    flags = {a: b for a, b in zip(argv, argv[1:]) if a.startswith("--") and not b.startswith("--")}
    assert "--enable-lora" in argv
    assert {k: flags[k] for k in ("--served-model-name", "--max-lora-rank", "--max-loras", "--tensor-parallel-size",
                                  "--api-key", "--port")} == {
        "--served-model-name": str(tmp_path / "model"), "--max-lora-rank": "8", "--max-loras": "4",
        "--tensor-parallel-size": "2", "--api-key": "sk-k", "--port": "8001"}
    lora = argv[argv.index("--lora-modules") + 1:argv.index("--api-key")]
    assert lora == [f"dora={root / '.vllm' / 'dora'}", f"plain={root / 'plain'}", f"wide={root / '.vllm' / 'wide'}"]
    assert lf.AdapterConfig.from_dict(json.loads((root / ".vllm" / "dora" / "loraforge_config.json").read_text())).rank == 8
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    vllm_command(str(tmp_path / "model"), str(root), "127.0.0.1", 8001, None, 4, 8)
    assert "converted" not in capsys.readouterr().err  # the conversions are reused while newer than their source
    with pytest.raises(lf.LoraforgeError, match="one of vLLM's 1, 8, 16"):
        vllm_command(str(tmp_path / "model"), str(root), "127.0.0.1", 8001, None, 4, 12)
