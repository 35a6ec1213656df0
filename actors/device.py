"""What the machine computes natively, how many cores a process may use, and how its BLAS must run.
One check of bf16, one count of cores and one BLAS setting for the whole project: the rollout engine
(actors/vllm_engine.py), the learner (learner/learner.py) and `reciprocity doctor` ask the first two;
the CLI and the launcher (reciprocity/launcher.py) set the third for every process of a run."""

from __future__ import annotations

import os
from pathlib import Path

FAST_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # without them CPU bf16 matmuls are emulated (slow)

# MKL's strict conditional numerical reproducibility. Without it, MKL's fp32 products are not
# row-invariant: a row's result depends on how many rows share the call (measured on Intel Xeons:
# M <= 8 with AVX-512, M <= 33 with AVX2), so an engine request's log-probs move in the last bits
# with its batch neighbours, whom timing picks, and a resumed run stops being bitwise the
# uninterrupted one (sysdesign/reliability.md, determinism). In strict mode a row's result is the
# same for every M, at one thread and at two. What it costs: sysdesign/benchmarks.md, session 23.
REPRODUCIBLE_BLAS_ENV = {"MKL_CBWR": "AUTO,STRICT"}


def cpu_has_bf16() -> bool:
    """Whether this CPU does bf16 matmuls natively (AVX512-BF16 or AMX, from /proc/cpuinfo). With
    AVX2 only, torch's bf16 linear is emulated: measured ~10 GFLOP/s against ~80 in fp32 per core,
    so "auto" dtypes pick float32 there."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(f in flags for f in FAST_BF16_CPU_FLAGS)


def reproducible_blas() -> dict[str, str]:
    """Put `REPRODUCIBLE_BLAS_ENV` in this process's environment (a value already set wins: the
    user's) and return it, for the Ray actors' runtime env. MKL reads it at its first call, and child
    processes (vLLM's engine) inherit it: call it before any torch math."""
    for key, value in REPRODUCIBLE_BLAS_ENV.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in REPRODUCIBLE_BLAS_ENV}


def node_cores(share: int = 1) -> int:
    """The cores this process may run on, shared among `share` processes of the same role (learner
    ranks, rollout engines). They are packed on one node on a laptop; across nodes this undercounts,
    which only costs speed."""
    return max(1, len(os.sched_getaffinity(0)) // max(1, share))
