"""Disk atomicity: writers killed with SIGKILL in the middle of writing a checkpoint and an adapter.

A subprocess writes checkpoints in a loop (reciprocity/checkpoint.py: a 16 MB learner file, the
pool state and an adapter version, then commit) and, each iteration, an adapter version into a
served-adapters directory (AdapterVersion.write, as the engines do). The test kills it at a random
moment inside a write and checks what a restart would read: `checkpoint.latest`/`load` return the
previous intact checkpoint (every byte of the learner file, the pool, the adapter's sha256), every
adapter directory holds exactly the bytes its name promises, and the next checkpoint clears the
debris. A control writer that fills the final directory in place (no temp name, no rename) is
killed the same way, and the same checks catch the torn checkpoint: they are able to fail.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actors.adapters import AdapterVersion
from reciprocity import checkpoint
from reciprocity.config import Config

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16 * 2**20
WRITER = r'''
import hashlib, json, sys
from dataclasses import asdict
from pathlib import Path
from actors.adapters import AdapterVersion
from reciprocity import checkpoint
from reciprocity.config import Config

run, mode, size = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
cfg = Config()
chunk = 1 << 16
for it in range(1, 1000):
    print(f"begin {it}", flush=True)
    state = checkpoint.State(it, it, "run", cfg.fingerprint(), {})
    if mode == "atomic":
        tmp = checkpoint.begin(run, it)
    else:  # the control: fill the final directory in place, marked complete before its data
        tmp = checkpoint.checkpoints_dir(run) / f"it-{it:06d}"
        tmp.mkdir(parents=True)
        (tmp / "state.json").write_text(json.dumps(asdict(state)))
    (tmp / "learner").mkdir()
    with open(tmp / "learner" / "blob.bin", "wb") as f:
        for _ in range(size // chunk):
            f.write(bytes([it % 256]) * chunk)
    data = bytes([it % 251]) * (size // 4)
    version = AdapterVersion("learner", it, hashlib.sha256(data).hexdigest(), data, {"r": 8, "it": it})
    checkpoint.save_pool(tmp, {"iteration": it}, {version.key: version})
    version.write(run / "served")
    if mode == "atomic":
        checkpoint.commit(tmp, state, cfg, keep=2)
    print(f"committed {it}", flush=True)
'''


def kill_mid_write(run: Path, mode: str, seed: int) -> tuple[int, float]:
    """Start a writer, let it commit twice, kill it at a random moment of its third write (or
    later); return the last iteration it reported committed and the measured write time."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(run), mode, str(SIZE)], stdout=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)
    assert proc.stdout is not None
    began: dict[int, float] = {}
    took: list[float] = []
    committed = 0
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, f"writer exited early: {proc.wait()}"
            what, it = line.split()
            if what == "begin":
                began[int(it)] = time.monotonic()
                if int(it) == 3:
                    break
            else:
                committed = int(it)
                took.append(time.monotonic() - began[committed])
        write = sorted(took)[len(took) // 2]
        time.sleep(random.Random(seed).uniform(0.05, 0.9) * write)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    rest = proc.stdout.read().split()
    committed = max([committed, *(int(x) for w, x in zip(rest[::2], rest[1::2], strict=False) if w == "committed")])
    return committed, write


def check_intact(run: Path) -> int:
    """What a restart reads: the newest checkpoint, complete and uncorrupted; returns its iteration."""
    cfg = Config()
    path, state = checkpoint.load(run, cfg)
    it = state.iteration
    assert path == checkpoint.latest(run) and path.name == f"it-{it:06d}"
    blob = (path / "learner" / "blob.bin").read_bytes()
    assert len(blob) == SIZE and blob.count(bytes([it % 256])) == SIZE, f"learner file of it {it} is torn"
    pool, adapters = checkpoint.load_pool(path)  # checks every adapter's sha256
    assert pool == {"iteration": it} and list(adapters) == [f"learner@v{it}"]
    assert adapters[f"learner@v{it}"].config == {"r": 8, "it": it}
    for d in (run / "served").iterdir():
        if not d.name.startswith("."):
            v = AdapterVersion.from_dir(d, "learner", 0)
            assert d.name.endswith(v.sha256[:12]) and len(v.data) == SIZE // 4, f"adapter dir {d.name} is torn"
    return it


def debris(run: Path) -> list[str]:
    return [p.name for root in (checkpoint.checkpoints_dir(run), run / "served") if root.exists()
            for p in root.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("seed", range(6))
def test_sigkill_mid_write_leaves_the_previous_checkpoint_intact(tmp_path: Path, seed: int) -> None:
    run = tmp_path / "run"
    committed, write = kill_mid_write(run, "atomic", seed)
    left = debris(run)
    it = check_intact(run)
    assert committed >= 2 and it in (committed, committed + 1)  # the kill may land between rename and print
    # the restart writes its next checkpoint: the debris goes, the new one is the latest
    cfg = Config()
    tmp = checkpoint.begin(run, it + 1)
    assert not [p for p in debris(run) if p.startswith(".tmp-it") and p != tmp.name]
    (tmp / "pool.json").write_text(json.dumps({"iteration": it + 1}))
    checkpoint.commit(tmp, checkpoint.State(it + 1, it + 1, "run", cfg.fingerprint(), {}), cfg, keep=2)
    assert checkpoint.load(run, cfg)[1].iteration == it + 1
    print(f"seed {seed}: write {write * 1000:.0f} ms, committed {committed}, restart reads {it}, debris {left}")


def test_kills_land_mid_write(tmp_path: Path) -> None:
    """The kills above are not all between writes: over a few tries, temp debris proves that a
    write was interrupted (and check_intact still held)."""
    interrupted = 0
    for seed in range(4):
        run = tmp_path / f"run{seed}"
        kill_mid_write(run, "atomic", 100 + seed)
        interrupted += any(p.startswith(".tmp-") for p in debris(run))
        check_intact(run)
    print(f"atomic writer: {interrupted}/4 kills interrupted a write; every restart read an intact checkpoint")
    assert interrupted >= 2


def test_control_in_place_writer_is_caught_torn(tmp_path: Path) -> None:
    """Without temp-name-and-rename the same kills leave a torn newest checkpoint, and the same
    checks see it: the test above could fail."""
    torn = 0
    for seed in range(4):
        run = tmp_path / f"run{seed}"
        kill_mid_write(run, "inplace", 200 + seed)
        try:
            check_intact(run)
        except (AssertionError, OSError, ValueError) as e:
            torn += 1
            print(f"in-place control, seed {seed}: caught torn: {str(e).splitlines()[0][:100]}")
    print(f"in-place control: {torn}/4 kills left a torn newest checkpoint")
    assert torn >= 2
