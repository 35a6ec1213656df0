"""Which malloc a CPU process runs on: glibc's, or jemalloc preloaded from the copy Ray ships.

A CPU learner step frees and reallocates gigabytes of activations and gradients per micro-batch.
glibc either maps large blocks fresh (a fixed mmap threshold: every step faults in and zeroes its
pages again, ~30 s of kernel time a step on an EPYC) or keeps them in a heap that fragments (the
sliding threshold: 4.5-6.9 GB). jemalloc with purging switched off (`NO_DECAY`) reuses freed pages
at once, and the learner gives its free pages back after each micro-batch (`release_free_memory`),
so a micro-batch runs with few page faults and the rank's memory stays near one micro-batch's peak
(sysdesign/benchmarks.md, session 16). An allocator places memory; it computes nothing, so no number
changes (tests/test_allocator.py; sysdesign/learner.md, Memory).

jemalloc must be loaded before the process allocates anything: Ray starts an actor's process with
the actor's `runtime_env` environment, so `preload_env` goes there (reciprocity/launcher.py), and
vLLM's engine process inherits it from its worker. Ray's wheel carries `ray/core/libjemalloc.so`
(jemalloc 5.3), so every node that runs Ray has it: nothing to install.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from pathlib import Path
from typing import Literal

Allocator = Literal["glibc", "jemalloc"]

# jemalloc never purges on its own: freed pages stay mapped for reuse within a micro-batch (a step's
# faults drop from ~6.7 M at jemalloc's default 10 s decay to ~13 k); release_free_memory gives them back
NO_DECAY = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
_ALL_ARENAS = 4096  # MALLCTL_ARENAS_ALL


def jemalloc_path() -> Path | None:
    """Ray's bundled jemalloc on this node (found without importing ray), or None."""
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "core" / "libjemalloc.so"
    return path if path.is_file() else None


def preload_env(allocator: Allocator) -> dict[str, str]:
    """The environment that starts a process on `allocator`: {} for glibc. Raises where jemalloc is
    asked for and this node has none (never a silent glibc)."""
    if allocator == "glibc":
        return {}
    path = jemalloc_path()
    if path is None:
        raise FileNotFoundError("allocator jemalloc: Ray's ray/core/libjemalloc.so is not installed here")
    return {"LD_PRELOAD": str(path), "MALLOC_CONF": NO_DECAY}


@functools.cache
def loaded() -> Allocator:
    """The malloc this process runs on, from its memory map (fixed at the process's start)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "glibc"
    return "jemalloc" if "libjemalloc" in maps else "glibc"


def release_free_memory() -> bool:
    """Give jemalloc's free pages back to the kernel (every arena's dirty pages purged); False where
    this process does not run on jemalloc. Its RSS then holds what is allocated, plus page tables."""
    if loaded() != "jemalloc":
        return False
    mallctl = ctypes.CDLL(None).mallctl  # the preloaded library's symbol
    mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return mallctl(f"arena.{_ALL_ARENAS}.purge".encode(), None, None, None, 0) == 0


def resolve(choice: Literal["auto", "glibc", "jemalloc"], gpus: float) -> Allocator:
    """A config's `allocator` for a process with `gpus` GPUs: auto = jemalloc on CPU where Ray's
    copy is here (measured on CPU only), else glibc."""
    if choice == "auto":
        return "jemalloc" if gpus == 0 and jemalloc_path() is not None else "glibc"
    return choice
