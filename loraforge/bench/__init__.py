"""Benchmarks: reproducible commands that print their tables; with `--report PATH` each also appends
a dated section (machine, command, table) to that Markdown file and writes its figure beside it."""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import platform
import resource
from pathlib import Path

import torch


def machine() -> str:
    """One line naming the hardware the figures come from."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB, CPU only, torch {torch.__version__}"


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def status_mb(field: str = "VmRSS") -> float:
    """A memory line of /proc/self/status in MiB: VmRSS (resident now) or VmHWM (the peak since the
    last reset through /proc/self/clear_refs)."""
    line = next(li for li in Path("/proc/self/status").read_text().splitlines() if li.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # the kernel reports kB


def release_freed_memory() -> None:
    """Hand glibc's freed but cached heap pages back to the kernel, so that RSS shows what is in use
    (no-op where the C library is not glibc)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def map_large_blocks() -> None:
    """Make glibc serve every block of 256 KiB or more with its own mmap (M_MMAP_THRESHOLD = -3), so
    that a freed tensor leaves RSS at once. By default glibc raises that threshold as large blocks
    are freed, after which tensors come from the heap and fragmentation keeps RSS at its high-water
    mark: a benchmark reading RSS would then see memory that is no longer in use."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 256 * 1024)


def figure_name(stem: str, folder: Path) -> str:
    """`stem-YYYYmmddTHHMMSS.png`: each section of a report keeps its own picture when the
    benchmark runs again (a second run in the same second gets `-2`, ...)."""
    name = f"{stem}-{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%S}"
    taken = [p.name for p in folder.glob(f"{name}*.png")]
    return f"{name}-{len(taken) + 1}.png" if taken else f"{name}.png"


def figure_line(fig, stem: str, caption: str, folder: Path | None, dpi: int = 120) -> str:
    """Write the figure into `folder` (the report's) and return the line of the section that shows
    it; with no folder (no report), close it and return "": a printed table shows no picture."""
    if folder is None:
        import matplotlib.pyplot as plt

        plt.close(fig)
        return ""
    path = folder / figure_name(stem, folder)
    save_figure(fig, path, dpi)
    return f"\n\n{caption}: ![]({path.name})\n"


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    """Lay out, write and close a benchmark's matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def append_section(path: Path, title: str, command: str, body: str) -> None:
    """Append a dated section (title, machine, command, table) to the report at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text("# Benchmarks\n\nEvery table below comes from the command shown above it, run on the machine named.\n")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with path.open("a") as f:
        f.write(f"\n## {title} ({stamp})\n\nMachine: {machine()}\n\n```\n{command}\n```\n\n{body.rstrip()}\n")
