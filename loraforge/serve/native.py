"""The pool's low-rank kernel (lowrank.c), compiled on first use with the machine's C compiler.

A plain C file behind ctypes, not a torch extension: it compiles in about a second (no torch headers),
and where no compiler works the pool keeps its torch layouts, which give the same tokens. The library
is cached per source, compiler, flags and CPU (it is built for the CPU it runs on) in
$LORAFORGE_CACHE/kernels (default ~/.cache/loraforge/kernels), written atomically.
LORAFORGE_NATIVE=0 turns it off; CC picks the compiler.

OpenMP: the library links libgomp.so.1, the runtime torch's CPU build has already loaded under that
name, so both share one pool of threads (two runtimes would spin against each other on the cores),
and each call asks for torch's thread count.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("lowrank.c")
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
MAX_RANK = 1024  # the kernel keeps TOKENS x rank x G partial products on its threads' stacks
_P, _I = ctypes.c_void_p, ctypes.c_int64
ARGTYPES = [_I, _P, _P, _I, _P, _I, _I, _I, _P, _P, _P, _P, _P, _I, _P, _P, ctypes.c_int]


def _cpu() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("LORAFORGE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "loraforge") / "kernels"


@functools.lru_cache(maxsize=None)
def load() -> tuple[ctypes.CDLL | None, str]:
    """(the compiled kernel, "") or (None, why it is not there)."""
    if os.environ.get("LORAFORGE_NATIVE", "1") == "0":
        return None, "LORAFORGE_NATIVE=0 turns it off"
    if platform.system() != "Linux":
        return None, f"it is built on Linux only, not {platform.system()}"
    compiler = os.environ.get("CC", "cc")
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, *FLAGS, _cpu()]).encode()).hexdigest()[:16]
    path = _cache_dir() / f"lowrank-{key}.so"
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                built = Path(tmp) / path.name
                subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], check=True, capture_output=True,
                               text=True, timeout=120)
                os.replace(built, path)  # atomic: a concurrent or killed build never leaves half a file
        except subprocess.CalledProcessError as exc:
            return None, f"{compiler} failed on {SOURCE.name}: {exc.stderr.strip()[-400:]}"
        except (OSError, subprocess.SubprocessError) as exc:
            return None, f"{compiler} could not build {SOURCE.name}: {exc}"
    lib = ctypes.CDLL(str(path))
    lib.lowrank_group.restype, lib.lowrank_group.argtypes = None, ARGTYPES
    return lib, ""


def library() -> ctypes.CDLL | None:
    return load()[0]


def usable(x: torch.Tensor, ys: tuple[torch.Tensor, ...], max_rank: int) -> bool:
    """The kernel takes contiguous float32 tensors in host memory, and ranks up to MAX_RANK."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and max_rank <= MAX_RANK and x.is_contiguous()
            and all(y.is_contiguous() for y in ys) and library() is not None)
