"""What the machine computes natively and how many cores a process may use. One check of bf16 and
one count of cores for the whole project: the rollout engine (actors/vllm_engine.py), the learner
(learner/learner.py) and `reciprocity doctor` ask them."""

from __future__ import annotations

import os
from pathlib import Path

FAST_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # without them CPU bf16 matmuls are emulated (slow)


def cpu_has_bf16() -> bool:
    """Whether this CPU does bf16 matmuls natively (AVX512-BF16 or AMX, from /proc/cpuinfo). With
    AVX2 only, torch's bf16 linear is emulated: measured ~10 GFLOP/s against ~80 in fp32 per core,
    so "auto" dtypes pick float32 there."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(f in flags for f in FAST_BF16_CPU_FLAGS)


def node_cores(share: int = 1) -> int:
    """The cores this process may run on, shared among `share` processes of the same role (learner
    ranks, rollout engines). They are packed on one node on a laptop; across nodes this undercounts,
    which only costs speed."""
    return max(1, len(os.sched_getaffinity(0)) // max(1, share))
