"""MLflow tracking: where a training run's artifacts land for a sqlite store."""

from __future__ import annotations

from pathlib import Path

import pytest

from reciprocity.config import Config
from reciprocity.tracking import Tracker, artifacts_beside


def test_artifacts_beside_a_sqlite_store_only() -> None:
    assert artifacts_beside("sqlite:////data/runs/mlflow.db") == "/data/runs/mlartifacts"
    assert artifacts_beside("http://127.0.0.1:5000") is None


def test_training_run_artifacts_land_beside_the_database_not_in_the_cwd(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, cwd = tmp_path / "store", tmp_path / "cwd"
    store.mkdir()
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = Config.model_validate({"run_name": "t", "tracking": {"uri": f"sqlite:///{store / 'mlflow.db'}",
                                                               "experiment": "beside", "system_metrics": False}})
    tracker = Tracker(cfg)
    try:
        tracker.log_text("hello", "notes/hello.txt")
    finally:
        tracker.finish()
    written = list((store / "mlartifacts").rglob("hello.txt"))
    assert len(written) == 1 and written[0].read_text() == "hello"
    assert not (cwd / "mlruns").exists() and not any(cwd.iterdir())
