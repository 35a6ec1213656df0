"""Start-up time of a training run: `Trainer(cfg)` (placement, pool, rollout workers with their vLLM
engines, learner ranks with DeepSpeed, version 0 exported and loaded) for configs/smoke.yaml on the
real model, with the engines booting while the learner starts (the default) and one after the other
(the previous order, emulated by not telling the workers to boot early: their engines then start in
`wait_ready`, after the learner). The two orders alternate, `--rounds` times each, on one local Ray.

Prints one JSON object: the seconds of each start per order, their means, and
`overlapped_over_sequential_ratio`.

    python benchmarks/bench_startup.py [--rounds 2] [key.sub=value ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def sequential_create(cls: Any, actor_cls: Any, options: Any, configs: Any, max_restarts: int) -> Any:
    """WorkerGroup.create without the early `start_engine`: each engine boots in `wait_ready`."""
    return cls([actor_cls.options(**o).remote(c) for o, c in zip(options, configs, strict=True)], max_restarts)


def start_once(overrides: list[str], sequential: bool) -> float:
    from actors.worker_group import WorkerGroup
    from reciprocity.config import load_config
    from reciprocity.train import Trainer

    tmp = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    cfg = load_config(ROOT / "configs/smoke.yaml", [
        f"runs_dir={tmp}", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", "tracking.system_metrics=false",
        "run_name=bench", *overrides])
    create = WorkerGroup.__dict__["create"]
    if sequential:
        WorkerGroup.create = classmethod(sequential_create)  # type: ignore[method-assign]
    try:
        t0 = time.perf_counter()
        trainer = Trainer(cfg)
        seconds = time.perf_counter() - t0
    finally:
        WorkerGroup.create = create  # type: ignore[method-assign]
    trainer.tracker.finish("FINISHED")
    trainer.close()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    from reciprocity import launcher

    launcher.init_ray(None)  # one Ray for every start: its own start-up is not what is compared
    seconds: dict[str, list[float]] = {"sequential": [], "overlapped": []}
    for _ in range(args.rounds):
        for order in ("sequential", "overlapped"):
            seconds[order].append(start_once(list(args.overrides), sequential=order == "sequential"))
    mean = {k: sum(v) / len(v) for k, v in seconds.items()}
    ratio = mean["overlapped"] / mean["sequential"]
    print(json.dumps({"name": "startup", "config": "configs/smoke.yaml", "seconds": seconds,
                      "mean_seconds": mean, "overlapped_over_sequential_ratio": ratio}))


if __name__ == "__main__":
    main()
