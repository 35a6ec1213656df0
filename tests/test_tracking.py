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


def test_the_training_experiment_opens_in_mlflows_training_view(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow 3's UI picks its views from the experiment tag `mlflow.experimentKind` (untagged, it
    guessed a GenAI experiment and listed the run under "Evaluation runs")."""
    from mlflow.tracking import MlflowClient

    from reciprocity.evaluation_report import EvaluationRun

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    old = client.create_experiment("older")  # made before the mark existed: marked when next used
    for name in ("fresh", "older"):
        cfg = Config.model_validate({"run_name": "t", "tracking": {"uri": uri, "experiment": name,
                                                                   "system_metrics": False}})
        tracker = Tracker(cfg)
        tracker.finish()
        tags = client.get_experiment(tracker.experiment_id).tags
        assert tags["mlflow.experimentKind"] == "custom_model_development", name
    assert tracker.experiment_id == old
    client.set_experiment_tag(old, "mlflow.experimentKind", "finetuning")  # a kind chosen by hand is kept
    cfg = Config.model_validate({"tracking": {"uri": uri, "experiment": "evaluations", "system_metrics": False}})
    ev = EvaluationRun(cfg, None, "ipd")
    assert client.get_experiment(client.get_run(ev.run_id).info.experiment_id).tags[
        "mlflow.experimentKind"] == "custom_model_development"
    Tracker(Config.model_validate({"tracking": {"uri": uri, "experiment": "older", "system_metrics": False}})).finish()
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "finetuning"
