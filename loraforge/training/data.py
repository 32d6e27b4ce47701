"""Training data: read and validate data files, tokenise them, batch them.

Causal-LM data is JSONL, one example per line, in one of four forms, told apart by the keys of
each row (every row of a file must be in the same form):

* chat: ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``;
  the loss covers every assistant turn, and at least one must have non-empty content.
* alpaca: ``instruction``, optional ``input``, ``output``; the user turn is the instruction,
  followed by a blank line and the input when the input is non-empty.
* prompt-completion: ``prompt``, ``completion``.
* gsm8k: ``question``, ``answer`` (kept verbatim, worked solution and ``#### N`` included).

Classification data is a TSV or CSV file (by extension) with a header row: a text column
(``sentence`` or ``text`` unless ``text_column=`` names another) and an integer label column
(``label`` unless ``label_column=``) with values in ``[0, num_labels)``.

Every row is validated before anything is tokenised, so a bad row fails fast with a
:class:`~loraforge.errors.DataError` naming the file, the 1-based line and the problem.

Conversations are rendered with the tokenizer's chat template. A tokenizer without one gets a
plain format instead (see :func:`render_chat`)::

    {bos}system: {content}\\n
    user: {content}\\n
    assistant: {content}{eos}

Only the assistant's tokens carry labels: its content and the end-of-turn token that closes it,
so the model learns to stop. Everything else is masked with ``-100``.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import torch
from jinja2 import TemplateError

from loraforge.core.errors import DataError, LoraforgeError

IGNORE_INDEX = -100  # the label value Hugging Face losses skip
TASKS = ("causal-lm", "classification")
ROLES = ("system", "user", "assistant")
RECORDS_PATH = "<records>"  # what errors name as the "file" for in-memory rows

# The JSONL forms, in the order detection tries them: (required keys, optional keys). For every
# form but chat the required keys are (prompt key, response key).
FORMS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "chat": (("messages",), ()),
    "alpaca": (("instruction", "output"), ("input",)),
    "prompt-completion": (("prompt", "completion"), ()),
    "gsm8k": (("question", "answer"), ()),
}
TEXT_COLUMNS = ("sentence", "text")  # tried in this order when text_column is not given
LABEL_COLUMN = "label"
DATA_ENV = ("LORAFORGE_DATA", "LORAFORGE_SHARED_DATA")  # the second: the old name, still set by older scripts
NAMED_DATA = {"sst2": "sst2/train.tsv", "gsm8k": "gsm8k/test.jsonl"}  # name -> its file under $LORAFORGE_DATA
PLAIN_GENERATION_PROMPT = "assistant: "


@dataclass
class Example:
    """One tokenised row."""

    input_ids: list[int]
    labels: list[int] | int  # token labels (-100 masked) for causal-lm; the class id for classification
    line: int  # 1-based line in the source file (index + 1 for in-memory records)


# ----------------------------------------------------------------------------------------------
# Row formats


def _json_type(value: Any) -> str:
    """The JSON name of a value's type, for messages about rows written as JSON."""
    names = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string",
             list: "array", dict: "object"}
    return names.get(type(value), type(value).__name__)


def _form_keys(form: str) -> str:
    required, optional = FORMS[form]
    return ", ".join(required) + "".join(f" (optional {key})" for key in optional)


def detect_format(row: dict) -> str:
    """The form of a JSONL row: "chat", "alpaca", "prompt-completion" or "gsm8k".

    A row with all of a form's required keys is in that form. Failing that, a row with any of a
    form's keys is taken to be a broken row of that form, so that :func:`to_messages` can say which
    key is missing. Raises ValueError if no form's keys appear at all.
    """
    for form, (required, _) in FORMS.items():
        if all(key in row for key in required):
            return form
    for form, (required, optional) in FORMS.items():
        if any(key in row for key in required + optional):
            return form
    known = "; ".join(f"{form}: {_form_keys(form)}" for form in FORMS)
    raise ValueError(f"keys {sorted(row)} match no known form; expected one of {known}")


