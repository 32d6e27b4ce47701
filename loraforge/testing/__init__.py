"""Tiny randomly initialised models and a tiny tokenizer, built offline from transformers configs.

Used by the test suite and by examples that must run in seconds. Nothing here downloads anything.
"""

from __future__ import annotations

import copy
import string
from typing import Callable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII plus ChatML specials (vocab 100 + 5)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|im_end|>" if chat_template else "<|endoftext|>",
        bos_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
    )
    if chat_template:
        tok.chat_template = CHATML_TEMPLATE
    return tok


TINY_VOCAB = 128  # >= len(tiny_tokenizer()), so every tiny model can read its ids


def tiny_llama(seed: int = 0, vocab_size: int = TINY_VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, pad_token_id=0, initializer_range=0.2,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0, vocab_size: int = TINY_VOCAB) -> GPT2LMHeadModel:
    """GPT-2 keeps its projections in Conv1D (weight stored d_in x d_out): the fan_in_fan_out case."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=256, pad_token_id=0,
                        bos_token_id=2, eos_token_id=2)
    return GPT2LMHeadModel(config).eval()


def tiny_gemma3(seed: int = 0, vocab_size: int = TINY_VOCAB, softcap: float | None = None) -> Gemma3ForCausalLM:
    """Gemma 3's text model (scaled embeddings, q/k norms, optional final logit soft-capping)."""
    torch.manual_seed(seed)
    config = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                              pad_token_id=0, final_logit_softcapping=softcap)
    return Gemma3ForCausalLM(config).eval()


def tiny_bert(seed: int = 0, num_labels: int = 2, vocab_size: int = TINY_VOCAB) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=256, num_labels=num_labels, pad_token_id=0,
    )
    return BertForSequenceClassification(config).eval()


TINY_MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def assert_same_outputs(ours: nn.Module, theirs: nn.Module, outputs: Callable[[nn.Module], torch.Tensor]) -> None:
    """Two implementations of one adapter (loraforge's and PEFT's, say) give the same outputs.

    Both run on float64 copies: there, the float32 rounding of either one's order of accumulation
    (1e-5 on a logit, which the next release of a library may cross) is gone, while a real difference
    (a missing term, another scale) is still 1e-4 or more. The models passed in are left as they were."""
    with torch.no_grad():
        got, want = (outputs(copy.deepcopy(model).double()) for model in (ours, theirs))
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)

