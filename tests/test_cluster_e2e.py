"""The training job on a real two-node Ray cluster on this machine: `ray start --head`, a second node
joined with `ray start --address`, `ray job submit`; the rollout workers land on both nodes. The test
stops only the cluster it started (never `ray stop`, which stops every Ray process of the machine,
other people's included). One cluster and one job for all of it: each start costs minutes on CPU."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from support import cluster_processes, free_port, stop_cluster, tiny_overrides

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def ray_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PATH=f"{BIN}:{env.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    env.pop("MKL_CBWR", None)  # the nodes' own environment lacks it: the job's runtime env must bring it
    return env


def _agent_ports() -> list[str]:
    """Every port of a node's agents chosen free (the job agent's default 52365 may be taken by a
    process of an earlier test, and the job server then finds "No available agent"; two nodes on one
    machine must not share them)."""
    return [f"--{flag}={free_port()}" for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                  "metrics-export-port", "runtime-env-agent-port")]


def _placement(log: str) -> dict[str, str]:
    """actor -> node id (its 12 first characters) from the placement table the driver prints."""
    found = {}
    for line in log.splitlines():
        m = re.search(r"((?:rollout worker|learner rank) \d+)\W+[\d.]+\W+([0-9a-f]{12})\W", line)
        if m:
            found[m.group(1)] = m.group(2)
    return found


def test_ray_job_submit_on_two_nodes_trains_spreads_workers_and_logs_to_mlflow(tiny_model_dir: Path,
                                                                               tmp_path: Path) -> None:
    """`ray start --head`, a second node joined with `ray start --address`, then `ray job submit` of a
    2-iteration run with two rollout workers: the job succeeds, its workers land one on each node
    (SPREAD), both serve every published version (the driver stops the run if a worker's probe of a
    new version fails), and the run is in MLflow."""
    from mlflow.tracking import MlflowClient

    env = ray_env()
    gcs, dash = free_port(), free_port()
    # the temp dirs name this cluster's processes: the test stops those and no other Ray of the
    # machine. Each node has its own, as two machines would: nodes sharing one would share the
    # unpacked job working dir, and one node's runtime-env agent deletes it under the other's driver
    temp_dirs = [tempfile.mkdtemp(prefix="ray-e2e-", dir="/tmp") for _ in range(2)]
    head = [str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--num-cpus=2", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}", "--disable-usage-stats", "--include-dashboard=true",
            f"--temp-dir={temp_dirs[0]}", f"--ray-client-server-port={free_port()}", *_agent_ports()]
    second = [str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs}", "--num-cpus=2", "--disable-usage-stats",
              f"--temp-dir={temp_dirs[1]}", *_agent_ports()]
    try:
        subprocess.run(head, env=env, check=True, capture_output=True, timeout=180)
        subprocess.run(second, env=env, check=True, capture_output=True, timeout=180)
        overrides = [*tiny_overrides(tiny_model_dir, tmp_path, run_name="job"), "rollout.workers=2"]
        cmd = [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(ROOT),
               "--", "python", "-m", "reciprocity", "train", "--config", "configs/smoke.yaml", *overrides]
        t0 = time.time()
        for _ in range(30):  # the head's job agent may still be starting on a loaded machine
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            log = out.stdout + out.stderr
            if "No available agent to submit job" not in log:
                break
            time.sleep(2)
        assert "succeeded" in log, log[-4000:]
        assert time.time() - t0 < 900
    finally:
        stopped = [stop_cluster(d) for d in reversed(temp_dirs)]  # the second node first, then the head
        for d in temp_dirs:
            shutil.rmtree(d, ignore_errors=True)
    assert all(stopped), "found no process of a node of the test's cluster (its temp dir names none)"
    assert [cluster_processes(d) for d in temp_dirs] == [[], []], "a process of the test's cluster outlived its stop"
    placement = _placement(log)
    assert set(placement) == {"rollout worker 0", "rollout worker 1", "learner rank 0"}, log[-4000:]
    assert placement["rollout worker 0"] != placement["rollout worker 1"]  # SPREAD: one worker per node
    strict = {m.group(1) for line in log.splitlines()
              if (m := re.search(r"((?:rollout worker|learner rank) \d+)\W.*\Wstrict\W", line))}
    assert strict == set(placement), log[-4000:]  # MKL's reproducible mode on both nodes' actors
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("reciprocity").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "cooperation_rate")] == [0, 1]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "games")] == [4, 4]
    assert client.get_metric_history(run.info.run_id, "version")[-1].value == 2
    assert all(m.value <= 0.5 for m in client.get_metric_history(run.info.run_id, "probe_error"))