def _chat_messages(messages: Any) -> list[dict]:
    """Validate a chat row's message list; return plain {"role", "content"} copies."""
    if not isinstance(messages, list):
        raise ValueError(f"key 'messages' must be an array, got {_json_type(messages)}")
    if not messages:
        raise ValueError("key 'messages' is an empty array")
    clean = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where} must be an object with role and content, got {_json_type(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"{where} is missing key '{key}'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"{where} has unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"{where}.content must be a string, got {_json_type(content)}")
        clean.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in clean):
        raise ValueError("no assistant turn with non-empty content: the loss is computed on assistant turns")
    return clean


def to_messages(row: dict) -> list[dict]:
    """Validate a JSONL row of any form and convert it to a chat message list.

    Raises ValueError naming the problem: missing key, wrong type, empty response, unknown role.
    """
    form = detect_format(row)
    required, optional = FORMS[form]
    missing = [key for key in required if key not in row]
    if missing:
        names = ", ".join(f"'{key}'" for key in missing)
        raise ValueError(f"missing key {names}: the {form} form needs keys {_form_keys(form)}")
    if form == "chat":
        return _chat_messages(row["messages"])

    prompt_key, response_key = required
    for key in required:
        if not isinstance(row[key], str):
            raise ValueError(f"key '{key}' must be a string, got {_json_type(row[key])}")
    for key in optional:  # null is an accepted way of writing "no input"
        if row.get(key) is not None and not isinstance(row[key], str):
            raise ValueError(f"key '{key}' must be a string, got {_json_type(row[key])}")
    if not row[response_key].strip():
        raise ValueError(f"empty {response_key}: there is nothing to learn from this row")

    prompt = row[prompt_key]
    if form == "alpaca" and row.get("input"):
        prompt = f"{prompt}\n\n{row['input']}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row[response_key]}]


# ----------------------------------------------------------------------------------------------
# Reading and validating


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise LoraforgeError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line of a JSONL file."""
    with path.open("rb") as f:
        for line, raw in enumerate(f, start=1):
            try:
                # Decoding line by line lets a bad byte be reported with its line; utf-8-sig drops a BOM.
                text = raw.decode("utf-8-sig" if line == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(path, line, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not text.strip():
                continue
            try:
                yield line, json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(path, line, f"invalid JSON: {e.msg} at column {e.colno}") from None


def _causal_rows(items: Iterable[tuple[int, Any]], source: str | Path) -> list[dict]:
    """Validate (line, row) pairs of causal-LM data; return {"messages", "line"} rows."""
    rows: list[dict] = []
    first: tuple[str, int] | None = None  # (form, line) of the first row
    for line, row in items:
        if not isinstance(row, dict):
            raise DataError(source, line, f"expected a JSON object, got {_json_type(row)}")
        try:
            form = detect_format(row)
            if first is not None and form != first[0]:
                raise ValueError(f"row is in {form} form but the first row (line {first[1]}) is in "
                                 f"{first[0]} form; all rows must share one form")
            messages = to_messages(row)
        except ValueError as e:
            raise DataError(source, line, str(e)) from None
        first = first or (form, line)
        rows.append({"messages": messages, "line": line})
    if not rows:
        raise DataError(source, None, "empty: no rows to train on")
    return rows


def _pick_columns(columns: Sequence[str], text_column: str | None, label_column: str | None,
                  what: str) -> tuple[str, str]:
    """Resolve the text and label column names against the available ones (raises ValueError)."""
    if text_column is not None:
        if text_column not in columns:
            raise ValueError(f"{what} has no text column '{text_column}'; it has: {', '.join(columns)}")
    else:
        text_column = next((c for c in TEXT_COLUMNS if c in columns), None)
        if text_column is None:
            raise ValueError(f"{what} has no text column: expected 'sentence' or 'text' (or pass "
                             f"text_column=); it has: {', '.join(columns)}")
    label_column = label_column or LABEL_COLUMN
    if label_column not in columns:
        raise ValueError(f"{what} has no label column '{label_column}' (pass label_column= to use "
                         f"another); it has: {', '.join(columns)}")
    return text_column, label_column


def _read_table(path: Path, text_column: str | None, label_column: str | None) -> Iterator[tuple[int, Any, Any]]:
    """(line, text, raw label) for each data row of a TSV/CSV file with a header."""
    tsv = path.suffix.lower() == ".tsv"
    # TSV files such as GLUE's leave quote characters unescaped inside the text, so quotes mean
    # nothing there; CSV needs them to hold commas.
    quoting = csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter="\t" if tsv else ",", quoting=quoting)
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(path, None, "empty: no header row and no data")
            try:
                text_col, label_col = _pick_columns(header, text_column, label_column, "header")
            except ValueError as e:
                raise DataError(path, 1, str(e)) from None
            text_i, label_i = header.index(text_col), header.index(label_col)
            for fields in reader:
                if not any(field.strip() for field in fields):
                    continue
                if len(fields) != len(header):
                    raise DataError(path, reader.line_num,
                                    f"expected {len(header)} fields like the header, found {len(fields)}")
                yield reader.line_num, fields[text_i], fields[label_i]
        except csv.Error as e:
            raise DataError(path, reader.line_num, f"malformed {'TSV' if tsv else 'CSV'}: {e}") from None
        except UnicodeDecodeError as e:
            raise DataError(path, None, f"not valid UTF-8 ({e.reason})") from None


def _parse_label(raw: Any) -> int:
    """An integer class id from an int or a string of digits (raises ValueError otherwise)."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lstrip("+-").isdigit():
        return int(raw)
    raise ValueError(f"label {raw!r} is not an integer")


