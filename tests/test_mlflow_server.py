"""The multi-node tracking setup end to end on one machine: a real `mlflow server` (the command the
cluster's head runs, see ray_cluster.yaml) on a free loopback port, reciprocity's Tracker logging
to its http URI, and everything read back through the server's REST API -- what a researcher sees
through the port-forward."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from reciprocity.config import Config, Tracking

# About 20 s on an idle 2-core machine (the server imports MLflow twice and creates its tables);
# the timeouts leave room for a busy one.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

START_TIMEOUT_S = 45.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate the server and the workers it spawned (its own process group), then reap it."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):  # a uvicorn worker may outlive the parent briefly
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(http URI, artifacts dir) of a fresh server on 127.0.0.1; always stopped afterwards."""
    port = free_port()
    artifacts = tmp_path / "artifacts"
    log = (tmp_path / "mlflow-server.log").open("wb")
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
           "--artifacts-destination", str(artifacts), "--workers", "1"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # No GenAI job runner (huey consumers and a /dev/shm queue dir per start): faster, nothing left.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, cwd=tmp_path, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n"
                            f"{(tmp_path / 'mlflow-server.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer /health within {START_TIMEOUT_S:.0f}s:\n"
                            f"{(tmp_path / 'mlflow-server.log').read_text()[-3000:]}")
            time.sleep(0.25)
        yield base, artifacts
    finally:
        stop(proc)
        log.close()


def test_tracker_logs_to_server_and_rest_api_reads_back(
        mlflow_server: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from reciprocity.tracking import Tracker

    base, artifacts = mlflow_server
    # Tracker exports MLFLOW_TRACKING_URI and sets MLflow's global URI: undo both afterwards.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", base)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # MLflow's client honours proxy variables
    cfg = Config(run_name="cluster-smoke", runs_dir=str(tmp_path / "runs"),
                 tracking=Tracking(uri=base, experiment="cluster-smoke", system_metrics=False))
    expected = {step: {"loss": 1.0 / (step + 1), "reward/mean": 0.5 * step - 1.0} for step in range(3)}
    report = tmp_path / "summary.txt"
    report.write_text("cooperation rate 0.42\n")

    with _use_tracking_uri(base):
        tracker = Tracker(cfg)
        try:
            assert tracker.uri == base
            for step, metrics in expected.items():
                tracker.log_metrics({**metrics, "skipped_nan": float("nan"), "skipped_flag": True}, step)
            tracker.log_artifact(report, "reports")
        finally:
            tracker.finish()
            if mlflow.active_run() is not None:
                mlflow.end_run()
    run_id = tracker.run_id

    api = f"{base}/api/2.0/mlflow"
    with httpx.Client(timeout=10, trust_env=False) as http:
        for key in ("loss", "reward/mean"):
            r = http.get(f"{api}/metrics/get-history", params={"run_id": run_id, "metric_key": key})
            r.raise_for_status()
            history = sorted(r.json()["metrics"], key=lambda m: m["step"])
            assert [m["step"] for m in history] == [0, 1, 2], history
            assert [m["value"] for m in history] == pytest.approx([expected[s][key] for s in range(3)])
        r = http.get(f"{api}/metrics/get-history", params={"run_id": run_id, "metric_key": "skipped_nan"})
        r.raise_for_status()
        assert not r.json().get("metrics"), "non-finite values must not be logged"

        run = http.get(f"{api}/runs/get", params={"run_id": run_id}).raise_for_status().json()["run"]
        assert run["info"]["status"] == "FINISHED"
        assert run["info"]["run_name"] == "cluster-smoke"
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert params["method.name"] == "aa" and params["tracking.uri"] == base
        assert "git_commit" in {t["key"] for t in run["data"]["tags"]}

        # The artifact went through the server's proxy into --artifacts-destination.
        listing = http.get(f"{api}/artifacts/list", params={"run_id": run_id, "path": "reports"})
        files = {f["path"]: f for f in listing.raise_for_status().json()["files"]}
        assert "reports/summary.txt" in files and not files["reports/summary.txt"]["is_dir"]
        artifact_uri = run["info"]["artifact_uri"]
        assert artifact_uri.startswith("mlflow-artifacts:/"), artifact_uri
        rel = artifact_uri.removeprefix("mlflow-artifacts:").lstrip("/")
        content = http.get(f"{base}/api/2.0/mlflow-artifacts/artifacts/{rel}/reports/summary.txt")
        assert content.raise_for_status().text == "cooperation rate 0.42\n"
    on_disk = list(artifacts.rglob("summary.txt"))
    assert len(on_disk) == 1 and run_id in on_disk[0].parts
