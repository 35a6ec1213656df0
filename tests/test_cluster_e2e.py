"""The training job on real Ray clusters on this machine: `ray start --head` + `ray job submit`,
and a two-node cluster whose rollout workers land on both nodes. Each test stops only the cluster it
started (never `ray stop`, which stops every Ray process of the machine, other people's included)."""

from __future__ import annotations

import os
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
    return env


def test_ray_job_submit_trains_and_logs_to_mlflow(tiny_model_dir: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    env = ray_env()
    gcs, dash = free_port(), free_port()
    # every port of the head chosen free (the job agent's default 52365 may be taken by a process of
    # an earlier test, and the job server then finds "No available agent")
    agent_ports = [f"--{flag}={free_port()}" for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                        "metrics-export-port", "runtime-env-agent-port",
                                                        "ray-client-server-port")]
    # its own temp dir names this cluster's processes: the test stops those and no other Ray of the machine
    temp_dir = tempfile.mkdtemp(prefix="ray-e2e-", dir="/tmp")
    start = [str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--num-cpus=2", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dash}", "--disable-usage-stats", "--include-dashboard=true", f"--temp-dir={temp_dir}",
             *agent_ports]
    try:
        subprocess.run(start, env=env, check=True, capture_output=True, timeout=180)
        overrides = tiny_overrides(tiny_model_dir, tmp_path, run_name="job")
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
        stopped = stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert stopped, "found no process of the test's cluster (its temp dir names none)"
    assert cluster_processes(temp_dir) == [], "a process of the test's cluster outlived its stop"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("reciprocity").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "cooperation_rate")] == [0, 1]
    assert client.get_metric_history(run.info.run_id, "version")[-1].value == 2


def test_two_node_cluster_spreads_rollout_workers(tiny_model_dir: Path, tmp_path: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from reciprocity.config import load_config
    from reciprocity.train import Trainer

    os.environ["RAY_AUTH_MODE"] = "disabled"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address)
        cfg = load_config(ROOT / "configs/smoke.yaml",
                          [*tiny_overrides(tiny_model_dir, tmp_path, run_name="two-node"), "rollout.workers=2",
                           "iterations=1", "checkpoint.every=0"])
        trainer = Trainer(cfg, address=cluster.address)
        try:
            metrics = trainer.step()
            worker_nodes = {trainer.nodes["rollout worker 0"], trainer.nodes["rollout worker 1"]}
            assert len(worker_nodes) == 2  # SPREAD: one worker per node
            assert metrics["games"] == 4 and metrics["version"] == 1
            for w in trainer.workers:  # both workers serve the new version, verified by the probe
                assert "learner@v1" in ray.get(w.adapters.remote())
        finally:
            trainer.tracker.finish()
            trainer.close()
    finally:
        ray.shutdown()
        cluster.shutdown()