def _classification_rows(items: Iterable[tuple[int, Any, Any]], source: str | Path,
                         num_labels: int | None) -> list[dict]:
    """Validate (line, text, raw label) triples; return {"text", "label", "line"} rows."""
    if num_labels is not None and num_labels < 2:
        raise LoraforgeError(f"num_labels must be at least 2, got {num_labels}")
    rows = []
    for line, text, raw_label in items:
        if not isinstance(text, str):
            raise DataError(source, line, f"text must be a string, got {_json_type(text)}")
        if not text.strip():
            raise DataError(source, line, "empty text")
        try:
            label = _parse_label(raw_label)
        except ValueError as e:
            raise DataError(source, line, str(e)) from None
        if label < 0 or (num_labels is not None and label >= num_labels):
            bound = f"[0, {num_labels})" if num_labels is not None else "[0, num_labels)"
            raise DataError(source, line, f"label {label} out of range {bound}")
        rows.append({"text": text, "label": label, "line": line})
    if not rows:
        raise DataError(source, None, "empty: no data rows to train on")
    return rows


def data_path(data: str, flag: str = "--data") -> Path:
    """A data file: `data` itself, or for a name of NAMED_DATA (`sst2`, `gsm8k`) its file under the
    folder in $LORAFORGE_DATA (no data is looked for anywhere else, so a run reads only what it was told)."""
    if data not in NAMED_DATA:
        path = Path(data)
    else:
        root = next((os.environ[name] for name in DATA_ENV if os.environ.get(name)), None)
        if root is None:
            raise LoraforgeError(f"the data set {data!r} is read from $LORAFORGE_DATA/{NAMED_DATA[data]}: pass "
                                 f"{flag} PATH or set LORAFORGE_DATA to the folder holding {NAMED_DATA[data]}")
        path = Path(root) / NAMED_DATA[data]
    if not path.is_file():
        raise LoraforgeError(f"{flag}: {path} is not a file")
    return path


def read_rows(path: str | Path, task: str = "causal-lm", text_column: str | None = None,
              label_column: str | None = None, num_labels: int | None = None) -> list[dict]:
    """Read and validate a whole data file.

    Returns normalised rows: ``{"messages": [...], "line": n}`` for causal-lm, ``{"text": str,
    "label": int, "line": n}`` for classification. Raises DataError at the first bad row.
    """
    _check_task(task)
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "file not found")
    table = path.suffix.lower() in (".tsv", ".csv")
    if task == "classification":
        if not table:
            raise DataError(path, None, "classification data must be a .tsv or .csv file with a header row")
        return _classification_rows(_read_table(path, text_column, label_column), path, num_labels)
    if table:
        raise DataError(path, None, "causal-lm data must be JSONL; a labelled table needs task='classification'")
    return _causal_rows(_read_jsonl(path), path)


