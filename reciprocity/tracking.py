"""MLflow tracking: one parent run per training run, metrics per iteration, artifacts.

The tracking URI is always explicit (MLflow's default store is relative to the working directory,
which under `ray job submit` is a temporary copy): `tracking.uri` from the config, else
`$MLFLOW_TRACKING_URI`, else an absolute `sqlite:///<runs dir>/mlflow.db`.

Nothing secret reaches MLflow: params are the config's redacted flat view, and tags and text
artifacts (the config YAML) go through `actors.redact.redact_text` (API keys from the environment,
credentials in URLs, bearer tokens).
"""

from __future__ import annotations

import math
import os
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from actors.redact import redact_text
from reciprocity.config import Config

MAX_PARAMS_PER_BATCH = 100
# The experiment tag MLflow 3's UI reads to choose its views: "custom_model_development" opens the
# experiment as model training (runs with metric charts), not as a GenAI app (traces, evaluation runs).
EXPERIMENT_KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"


def tracking_uri(cfg: Config) -> str:
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    runs = Path(cfg.runs_dir).absolute()
    runs.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{runs / 'mlflow.db'}"


def artifacts_beside(uri: str) -> str | None:
    """Artifact root of a new experiment: for a sqlite store, `mlartifacts/` beside the database
    (MLflow's default would be ./mlruns of whatever the working directory is); else the server's."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri.removeprefix("sqlite:///")).absolute().parent / "mlartifacts")
    return None


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def training_experiment(client: MlflowClient, name: str, uri: str) -> str:
    """The id of experiment `name`, created if needed, marked as a training experiment (an older
    one without the mark gets it; a kind someone chose by hand is kept)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, artifact_location=artifacts_beside(uri),
                                        tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})
    if EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    return exp.experiment_id


class Tracker:
    """Wraps one MLflow run (created, or re-opened on resume)."""

    def __init__(self, cfg: Config, run_id: str | None = None, tags: Mapping[str, str] | None = None) -> None:
        self.uri = tracking_uri(cfg)
        os.environ["MLFLOW_TRACKING_URI"] = self.uri  # Ray actors and child processes inherit it
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        exp_id = training_experiment(self.client, cfg.tracking.experiment, self.uri)
        if run_id is None:
            run = mlflow.start_run(experiment_id=exp_id, run_name=cfg.run_name,
                                   log_system_metrics=cfg.tracking.system_metrics)
            self.run_id = run.info.run_id
            params = [Param(k, v[:6000]) for k, v in cfg.flat().items()]
            for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
                self.client.log_batch(self.run_id, params=params[i:i + MAX_PARAMS_PER_BATCH])
            all_tags = {"git_commit": git_commit(), **(tags or {})}
            for k, v in all_tags.items():
                self.set_tag(k, v)
        else:
            mlflow.start_run(run_id=run_id, log_system_metrics=cfg.tracking.system_metrics)
            self.run_id = run_id
        self.experiment_id = exp_id

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        now = int(time.time() * 1000)
        rows = [Metric(k, float(v), now, step) for k, v in metrics.items()
                if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))]
        for i in range(0, len(rows), 1000):
            self.client.log_batch(self.run_id, metrics=rows[i:i + 1000])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(path), artifact_path)

    def history(self, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
        """(step, value) per metric key, over the whole run (a resumed run included)."""
        return {k: [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, k)] for k in keys}

    def log_text(self, text: str, name: str) -> None:
        """A text artifact (e.g. the config YAML), secrets redacted."""
        self.client.log_text(self.run_id, redact_text(text), name)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, redact_text(value))

    def finish(self, status: str = "FINISHED") -> None:
        mlflow.end_run(status=status)
