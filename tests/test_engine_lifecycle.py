"""Lifecycle: vLLM's engine processes do not outlive the process that started them. A process that
runs a VLLMEngine on the tiny model is SIGKILLed (no shutdown, no finalizer); every process of its
tree (vLLM's EngineCore, any executor worker) must be gone within GONE_S seconds. Without the
engine's parent watch (actors/vllm_engine.py) the EngineCore lives on, holding its memory
(2.5 GB with SmolLM2 on CPU). The same check on a Ray rollout worker is in test_train_faults.py."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow
GONE_S = 15.0  # the watch polls every second; vLLM's own shutdown of the engine takes the rest

SCRIPT = """
import asyncio, sys
from actors.vllm_engine import VLLMEngine

async def main():
    engine = VLLMEngine(sys.argv[1], max_loras=1, max_lora_rank=8, max_model_len=2048, kv_cache_gib=1)
    await engine.start()
    print("engine ready", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_engine_processes_die_with_the_process_that_started_them(tiny_model_dir: Path, tmp_path: Path) -> None:
    log = (tmp_path / "engine.log").open("w")
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tiny_model_dir)], stdout=subprocess.PIPE,
                            stderr=log, text=True, start_new_session=True)
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 300
        assert proc.stdout is not None
        for line in proc.stdout:  # vLLM logs to stdout too
            if line.strip() == "engine ready" or time.monotonic() > deadline:
                break
        assert proc.poll() is None, f"the engine process ended early: {(tmp_path / 'engine.log').read_text()[-2000:]}"
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert tree, "the engine runs in no child process"
        names = [p.name() for p in tree]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        t0 = time.monotonic()
        _, alive = psutil.wait_procs(tree, timeout=GONE_S)
        assert not alive, f"still running {GONE_S} s after their parent was SIGKILLed: {alive} (tree: {names})"
        print(f"engine tree {names} gone {time.monotonic() - t0:.1f} s after the SIGKILL")
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in tree:  # only this test's processes
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
