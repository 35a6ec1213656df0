"""One bf16 check (actors/device.py) for the rollout engine, the learner and `reciprocity doctor`:
on this machine they all decide the same dtype for `dtype: auto`. And MKL's reproducible mode: set
unless the user set another, and in it an fp32 product's rows do not depend on how many share it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from actors.device import FAST_BF16_CPU_FLAGS, REPRODUCIBLE_BLAS_ENV, cpu_has_bf16, reproducible_blas

# fp32 products of SmolLM2's shapes (and a LoRA's rank 16) on the first M rows of a 300-row input, at
# 1 and 2 threads: the M values whose rows differ from the same rows of the 300-row product
ROWS_SCRIPT = """
import json, torch
torch.manual_seed(0)
found = {}
for threads in (1, 2):
    torch.set_num_threads(threads)
    for k, n in ((576, 1536), (1536, 576), (576, 16), (16, 576)):
        w, x = torch.randn(n, k) * 0.05, torch.randn(300, k)
        full = torch.nn.functional.linear(x, w)
        found[f"{threads}:{k}x{n}"] = [m for m in (1, 2, 3, 4, 7, 8, 16, 17, 32, 33, 64, 128)
                                      if not torch.equal(torch.nn.functional.linear(x[:m], w), full[:m])]
print(json.dumps(found))
"""


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


def test_reproducible_blas_sets_mkl_strict_unless_the_user_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MKL_CBWR", raising=False)
    assert reproducible_blas() == REPRODUCIBLE_BLAS_ENV == {"MKL_CBWR": "AUTO,STRICT"}
    assert os.environ["MKL_CBWR"] == "AUTO,STRICT"
    monkeypatch.setenv("MKL_CBWR", "AVX2,STRICT")
    assert reproducible_blas() == {"MKL_CBWR": "AVX2,STRICT"} and os.environ["MKL_CBWR"] == "AVX2,STRICT"


def test_in_reproducible_mode_an_fp32_row_does_not_depend_on_its_batch() -> None:
    """Real torch and MKL, in a fresh process (MKL reads the mode at its first call): every row of
    a product equals the same row of a larger one, whatever the rows and threads."""
    pytest.importorskip("torch")
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"} | REPRODUCIBLE_BLAS_ENV
    out = subprocess.run([sys.executable, "-c", ROWS_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(found) == 8 and all(v == [] for v in found.values()), found
