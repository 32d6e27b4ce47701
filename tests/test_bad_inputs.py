"""The bad-input matrix (issue 19, item 10): each case is a user mistake given to the `loraforge`
command (serve's cases fail before a port is opened); each must end with a named error on one line, exit status 2, no traceback, and leave every
file already saved as it was. API_CASES are requests to a running server's adapter-load endpoint: a 4xx
that names the problem, nothing registered. The table in docs/reliability.md is written from CASES by this test."""

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
    ("merge: NaN in an adapter", "merge --model {w}/llama --adapter {w}/nan --out {w}/merged", "NaN or inf"),
    ("serve: --max-lora-rank 0", "serve --model {w}/llama --adapters {w}/served --max-lora-rank 0 --port 1",
     "--max-lora-rank"),
    ("serve: --max-batch 0", "serve --model {w}/llama --adapters {w}/served --max-batch 0 --port 1", "--max-batch"),
    ("serve: --max-kv-tokens 0", "serve --model {w}/llama --adapters {w}/served --max-kv-tokens 0 --port 1",
     "--max-kv-tokens"),
    ("serve: port out of range", "serve --model {w}/llama --adapters {w}/served --port 70000", "--port"),
    ("serve: an adapter linking outside the adapters folder", "serve --model {w}/llama --adapters {w}/escaping "
     "--port 1", "links outside the adapters folder"),
    ("zoo build: unknown task family", "zoo build --family nope --values 1,2 --out {w}/zoo", "nope"),
    ("zoo build: zero steps", "zoo build --family offset --values 1,2 --steps 0 --out {w}/zoo", "steps"),
    ("zoo build: SST-2 missing for the labels family", "zoo build --family labels --values good/bad "
     "--data {w}/nowhere --out {w}/zoo", "sst2/train.tsv"),
    ("generator train: zoo folder missing", "generator train --kind icm-lora --zoo {w}/nowhere --out {w}/gen",
     "index.json"),
    ("generator sample: an adapter, not a generator", "generator sample --generator {w}/adapter --description x "
     "--out {w}/sample", "not a generator"),
    ("meta train: zoo folder missing", "meta train --zoo {w}/nowhere --out {w}/meta", "index.json"),
    ("meta adapt: an adapter, not a prior", "meta adapt --meta {w}/adapter --examples {w}/good.jsonl --out {w}/m",
     "not a meta-learnt prior"),
    ("transfer prepare: data file missing", "transfer prepare --adapter {w}/adapter --model {w}/llama "
     "--data {w}/missing.jsonl --out {w}/kit", "missing.jsonl"),
    ("transfer prepare: adapter of another base", "transfer prepare --adapter {w}/gpt2-adapter --model {w}/llama "
     "--data {w}/good.jsonl --seeds 1 --out {w}/kit", "matches no Linear layer"),
    ("transfer run: an adapter, not a kit", "transfer run --kit {w}/adapter --out {w}/t", "kit.json"),
    ("transfer run: threshold out of range", "transfer run --kit {w}/adapter --out {w}/t --threshold 1.5",
     "--threshold"),
    ("testbed build: negative minutes", "testbed build glyphs --out {w}/testbed --clip-minutes -1", "--clip-minutes"),
    ("fewshot: CLIP folder missing", "fewshot --clip {w}/nowhere --shots 1", "not a CLIP folder"),
    ("fewshot: a language model as the CLIP", "fewshot --clip {w}/llama --shots 1", "not a CLIP"),
    ("fewshot: zero shots", "fewshot --clip {w}/nowhere --shots 0", "--shots"),
    ("datadream: a language model as the CLIP", "datadream --diffusion {w}/nowhere --clip {w}/llama --out {w}/dd",
     "not a CLIP"),
    ("datadream: zero shots", "datadream --diffusion {w}/nowhere --clip {w}/llama --shots 0 --out {w}/dd", "--shots"),
    ("export gguf: corrupt safetensors", "export --format gguf --adapter {w}/corrupt --model {w}/llama "
     "--out {w}/x.gguf", "corrupt"),
    ("export gguf: adapter of another base", "export --format gguf --adapter {w}/gpt2-adapter --model {w}/llama "
     "--out {w}/x.gguf", "another base"),
    ("export gguf: NaN in an adapter", "export --format gguf --adapter {w}/nan --model {w}/llama --out {w}/x.gguf",
     "NaN or inf"),
    ("convert: rank 0", "convert --to lora --rank 0 {w}/adapter --model {w}/llama --out {w}/conv", "--rank"),
    ("convert: adapter of another base", "convert --to lora --rank 2 {w}/gpt2-adapter --model {w}/llama "
     "--out {w}/conv", "matches no Linear layer"),
    ("convert: NaN in an adapter", "convert --to lora --rank 2 {w}/nan --model {w}/llama --out {w}/conv",
     "NaN or inf"),
]

