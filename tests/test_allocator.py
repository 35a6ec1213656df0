"""The malloc a process runs on (actors/allocator.py): jemalloc preloaded from Ray's copy, seen by
the process itself, its free pages given back on request, and a learner step's numbers the same
on either allocator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from actors import allocator
from reciprocity.config import Config

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, malloc: allocator.Allocator) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
    env.update(allocator.preload_env(malloc), PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    return subprocess.run([sys.executable, "-c", script, *args], check=True, capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600).stdout.strip().splitlines()[-1]


def test_auto_is_jemalloc_on_cpu_and_glibc_on_gpu() -> None:
    assert allocator.jemalloc_path() is not None  # Ray's wheel carries it: nothing to install
    assert allocator.resolve("auto", 0) == "jemalloc" and allocator.resolve("auto", 0.5) == "glibc"
    assert allocator.resolve("glibc", 0) == "glibc" and allocator.resolve("jemalloc", 1) == "jemalloc"
    assert allocator.preload_env("glibc") == {}
    env = allocator.preload_env("jemalloc")
    assert Path(env["LD_PRELOAD"]).is_file() and env["MALLOC_CONF"] == allocator.NO_DECAY
    for section in ("learner", "rollout"):
        with pytest.raises(ValueError, match="allocator"):
            Config.model_validate({section: {"allocator": "tcmalloc"}})
        # memory and speed only: a run resumes on the other allocator
        assert Config.model_validate({section: {"allocator": "glibc"}}).fingerprint() == Config().fingerprint()


def test_jemalloc_asked_for_where_there_is_none_is_an_error_and_auto_takes_glibc(monkeypatch) -> None:
    monkeypatch.setattr(allocator, "jemalloc_path", lambda: None)
    with pytest.raises(FileNotFoundError, match="libjemalloc"):
        allocator.preload_env("jemalloc")
    assert allocator.resolve("auto", 0) == "glibc"


def test_a_preloaded_process_keeps_its_free_pages_until_it_gives_them_back() -> None:
    """With purging off, 512 MB freed stay resident (reused without a page fault);
    `release_free_memory` hands them to the kernel. On glibc it does nothing."""
    probe = """
import json, psutil
from actors import allocator
rss = lambda: psutil.Process().memory_info().rss / 2**20
block = bytearray(512 << 20)  # zero-filled: every page touched
held = rss()
del block
freed = rss()
released = allocator.release_free_memory()
after = rss()
from learner.learner import set_mmap_threshold  # glibc's mallopt: set on glibc only (imports torch: after rss)
print(json.dumps({"loaded": allocator.loaded(), "held": held, "freed": freed, "released": released, "after": after,
                  "threshold_set": set_mmap_threshold(131072)}))
"""
    je = json.loads(_run(probe, malloc="jemalloc"))
    assert je["loaded"] == "jemalloc" and je["released"] is True and je["threshold_set"] is False
    assert je["freed"] > je["held"] - 64  # kept for reuse
    assert je["after"] < je["held"] - 448  # given back
    glibc = json.loads(_run(probe, malloc="glibc"))
    assert glibc["loaded"] == "glibc" and glibc["released"] is False and glibc["threshold_set"] is True


STEPS = """
import hashlib, json, sys
from transformers import AutoTokenizer
from learner.learner import Learner
from support import ipd_table, learner_config
model = sys.argv[1]
table = ipd_table(AutoTokenizer.from_pretrained(model), n_games=6, seed=0, group_size=2)
learner = Learner(learner_config(model, lora_r=4, lora_alpha=8, lr=1e-2, micro_batch_tokens=1024, num_threads=1,
                                 dtype="float32", entropy_coef=0.01, kl_coef=0.01, credit_method="aa"))
metrics = [learner.train_step([table]) for _ in range(2)]
print(json.dumps({"metrics": metrics, "adapter": hashlib.sha256(learner.export().data).hexdigest()}))
"""


@pytest.mark.slow
def test_a_learner_step_gives_the_same_numbers_on_either_allocator(tiny_model_dir: Path) -> None:
    """An allocator places memory, it computes nothing: two steps give bitwise the same losses, grad
    norms and adapter on glibc and on jemalloc (which gives its free pages back after each
    micro-batch)."""
    runs = {m: json.loads(_run(STEPS, str(tiny_model_dir), malloc=m)) for m in ("glibc", "jemalloc")}
    assert runs["glibc"]["adapter"] == runs["jemalloc"]["adapter"]
    for glibc, je in zip(runs["glibc"]["metrics"], runs["jemalloc"]["metrics"], strict=True):
        assert "time_release_s" in je and "time_release_s" not in glibc  # each ran on its allocator
        numbers = {k for k in glibc if not k.startswith("time_") and k != "tokens_per_s"}
        assert numbers >= {"loss", "grad_norm", "entropy", "kl"}
        assert {k: glibc[k] for k in numbers} == {k: je[k] for k in numbers}
