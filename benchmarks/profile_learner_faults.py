"""Where a CPU learner step's time goes between torch and the kernel (issue 15, item 4): wall, user
and system CPU seconds, minor page faults and peak RSS of each `Learner.train_step` on
`bench_learner`'s batch (IPD-like games, both seats), with a run config's learner and overrides.

    python benchmarks/profile_learner_faults.py [--config configs/smoke.yaml] [--threads 2]
        [--games 8] [--steps 3] [--allocator glibc|jemalloc] [key.sub=value ...]   e.g. learner.mmap_threshold=0

`--allocator jemalloc` restarts the script on jemalloc as a learner actor starts
(`actors.allocator.preload_env`: Ray's copy, purging off); the learner then purges after each
micro-batch, as in a run. The default is glibc, the process as started.

A fixed small `learner.mmap_threshold` maps every large block fresh, so each step faults its pages
in again; this shows what that costs on the machine at hand (sysdesign/benchmarks.md, session 15).
Set GLIBC_TUNABLES (glibc's malloc tunables) or LD_PRELOAD and MALLOC_CONF (another allocator, e.g.
jemalloc) before the start; the output records them. Peak RSS in GiB (ru_maxrss is KiB), as
`bench_iteration`'s. Prints ONE JSON object (last line). Not a benchmark (`make bench` runs `bench_*.py` only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from bench_learner import make_table  # noqa: E402

from actors import allocator  # noqa: E402
from actors.device import node_cores  # noqa: E402
from learner.learner import Learner  # noqa: E402
from reciprocity.config import load_config  # noqa: E402
from reciprocity.learner_settings import learner_config  # noqa: E402


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, default=ROOT / "configs/smoke.yaml")
    ap.add_argument("--threads", type=int, default=node_cores())
    ap.add_argument("--games", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--allocator", choices=("glibc", "jemalloc"), default="glibc")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args()
    if args.allocator == "jemalloc" and allocator.loaded() != "jemalloc":  # preloaded only at a start
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **allocator.preload_env("jemalloc")})
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    model_dir = Path(cfg.model.path).absolute()
    table = make_table(AutoTokenizer.from_pretrained(str(model_dir)), args.games)
    learner = Learner(dataclasses.replace(learner_config(cfg), num_threads=args.threads))
    learner.setup()
    steps = []
    for _ in range(args.steps):  # the first one includes first-call paths
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        learner.train_step([table])
        r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
        steps.append({"wall_s": wall, "user_s": r1.ru_utime - r0.ru_utime, "system_s": r1.ru_stime - r0.ru_stime,
                      "minor_faults": r1.ru_minflt - r0.ru_minflt, "peak_rss_gb": r1.ru_maxrss / 2**20})
        print(json.dumps(steps[-1]), file=sys.stderr, flush=True)
    return {"name": "learner_faults", "config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT)
                                                     else args.config),
            "overrides": args.overrides, "threads": args.threads, "games": args.games,
            "allocator": allocator.loaded(),
            "environment": {k: os.environ.get(k) for k in ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_CONF")},
            "mmap_threshold": learner.config.mmap_threshold,
            "steps": steps}


if __name__ == "__main__":
    print(json.dumps(main()))
