"""What the machine computes natively. One check of bf16 for the whole project: the rollout engine
(actors/vllm_engine.py), the learner (learner/learner.py) and `reciprocity doctor` ask it."""

from __future__ import annotations

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
