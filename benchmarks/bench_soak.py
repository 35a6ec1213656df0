"""Soak: many training iterations on the tiny model, watching memory and adapter counts for leaks.

An in-process `Trainer` (configs/smoke.yaml with the tiny random Llama, 4 IPD games per iteration,
a snapshot every iteration so the buffer grows and the resident snapshots change every iteration:
versions are loaded, probed and retired all the time; a checkpoint every 10 iterations). After every
iteration it measures:
- the RSS of the rollout worker's process, of its vLLM engine (the EngineCore process and its
  model-executing worker process: all descendants of the rollout worker, summed), of the learner
  rank, of the pool actor and of this driver process;
- the adapters the worker holds (`RolloutWorker.adapters()`), the engine's own view (versions
  served and retiring) and the adapter files on disk under the run's `served-adapters/` (the
  engine's all-zero base adapter is one of them);
- the adapter versions the pool keeps (current + every snapshot: snapshots are kept for good) and
  their bytes.
Growth rates are least-squares slopes (MB per iteration) over the second half of the run, after
the allocators and caches have warmed up. Prints ONE JSON object as the last stdout line:
{"name": "soak", "iterations": 50, "worker_rss_growth_mb_per_iteration": ..., ...}.

    python benchmarks/bench_soak.py [--iterations 50] [--model PATH] [key.sub=value ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
MB = 2**20


def log(message: str) -> None:
    print(f"[bench_soak] {message}", file=sys.stderr, flush=True)


def rss_mb(pid: int, descendants: bool = False) -> float:
    """RSS of `pid` (or, with `descendants`, the sum over its descendant processes), in MB."""
    import psutil

    proc = psutil.Process(pid)
    procs = proc.children(recursive=True) if descendants else [proc]
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total / MB


def rss_parts_mb(pid: int, descendants: bool = False) -> dict[str, float]:
    """RSS split as /proc/PID/status does: anonymous, file-backed, shared memory (MB; summed over
    descendants with `descendants`). vLLM's engine maps shared-memory rings (/dev/shm) whose pages
    count once touched; the KV cache is anonymous and resident from the start on CPU."""
    import psutil

    pids = [c.pid for c in psutil.Process(pid).children(recursive=True)] if descendants else [pid]
    parts = {"anon": 0.0, "file": 0.0, "shmem": 0.0}
    for p in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                name = {"RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem"}.get(key)
                if name:
                    parts[name] += int(value.split()[0]) / 1024
    return parts


def _engine_view(worker: Any) -> dict[str, int]:
    """Inside the worker actor: what its engine serves and retires."""
    engine = worker.engine
    return {"served": len(engine.loaded()), "retiring": len(getattr(engine, "_retiring", {}))}


def _pool_view(pool: Any) -> dict[str, int]:
    held = pool.adapters()
    # the pool holds AdapterRefs: "bytes" is what they refer to in the run's adapter store, not the pool's memory
    return {"versions": len(held), "bytes": sum(v.size for v in held.values()), "snapshots": len(pool.snapshots)}


def slope(values: list[float]) -> float:
    """Least-squares growth per iteration over the second half of `values`."""
    half = values[len(values) // 2:]
    if len(half) < 2:
        return 0.0
    return float(np.polyfit(np.arange(len(half)), np.asarray(half), 1)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=50)
    ap.add_argument("--model", type=Path, default=None, help="HF model dir (default: build the tiny random Llama)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import ray

    from reciprocity import launcher
    from reciprocity.config import load_config
    from reciprocity.models import build_tiny
    from reciprocity.train import Trainer

    tmp = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    model = args.model or build_tiny(ROOT / "models" / "smollm2-135m-instruct", tmp / "tiny-llama")
    cfg = load_config(ROOT / "configs/smoke.yaml", [
        f"model.path={model}", "model.max_model_len=2048", f"runs_dir={tmp / 'runs'}", "run_name=soak",
        f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", "tracking.system_metrics=false",
        f"iterations={args.iterations}", "rollout.games_per_iteration=4", "rollout.concurrency=8",
        "rollout.kv_cache_gib=1", "rollout.probe_tolerance=0.5", "buffer.snapshot_every=1",
        "learner.micro_batch_tokens=4096", "learner.lr=1e-3", "checkpoint.every=10", "checkpoint.keep=2",
        *args.overrides])

    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    startup = time.perf_counter() - t0
    worker, learner = trainer.workers[0], trainer.learners[0]
    pids = {"worker": int(launcher.node_of(worker)["pid"]), "learner": int(launcher.node_of(learner)["pid"]),
            "pool": int(launcher.node_of(trainer.pool)["pid"]), "driver": os.getpid()}
    served_root = trainer.run_dir / "served-adapters"
    series: dict[str, list[float]] = {k: [] for k in ("worker", "engine", "learner", "pool", "driver", "loaded",
                                                       "engine_served", "engine_retiring", "dirs", "pool_versions",
                                                       "pool_mb", "seconds", "engine_anon", "engine_file",
                                                       "engine_shmem")}
    log(f"started in {startup:.0f} s; pids {pids}")
    status = "FAILED"
    t_loop = time.perf_counter()
    try:
        for m in trainer.iterations():
            worker_pid = int(launcher.node_of(worker)["pid"])  # a restarted worker has a new pid
            engine = ray.get(worker.__ray_call__.remote(_engine_view))
            pool = ray.get(trainer.pool.__ray_call__.remote(_pool_view))
            row = {
                "worker": rss_mb(worker_pid), "engine": rss_mb(worker_pid, descendants=True),
                "learner": rss_mb(pids["learner"]) + rss_mb(pids["learner"], descendants=True),
                "pool": rss_mb(pids["pool"]), "driver": rss_mb(pids["driver"]),
                "loaded": len(ray.get(worker.adapters.remote())), "engine_served": engine["served"],
                "engine_retiring": engine["retiring"],
                "dirs": sum(1 for _ in served_root.rglob("adapter_model.safetensors")),
                "pool_versions": pool["versions"], "pool_mb": pool["bytes"] / MB,
                "seconds": m["seconds/iteration"],
                **{f"engine_{k}": v for k, v in rss_parts_mb(worker_pid, descendants=True).items()},
            }
            for k, v in row.items():
                series[k].append(float(v))
            log(f"it {m['iteration']}: " + " ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                                    for k, v in row.items()))
        status = "FINISHED"
    finally:
        loop_seconds = time.perf_counter() - t_loop
        trainer.tracker.finish(status)
        trainer.close()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    n = len(series["seconds"])
    out = {
        "name": "soak",
        "iterations": n,
        "worker_rss_growth_mb_per_iteration": round(slope(series["worker"]), 3),
        "engine_rss_growth_mb_per_iteration": round(slope(series["engine"]), 3),
        "engine_rss_growth_mb_per_iteration_by_kind": {k: round(slope(series[f"engine_{k}"]), 3)
                                                       for k in ("anon", "file", "shmem")},
        "learner_rss_growth_mb_per_iteration": round(slope(series["learner"]), 3),
        "pool_rss_growth_mb_per_iteration": round(slope(series["pool"]), 3),
        "driver_rss_growth_mb_per_iteration": round(slope(series["driver"]), 3),
        "max_loaded_adapters": int(max(series["loaded"])),
        "resident_max": cfg.buffer.resident_max,
        "max_engine_served_adapters": int(max(series["engine_served"])),
        "max_engine_retiring_adapters": int(max(series["engine_retiring"])),
        "max_adapter_dirs": int(max(series["dirs"])),
        "pool_versions_final": int(series["pool_versions"][-1]),
        "pool_adapter_mb_final": round(series["pool_mb"][-1], 3),
        "rss_mb_first": {k: round(series[k][0], 1) for k in ("worker", "engine", "learner", "pool", "driver")},
        "rss_mb_last": {k: round(series[k][-1], 1) for k in ("worker", "engine", "learner", "pool", "driver")},
        "engine_rss_mb_first_by_kind": {k: round(series[f"engine_{k}"][0], 1) for k in ("anon", "file", "shmem")},
        "engine_rss_mb_last_by_kind": {k: round(series[f"engine_{k}"][-1], 1) for k in ("anon", "file", "shmem")},
        "seconds_per_iteration": round(loop_seconds / max(1, n), 3),
        "seconds_startup": round(startup, 1),
        "model": "tiny" if args.model is None else str(args.model),
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