# The server's load endpoint, in process (no port): (case, request body, a fragment the 4xx message must contain)
API_CASES = [
    ("serve API: load a path outside the adapters folder", {"lora_name": "x", "lora_path": "../adapter"},
     "outside the adapters folder"),
    ("serve API: an adapter name with a slash", {"lora_name": "a/b", "lora_path": "adapter"}, "bad adapter name"),
    ("serve API: an absolute path elsewhere", {"lora_name": "x", "lora_path": "{w}/adapter"},
     "outside the adapters folder"),
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
    (w / "served").mkdir()
    shutil.copytree(w / "adapter", w / "served" / "adapter")
    (w / "escaping").mkdir()
    (w / "escaping" / "escape").symlink_to(w / "adapter", target_is_directory=True)
    return w


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


OUTCOMES: dict[str, str] = {}


@pytest.fixture
def no_port(monkeypatch):
    """A serve case that is not refused must fail here, not listen."""
    uvicorn = pytest.importorskip("uvicorn")
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("serve was not refused: it would listen"))


@pytest.mark.parametrize("case,argv,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_named_error(case, argv, fragment, workspace, capsys, no_port):
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


@pytest.fixture(scope="module")
def served(workspace):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from loraforge.serve import Engine
    from loraforge.serve.server import create_app

    engine = Engine(tiny_llama(), tiny_tokenizer(), adapters_dir=workspace / "served", max_loaded=1, block_size=4,
                    max_kv_tokens=256)
    with TestClient(create_app(engine)) as client:
        yield client, engine


@pytest.mark.parametrize("case,body,fragment", API_CASES, ids=[c[0] for c in API_CASES])
def test_bad_load_request_is_a_named_4xx(case, body, fragment, workspace, served):
    client, engine = served
    before = snapshot(workspace)
    body = {k: v.replace(W, str(workspace)) for k, v in body.items()}
    response = client.post("/v1/load_lora_adapter", json=body)
    message = response.json()["error"]["message"]
    OUTCOMES[case] = f"{response.status_code}: {message}".replace(str(workspace), "W")
    assert 400 <= response.status_code < 500 and fragment in message, OUTCOMES[case]
    assert engine.pool.names() == ["adapter"]  # nothing registered
    assert snapshot(workspace) == before


def test_the_table_in_docs_reliability_md():
    assert len(CASES) >= 30 and len({c[0] for c in CASES + API_CASES}) == len(CASES) + len(API_CASES)
    missing = [c[0] for c in CASES + API_CASES if c[0] not in OUTCOMES]
    if missing:
        pytest.skip(f"run the whole file to write the table ({len(missing)} cases not run)")
    rows = [f"| {case} | `loraforge {argv.replace(W, 'W')}` | {OUTCOMES[case].replace('|', '/')} |"
            for case, argv, _ in CASES]
    rows += [f"| {case} | `POST /v1/load_lora_adapter {json.dumps(body).replace(W, 'W')}` | "
             f"{OUTCOMES[case].replace('|', '/')} |" for case, body, _ in API_CASES]
    text = ("# Bad input: what the command says\n\nWritten by `tests/test_bad_inputs.py` (do not edit): each "
            "command exits with status 2 and one error line, no traceback, and leaves every file already saved "
            "unchanged; each request to a running server's load endpoint gets a 4xx with the message shown and "
            "registers nothing. W is the test's workspace.\n\n| case | command | error |\n|---|---|---|\n"
            + "\n".join(rows) + "\n")
    if not DOC.is_file() or DOC.read_text() != text:
        DOC.write_text(text)
    assert DOC.read_text() == text
