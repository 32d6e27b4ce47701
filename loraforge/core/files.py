"""Files that are written whole or not at all: a crash mid-write, even a kill -9, leaves the previous
version, and a failed write (a full disk, a file size limit) raises `WriteError` with it intact.

A folder is written into a temp sibling and swapped in with two renames (target -> .old, temp ->
target). A kill between the two leaves only the .old folder, so every writer and reader first calls
`recover(target)`, which puts it back. Each target has one writer at a time (rank 0 of a run).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from safetensors import SafetensorError

from loraforge.core.errors import WriteError

# What a failed write raises: the OS's errors, and safetensors' own for the same I/O errors.
WRITE_ERRORS = (OSError, SafetensorError)


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temp folder; on success it replaces `target` (old contents dropped only then)."""
    target = Path(target)
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        recover(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old)
    except WRITE_ERRORS as exc:
        raise _write_error(target, exc) from exc
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def recover(target: str | Path) -> None:
    """Finish what a killed `atomic_dir` left beside `target`: if the kill fell between its two
    renames, the previous version (the newest .old folder) becomes `target` again; leftover temp and
    .old folders go. A no-op where nothing was interrupted."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    olds = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not target.exists():
        os.replace(olds.pop(), target)
    for stale in olds + list(target.parent.glob(f".{target.name}.tmp-*")):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except WRITE_ERRORS as exc:
        tmp.unlink(missing_ok=True)
        raise _write_error(path, exc) from exc


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """`records` as JSON Lines, one object a line, in UTF-8 (so the € of an amount stays readable),
    written whole or not at all."""
    atomic_write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    return Path(path)


def _write_error(target: Path, exc: BaseException) -> WriteError:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    before = f"the previous {target.name} is unchanged" if target.exists() else f"{target.name} was not written"
    return WriteError(f"could not write {target}: {reason}; {before}")
