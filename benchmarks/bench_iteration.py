"""Time per training iteration split by phase, for configs/smoke.yaml (SmolLM2 on CPU).

Prints one JSON object: mean seconds per phase over the iterations after the first (warm-up),
and `overhead_ratio`, the share of an iteration spent outside generation (the worker's match
time) and learner compute (forward/backward + optimizer step): planning, adapter sync, transfer,
tensor building, export, publish and probe, logging. Target < 0.10.

    python benchmarks/bench_iteration.py [--iterations 3] [key.sub=value ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    from reciprocity.config import load_config
    from reciprocity.train import run

    tmp = Path(tempfile.mkdtemp(prefix="bench-iteration-"))
    cfg = load_config(ROOT / "configs/smoke.yaml", [
        f"iterations={args.iterations}", f"runs_dir={tmp}", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
        "checkpoint.every=0", "run_name=bench", *args.overrides])
    t0 = time.perf_counter()
    history = run(cfg)
    wall = time.perf_counter() - t0
    warm = history[1:] or history

    def mean(key: str) -> float:
        return float(np.mean([h.get(key, 0.0) for h in warm]))

    iteration = mean("seconds/iteration")
    generation = mean("rollout/worker_seconds_max")
    compute = mean("learner/time_forward_backward_s") + mean("learner/time_step_s")
    out = {
        "name": "iteration",
        "config": "configs/smoke.yaml",
        "iterations": len(history),
        "games_per_iteration": cfg.rollout.games_per_iteration,
        "seconds_iteration": iteration,
        "seconds_rollout": mean("seconds/rollout"),
        "seconds_generation": generation,
        "seconds_transfer": mean("seconds/transfer"),
        "seconds_learn": mean("seconds/learn"),
        "seconds_learner_compute": compute,
        "seconds_to_tensors": mean("learner/time_to_tensors_s"),
        "seconds_publish": mean("seconds/publish"),
        "generated_tokens": mean("generated_tokens"),
        "rollout_tokens_per_s": mean("rollout/tokens_per_s"),
        "learner_tokens_per_s": mean("learner/tokens_per_s"),
        "overhead_ratio": (iteration - generation - compute) / iteration,
        "overhead_target_ratio": (iteration - generation - compute) / iteration / 0.10,
        "wall_seconds_total": wall,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
