"""One bf16 check (actors/device.py) for the rollout engine, the learner and `reciprocity doctor`:
on this machine they all decide the same dtype for `dtype: auto`."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.device import FAST_BF16_CPU_FLAGS, cpu_has_bf16


def test_cpu_bf16_reads_the_cpu_flags() -> None:
    flags = Path("/proc/cpuinfo").read_text().split()
    assert cpu_has_bf16() == any(f in flags for f in FAST_BF16_CPU_FLAGS)


def test_engine_learner_and_doctor_share_the_check() -> None:
    torch = pytest.importorskip("torch")
    import actors.vllm_engine
    from learner.learner import resolve_dtype
    from reciprocity.doctor import _bf16

    assert actors.vllm_engine.cpu_has_bf16 is cpu_has_bf16  # the engine's "auto": bfloat16 iff this
    if not torch.cuda.is_available():
        assert resolve_dtype("auto") == (torch.bfloat16 if cpu_has_bf16() else torch.float32)
        ok, detail = _bf16()
        assert ok and ("bfloat16 (native)" in detail) == cpu_has_bf16(), detail
