"""Do the thread layouts train the same agent? configs/smoke.yaml (SmolLM2, 3 iterations) for seeds
0, 42 and 1337, once in the previous layout (one thread per phase: `learner.threads=1
rollout.engine_threads=1`) and once in the default (every core in every phase), then every
per-iteration metric of the six MLflow runs side by side.

Bitwise equality across thread counts is not promised: torch splits a matmul's reduction among its
threads, so sums round differently in the last bits; a sampled token can then differ, and from
there the games. What must hold is that the layouts agree within the noise of the seeds: per
metric, the mean over seeds of (default - previous) against the spread of the seeds themselves.

    python benchmarks/thread_agreement.py [--seeds 0 42 1337] [--out runs/threads] [--previous KEY=VALUE ...]

`--previous` puts other overrides in the previous layout's place, e.g. the memory settings before
session 16 (`learner.allocator=glibc rollout.allocator=glibc learner.gradient_checkpointing=0.5`), where
the threads are the same and every number must be bitwise equal.

About 6 minutes a run on 2 idle cores (36 in all). Prints one JSON object (last line): per metric
and iteration the values of both layouts per seed, `bitwise_equal`, and `mean_difference` against
`seed_std` (the standard deviation over seeds of the previous layout's values). Not a benchmark
(`make bench` runs `bench_*.py` only).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {"previous": ["learner.threads=1", "rollout.engine_threads=1"], "default": []}
METRICS = ("cooperation_rate", "p_coop_given_opp_coop", "p_coop_given_opp_defect", "return_per_round",
           "learner/loss", "learner/grad_norm", "learner/entropy", "learner/logp_abs_diff", "probe_error",
           "invalid_rate")


def train(out: Path, layout: str, seed: int, layouts: dict[str, list[str]]) -> None:
    name = f"{layout}-{seed}"
    if (out / "runs" / name / "checkpoints" / "it-000003").exists():
        return  # done before (the script resumes where it stopped)
    with (out / f"{name}.log").open("w") as f:
        rc = subprocess.run(
            [sys.executable, "-m", "reciprocity", "train", "--config", "configs/smoke.yaml", f"seed={seed}",
             f"run_name={name}", f"runs_dir={out / 'runs'}", f"tracking.uri=sqlite:///{out / 'mlflow.db'}",
             "tracking.experiment=threads", *layouts[layout]],
            cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"run {name} failed ({rc}): {out / f'{name}.log'}")


def histories(out: Path) -> dict[str, dict[str, dict[int, float]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("threads")
    runs = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'")
    return {run.info.run_name: {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
                                for key in METRICS if key in run.data.metrics}
            for run in runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 42, 1337])
    ap.add_argument("--out", type=Path, default=ROOT / "runs/threads")
    ap.add_argument("--previous", nargs="+", metavar="KEY=VALUE", help="the previous layout's overrides")
    args = ap.parse_args()
    layouts = {**LAYOUTS, "previous": args.previous} if args.previous else LAYOUTS
    out = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for layout in layouts:
            train(out, layout, seed, layouts)
    runs = histories(out)
    report: dict[str, Any] = {}
    for key in METRICS:
        steps = sorted({s for run in runs.values() for s in run.get(key, {})})
        for step in steps:
            values = {layout: [runs.get(f"{layout}-{seed}", {}).get(key, {}).get(step, np.nan) for seed in args.seeds]
                      for layout in layouts}
            prev, new = np.array(values["previous"]), np.array(values["default"])
            report[f"{key}@{step}"] = {
                **values, "bitwise_equal": bool(np.array_equal(prev, new)),
                "mean_difference": float(np.nanmean(new - prev)), "seed_std": float(np.nanstd(prev, ddof=1)),
            }
    print(json.dumps({"name": "thread_agreement", "seeds": args.seeds, "layouts": layouts, "metrics": report}))


if __name__ == "__main__":
    main()