def _record_items(records: Sequence[Any], text_column: str | None,
                  label_column: str | None) -> Iterator[tuple[int, Any, Any]]:
    """(line, text, raw label) for in-memory classification records; columns come from the first."""
    columns: tuple[str, str] | None = None
    for i, record in enumerate(records):
        line = i + 1
        if not isinstance(record, dict):
            raise DataError(RECORDS_PATH, line, f"expected an object, got {_json_type(record)}")
        try:
            columns = columns or _pick_columns(list(record), text_column, label_column, "record")
        except ValueError as e:
            raise DataError(RECORDS_PATH, line, str(e)) from None
        missing = [key for key in columns if key not in record]
        if missing:
            raise DataError(RECORDS_PATH, line, f"missing key '{missing[0]}'")
        yield line, record[columns[0]], record[columns[1]]


# ----------------------------------------------------------------------------------------------
# Tokenising


def render_chat(messages: list[dict], tokenizer, add_generation_prompt: bool = False) -> str:
    """Render messages as text the way training sees them; use it for prompts at inference too.

    With a chat template this is ``tokenizer.apply_chat_template``. Without one it is the plain
    format: ``{bos}`` (if the tokenizer has one), then ``"{role}: {content}\\n"`` per turn, except
    that an assistant turn ends with the eos token instead of the newline; the generation prompt
    is ``"assistant: "``.
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has neither a chat template nor an eos token, "
                         "so the end of a response cannot be marked")
    parts = [tokenizer.bos_token or ""]
    for message in messages:
        end = tokenizer.eos_token if message["role"] == "assistant" else "\n"
        parts.append(f"{message['role']}: {message['content']}{end}")
    if add_generation_prompt:
        parts.append(PLAIN_GENERATION_PROMPT)
    return "".join(parts)


def _encode(text: str, tokenizer) -> list[int]:
    # Rendered text already holds whatever bos/special tokens the template wants.
    return tokenizer.encode(text, add_special_tokens=False)


def _continue_tokens(ids: list[int], text: str, start: int, tokenizer) -> list[int]:
    """The tokens that follow `ids` (the tokens of ``text[:start]``) to cover ``text``.

    Tokenising the whole prefix reproduces how the full rendering tokenises, and usually extends
    `ids`. When a boundary falls inside what would be a single token, the prefix's tokens no longer
    start with `ids`; then the new piece is tokenised on its own, which is also what generation
    sees: a tokenised prompt followed by the tokens the model emits.
    """
    whole = _encode(text, tokenizer)
    if whole[:len(ids)] == ids:
        return whole[len(ids):]
    return _encode(text[start:], tokenizer)


def _response_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering and the character span of each assistant response in it.

    A response runs from the end of the prompt (``messages[:i]`` rendered with the generation
    prompt) to the end of ``messages[:i+1]`` rendered, so it holds the end-of-turn marker.
    """
    full = render_chat(messages, tokenizer)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_chat(messages[:i], tokenizer, add_generation_prompt=True)
        turn = render_chat(messages[:i + 1], tokenizer)
        previous_end = spans[-1][1] if spans else 0
        if not (turn.startswith(prompt) and full.startswith(turn) and len(prompt) >= previous_end):
            raise ValueError(
                f"the chat template renders the conversation up to message {i} differently from the "
                "start of the whole conversation, so the assistant's tokens cannot be located")
        spans.append((len(prompt), len(turn)))
    return full, spans


