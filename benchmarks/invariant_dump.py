"""The invariant of a refactor ("a refactor changes no number"): a fixed-seed 3-iteration run on the
tiny model (2 rollout workers, the agent buffer on, a snapshot and a checkpoint every iteration,
one resident snapshot) dumped as JSON: per checkpoint the iteration and version counters, the pool
state, every adapter's sha256 and fidelity probe, a hash of the learner's weights and DeepSpeed's
step count; then every metric of the MLflow run except timings.

Run it on the commit before the change and on the change, then compare the two dumps byte for byte:

    python benchmarks/invariant_dump.py runs/invariant/before   # on the old commit
    python benchmarks/invariant_dump.py runs/invariant/after    # on the change
    cmp runs/invariant/before/dump.json runs/invariant/after/dump.json

Config overrides after the directory (`key.sub=value ...`) compare two settings on one commit.

About 5 minutes on 2 idle cores. Issue 14's data-path change and actor groups were checked this way.
Not a benchmark (`make bench` runs `bench_*.py` only).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = ("seconds/", "rollout/tokens_per_s", "rollout/worker_seconds", "system/", "recovery/")


def main(out: Path, extra: list[str]) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from mlflow.tracking import MlflowClient
    from support import tiny_overrides

    from reciprocity import checkpoint
    from reciprocity.models import build_tiny

    out = out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    tiny = out / "tiny-llama"
    if not tiny.exists():
        build_tiny(ROOT / "models/smollm2-135m-instruct", tiny)
    overrides = [*tiny_overrides(tiny, out, "ref"), "iterations=3", "checkpoint.every=1", "checkpoint.keep=4",
                 "rollout.workers=2", "buffer.resident_max=1", "rollout.cpus_per_worker=0.5",
                 "learner.cpus_per_rank=0.5", *extra]
    if not (out / "runs/ref/checkpoints/it-000003").exists():
        with (out / "train.log").open("w") as f:
            rc = subprocess.run([sys.executable, "-m", "reciprocity", "train", "--config", "configs/smoke.yaml",
                                 *overrides], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise SystemExit(f"the run failed ({rc}): {out / 'train.log'}")
    dump: dict[str, object] = {}
    for ckpt in sorted((out / "runs/ref/checkpoints").glob("it-*")):
        state = json.loads((ckpt / "state.json").read_text())
        pool, adapters = checkpoint.load_pool(ckpt)
        learner = torch.load(ckpt / "learner/state/mp_rank_00_model_states.pt", map_location="cpu",
                             weights_only=False)
        h = hashlib.sha256()
        for k in sorted(learner["module"]):
            h.update(k.encode())
            h.update(learner["module"][k].float().numpy().tobytes())
        dump[ckpt.name] = {
            "iteration": state["iteration"], "version": state["version"], "pool": pool,
            "adapters": {k: v.sha256 for k, v in sorted(adapters.items())},
            "probes": {k: None if v.probe is None else list(v.probe.logprobs) for k, v in sorted(adapters.items())},
            "learner_module": h.hexdigest(), "global_steps": learner["global_steps"],
        }
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("reciprocity").experiment_id])[0]
    dump["metrics"] = {
        key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        for key in sorted(run.data.metrics)
        if not (key.startswith(SKIP) or "seconds" in key or "time_" in key or "tokens_per_s" in key)
    }
    (out / "dump.json").write_text(json.dumps(dump, indent=1, sort_keys=True))
    print(json.dumps({"dump": str(out / "dump.json"), "metrics": len(dump["metrics"]),  # type: ignore[arg-type]
                      "checkpoints": [k for k in dump if k.startswith("it-")]}))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/invariant/dump"), sys.argv[2:])
