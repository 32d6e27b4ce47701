"""The bad-input matrix (issue 19, item 10): each case is a user mistake given to the `loraforge`
command (serve's cases fail before a port is opened); each must end with a named error on one line, exit status 2, no traceback, and leave every
file already saved as it was. The table in docs/reliability.md is written from CASES by this test."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loraforge as lf
from loraforge.cli import main
from loraforge.testing import tiny_gpt2, tiny_llama, tiny_tokenizer

DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
W = "{w}"  # the workspace folder, filled in per run

# (case, argv with {w} for the workspace, a fragment the one-line message must contain)
CASES = [
    ("train: unknown model name", "train --model no-such-model --data {w}/good.jsonl --out {w}/o", "no-such-model"),
    ("train: data file missing", "train --model {w}/llama --data {w}/missing.jsonl --out {w}/o", "file not found"),
    ("train: empty data file", "train --model {w}/llama --data {w}/empty.jsonl --out {w}/o", "empty.jsonl"),
    ("train: truncated JSONL line", "train --model {w}/llama --data {w}/truncated.jsonl --out {w}/o", "truncated.jsonl:3"),
    ("train: invalid UTF-8", "train --model {w}/llama --data {w}/latin1.jsonl --out {w}/o", "UTF-8"),
    ("train: a row of no known form", "train --model {w}/llama --data {w}/noform.jsonl --out {w}/o", "no known form"),
    ("train: unknown method", "train --model {w}/llama --data {w}/good.jsonl --method nope --out {w}/o", "nope"),
    ("train: unknown method option", "train --model {w}/llama --data {w}/good.jsonl --option bogus=1 --out {w}/o",
     "bogus"),
    ("train: zero steps", "train --model {w}/llama --data {w}/good.jsonl --steps 0 --out {w}/o", "--steps"),
    ("train: negative batch size", "train --model {w}/llama --data {w}/good.jsonl --batch-size -4 --out {w}/o",
     "--batch-size"),
    ("train: NaN learning rate", "train --model {w}/llama --data {w}/good.jsonl --lr nan --out {w}/o", "--lr"),
    ("train: warm-up fraction 1", "train --model {w}/llama --data {w}/good.jsonl --warmup 1 --out {w}/o", "--warmup"),
    ("train: negative health bound", "train --model {w}/llama --data {w}/good.jsonl --health-max-loss -1 --out {w}/o",
     "--health-max-loss"),
    ("train: unknown quantisation", "train --model {w}/llama --data {w}/good.jsonl --quant nf9 --out {w}/o", "--quant"),
    ("train: targets matching no layer", "train --model {w}/llama --data {w}/good.jsonl --targets nothing_here "
     "--steps 1 --out {w}/o", "nothing_here"),
    ("train: eval data missing", "train --model {w}/llama --data {w}/good.jsonl --eval-data {w}/missing.jsonl "
     "--out {w}/o", "missing.jsonl"),
    ("train: unknown log sink", "train --model {w}/llama --data {w}/good.jsonl --log carrier-pigeon --out {w}/o",
     "carrier-pigeon"),
    ("eval: adapter folder missing", "eval --model {w}/llama --adapter {w}/nowhere --data {w}/good.jsonl", "nowhere"),
    ("eval: adapter of another base", "eval --model {w}/llama --adapter {w}/gpt2-adapter --data {w}/good.jsonl", ""),
    ("eval: corrupt safetensors", "eval --model {w}/llama --adapter {w}/corrupt --data {w}/good.jsonl", "corrupt"),
    ("eval: adapter_config.json not JSON", "eval --model {w}/llama --adapter {w}/bad-config --data {w}/good.jsonl",
     "bad-config"),
    ("eval: NaN in an adapter", "eval --model {w}/llama --adapter {w}/nan --data {w}/good.jsonl", "NaN or inf"),
    ("eval: accuracy of a causal LM", "eval --model {w}/llama --data {w}/good.jsonl --metric accuracy", "--metric"),
    ("eval: facts on training rows", "eval --model {w}/llama --data {w}/good.jsonl --metric facts", "good.jsonl:1"),
    ("eval: data file missing", "eval --model {w}/llama --data {w}/missing.jsonl", "file not found"),
    ("merge: adapter folder missing", "merge --model {w}/llama --adapter {w}/nowhere --out {w}/merged", "nowhere"),
    ("merge: corrupt safetensors", "merge --model {w}/llama --adapter {w}/corrupt --out {w}/merged", "corrupt"),
    ("merge: adapter of another base", "merge --model {w}/llama --adapter {w}/gpt2-adapter --out {w}/merged", ""),
    ("generate: adapter folder missing", "generate --model {w}/llama --adapter {w}/nowhere --prompt hi", "nowhere"),
    ("analyze: adapter folder missing", "analyze --model {w}/llama --adapter {w}/nowhere --out {w}/report", "nowhere"),
    ("convert: corrupt safetensors", "convert --to lora --rank 2 {w}/corrupt --model {w}/llama --out {w}/conv",
     "corrupt"),
    ("serve: adapters folder missing", "serve --model {w}/llama --adapters {w}/nowhere --port 1", "does not exist"),
    ("serve: unknown model name", "serve --model no-such-model --adapters {w}/adapter --port 1", "no-such-model"),
    ("fed aggregate: mismatched ranks", "fed aggregate --strategy fedavg --adapters {w}/adapter {w}/adapter-r8 "
     "--out {w}/agg", ""),
    ("fed aggregate: weights not summing to 1", "fed aggregate --strategy fedavg --adapters {w}/adapter {w}/adapter "
     "--weights 0.2,0.2 --out {w}/agg", "weights sum to 0.4"),
    ("fed aggregate: a client folder missing", "fed aggregate --strategy fedavg --adapters {w}/adapter {w}/nowhere "
     "--out {w}/agg", "nowhere"),
]


def write_adapter(model, out: Path, rank: int) -> None:
    lf.save_adapter(lf.attach(model, lf.AdapterConfig(rank=rank, alpha=2 * rank, target_modules=["q_proj", "v_proj"]
                                                       if not hasattr(model, "transformer") else ["c_attn"], seed=1)), out)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("bad")
    tiny_llama().save_pretrained(w / "llama")
    tiny_tokenizer().save_pretrained(w / "llama")
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(4)]
    (w / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (w / "empty.jsonl").write_text("")
    (w / "truncated.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]) + json.dumps(rows[2])[:-9] + "\n")
    (w / "latin1.jsonl").write_bytes(json.dumps({"prompt": "caf\u00e9", "completion": "x"}, ensure_ascii=False).encode("latin-1") + b"\n")
    (w / "noform.jsonl").write_text(json.dumps({"foo": 1}) + "\n")
    write_adapter(tiny_llama(), w / "adapter", 4)
    write_adapter(tiny_llama(), w / "adapter-r8", 8)
    write_adapter(tiny_gpt2(), w / "gpt2-adapter", 4)
    shutil.copytree(w / "adapter", w / "corrupt")
    weights = w / "corrupt" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(w / "adapter", w / "bad-config")
    (w / "bad-config" / "adapter_config.json").write_text('{"r": 4, "lora_alpha"')
    shutil.copytree(w / "adapter", w / "nan")
    tensors = load_file(str(w / "nan" / "adapter_model.safetensors"))
    first = sorted(tensors)[0]
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, str(w / "nan" / "adapter_model.safetensors"))
    return w


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


OUTCOMES: dict[str, str] = {}


@pytest.mark.parametrize("case,argv,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_named_error(case, argv, fragment, workspace, capsys):
    before = snapshot(workspace)
    try:
        code = main(argv.replace(W, str(workspace)).split())
    except SystemExit as exit_:  # argparse's own refusals: usage + one error line, status 2
        code = exit_.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("loraforge") and "error" in line]
    OUTCOMES[case] = lines[-1].replace(str(workspace), "W") if lines else err.strip().splitlines()[-1]
    assert code == 2, err
    assert "Traceback" not in err and lines, err
    assert fragment in lines[-1], lines[-1]
    assert snapshot(workspace) == before  # nothing already saved changed (new outputs would appear here too)


def test_the_table_in_docs_reliability_md():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)
    missing = [c[0] for c in CASES if c[0] not in OUTCOMES]
    if missing:
        pytest.skip(f"run the whole file to write the table ({len(missing)} cases not run)")
    rows = [f"| {case} | `loraforge {argv.replace(W, 'W')}` | {OUTCOMES[case].replace('|', '/')} |"
            for case, argv, _ in CASES]
    text = ("# Bad input: what the command says\n\nWritten by `tests/test_bad_inputs.py` (do not edit): each case "
            "exits with status 2 and one error line, no traceback, and leaves every file already saved "
            "unchanged. W is the test's workspace.\n\n| case | command | error |\n|---|---|---|\n"
            + "\n".join(rows) + "\n")
    if not DOC.is_file() or DOC.read_text() != text:
        DOC.write_text(text)
    assert DOC.read_text() == text