def tokenize_messages(messages: list[dict], tokenizer, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and labels of a conversation, truncated to `max_length` (keeping the start).

    Labels equal the ids on each assistant response, up to and including the last special token
    in it (the end-of-turn token; formatting after it, such as ChatML's newline, is context the
    model never emits), and -100 elsewhere. Raises ValueError if the tokenizer cannot render the
    conversation consistently.
    """
    full, spans = _response_spans(messages, tokenizer)
    # unk can appear inside content; it never closes a turn.
    turn_enders = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    ids: list[int] = []
    labels: list[int] = []
    position = 0
    for start, end in spans:
        context = _continue_tokens(ids, full[:start], position, tokenizer)
        ids += context
        labels += [IGNORE_INDEX] * len(context)
        response = _continue_tokens(ids, full[:end], start, tokenizer)
        last = max((k for k, t in enumerate(response) if t in turn_enders), default=len(response) - 1)
        ids += response
        labels += response[:last + 1] + [IGNORE_INDEX] * (len(response) - last - 1)
        position = end
    tail = _continue_tokens(ids, full, position, tokenizer)  # turns after the last response
    ids += tail
    labels += [IGNORE_INDEX] * len(tail)
    return ids[:max_length], labels[:max_length]


class TokenizedDataset(Sequence[Example]):
    """Tokenised examples of one data source.

    Attributes: ``task``; ``path`` (the file, or "<records>"); ``num_labels`` (classification,
    else None); ``n_dropped`` (rows dropped because truncation removed their whole response).
    """

    def __init__(self, examples: list[Example], task: str, path: str, num_labels: int | None = None,
                 n_dropped: int = 0):
        self.examples, self.task, self.path = examples, task, path
        self.num_labels, self.n_dropped = num_labels, n_dropped

    def __len__(self) -> int:
        return len(self.examples)

    @overload
    def __getitem__(self, index: int) -> Example: ...
    @overload
    def __getitem__(self, index: slice) -> list[Example]: ...

    def __getitem__(self, index):
        return self.examples[index]

    @property
    def lengths(self) -> list[int]:
        """Token count of every example (for :class:`BatchPlan` length grouping)."""
        return [len(e.input_ids) for e in self.examples]


def _tokenize_rows(rows: list[dict], tokenizer, task: str, max_length: int, num_labels: int | None,
                   source: str) -> TokenizedDataset:
    if max_length < 1:
        raise LoraforgeError(f"max_length must be positive, got {max_length}")
    if task == "classification":
        num_labels = num_labels or max(2, max(row["label"] for row in rows) + 1)
        examples = [Example(tokenizer(row["text"], truncation=True, max_length=max_length)["input_ids"],
                            row["label"], row["line"]) for row in rows]
        return TokenizedDataset(examples, task, source, num_labels=num_labels)

    examples = []
    for row in rows:
        try:
            ids, labels = tokenize_messages(row["messages"], tokenizer, max_length)
        except (ValueError, TemplateError) as e:
            raise DataError(source, row["line"], f"cannot tokenise this conversation: {e}") from e
        if all(label == IGNORE_INDEX for label in labels):
            continue  # the whole response lies beyond max_length: nothing to learn
        examples.append(Example(ids, labels, row["line"]))
    dropped = len(rows) - len(examples)
    if not examples:
        raise DataError(source, None, f"every row's response lies beyond max_length={max_length} tokens; "
                                      "raise max_length")
    if dropped:
        warnings.warn(f"{source}: dropped {dropped} of {len(rows)} rows whose response lies entirely "
                      f"beyond max_length={max_length} tokens", stacklevel=3)
    return TokenizedDataset(examples, task, source, n_dropped=dropped)


def load_dataset(path: str | Path, tokenizer, task: str = "causal-lm", max_length: int = 512,
                 text_column: str | None = None, label_column: str | None = None,
                 num_labels: int | None = None) -> TokenizedDataset:
    """Read, validate and tokenise a data file (see the module docstring for the formats).

    For classification, `num_labels` defaults to the largest label + 1 (at least 2).
    """
    rows = read_rows(path, task, text_column, label_column, num_labels)
    return _tokenize_rows(rows, tokenizer, task, max_length, num_labels, str(path))


def from_records(records: Sequence[dict], tokenizer, task: str = "causal-lm", max_length: int = 512,
                 text_column: str | None = None, label_column: str | None = None,
                 num_labels: int | None = None) -> TokenizedDataset:
    """Like :func:`load_dataset` for rows already in memory: the same validation, with errors
    naming "<records>" and line = index + 1."""
    _check_task(task)
    if task == "classification":
        rows = _classification_rows(_record_items(records, text_column, label_column), RECORDS_PATH, num_labels)
    else:
        rows = _causal_rows(((i + 1, record) for i, record in enumerate(records)), RECORDS_PATH)
    return _tokenize_rows(rows, tokenizer, task, max_length, num_labels, RECORDS_PATH)


# ----------------------------------------------------------------------------------------------
# Batching


def collate(examples: list[Example], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad examples into a batch: ``input_ids``, ``attention_mask`` (B, T) and ``labels``.

    Causal-LM labels are (B, T) with -100 on padding; classification labels are a LongTensor (B,).
    The attention mask comes from the lengths, not from `pad_id`, so a pad id shared with eos
    (as in SmolLM2) is harmless.
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    classification = isinstance(examples[0].labels, int)
    if any(isinstance(e.labels, int) != classification for e in examples):
        raise ValueError("cannot mix classification and causal-LM examples in one batch")

    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    token_labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        columns = slice(0, n) if padding_side == "right" else slice(width - n, width)
        input_ids[row, columns] = torch.tensor(example.input_ids, dtype=torch.long)
        attention_mask[row, columns] = 1
        if not classification:
            token_labels[row, columns] = torch.tensor(example.labels, dtype=torch.long)
    labels = torch.tensor([e.labels for e in examples], dtype=torch.long) if classification else token_labels
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def count_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """How many targets the batch's loss averages over.

    Causal LM: labelled positions after the first, because a causal LM predicts token t from the
    tokens before it, so position 0 is never a target (Hugging Face losses shift the same way).
    Classification: one target per example. Summing per-batch losses and dividing by the total of
    this count over accumulated micro-batches weighs every token equally.
    """
    labels = batch["labels"]
    if labels.dim() == 1:
        return labels.numel()
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


class BatchPlan:
    """Deterministic order of batches: batch k is a pure function of (seed, k), so a resumed run
    sees exactly the batches an uninterrupted one would.

    Epoch e uses a permutation drawn from a torch.Generator seeded with seed + e. The last
    incomplete batch of each epoch is dropped (unless the dataset is smaller than one batch, which
    then makes a single batch); with shuffling, which examples are left out changes every epoch.
    length_grouped=True sorts each chunk of 50 * batch_size shuffled examples by length before
    cutting batches (less padding), then shuffles the batches.
    """

    GROUP_CHUNK_BATCHES = 50

    def __init__(self, n_examples: int, batch_size: int, seed: int = 0, shuffle: bool = True,
                 length_grouped: bool = False, lengths: Sequence[int] | None = None):
        if n_examples < 1 or batch_size < 1:
            raise ValueError(f"need n_examples >= 1 and batch_size >= 1, got {n_examples} and {batch_size}")
        if length_grouped and (lengths is None or len(lengths) != n_examples):
            raise ValueError("length_grouped=True needs lengths, one per example")
        self.n_examples, self.batch_size, self.seed = n_examples, batch_size, seed
        self.shuffle, self.length_grouped = shuffle, length_grouped
        self.lengths = list(lengths) if lengths is not None else None
        self._epoch_cache: tuple[int, list[list[int]]] | None = None  # batches of the last epoch asked for

    def batches_per_epoch(self) -> int:
        return max(1, self.n_examples // self.batch_size)

    def indices(self, k: int) -> list[int]:
        """Example indices of global batch k (k >= 0; k counts on across epochs)."""
        if k < 0:
            raise ValueError(f"batch index must be >= 0, got {k}")
        epoch, within = divmod(k, self.batches_per_epoch())
        return list(self._epoch_batches(epoch)[within])

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = (torch.randperm(self.n_examples, generator=generator).tolist() if self.shuffle
                 else list(range(self.n_examples)))
        # Drop the incomplete batch before grouping, so the examples left out are a random draw
        # rather than the longest (or shortest) of a sorted chunk.
        order = order[:self.batches_per_epoch() * self.batch_size]
        if self.length_grouped:
            chunk = self.GROUP_CHUNK_BATCHES * self.batch_size
            order = [i for c in range(0, len(order), chunk)
                     for i in sorted(order[c:c + chunk], key=self.lengths.__getitem__)]
        batches = [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        if self.length_grouped and self.shuffle:
            # Sorted chunks would otherwise run from short to long batches within each chunk.
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        self._epoch_cache = (epoch, batches)
        return batches
