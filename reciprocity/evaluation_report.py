"""What an evaluation leaves behind: evaluation.json, heatmap.png (the return matrix), an MLflow run
with metrics and both files as artifacts, and the table `reciprocity evaluate` prints.

The MLflow run is created with the client, not the fluent API: in the training driver the parent
run is the process's active run, and `mlflow.start_run(nested=True)` would re-bind global state.
Nesting is what the fluent API records too: the `mlflow.parentRunId` tag, in the parent's experiment.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from reciprocity.config import Config

PAIR_FIGURES = ("return_per_round", "cooperation_rate", "invalid_rate")
SHARED_FIGURES = ("efficiency", "welfare_per_round")


def metric_name(*parts: str) -> str:
    """MLflow accepts letters, digits, _ - . / and spaces: anything else becomes _."""
    return "/".join(re.sub(r"[^\w.\-]", "_", p) for p in parts)


def metrics(result: dict[str, Any]) -> dict[str, float]:
    """Flat metrics: per agent its exploitability and mean return; per ordered pair its figures."""
    out: dict[str, float] = {}
    for name, e in result["exploitability"].items():
        out[metric_name("exploitability", name)] = e["loss"]
        if "loss_vs_exploiter" in e:
            out[metric_name("exploitability_vs_exploiter", name)] = e["loss_vs_exploiter"]
    for name, value in result["mean_return_per_round"].items():
        out[metric_name("mean_return_per_round", name)] = value
    for pair in result["pairs"]:
        alice, bob = pair["agents"]
        prefix = f"{alice}_vs_{bob}"
        for key in PAIR_FIGURES:
            for seat, value in zip(("alice", "bob"), pair[key], strict=True):
                if value is not None:
                    out[metric_name("pair", prefix, key, seat)] = float(value)
        for key in SHARED_FIGURES:
            if pair.get(key) is not None:
                out[metric_name("pair", prefix, key)] = float(pair[key])
    return out


def heatmap(result: dict[str, Any], path: Path) -> Path:
    """The return matrix as a heatmap: row agent's mean return per round against the column agent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [a["name"] for a in result["agents"]]
    m = np.asarray(result["return_matrix"])
    size = 1.2 + 0.9 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(m, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=40, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("opponent (column)")
    ax.set_ylabel("agent (row)")
    for i in range(len(names)):
        for j in range(len(names)):
            colour = "black" if m[i, j] > m.min() + 0.6 * (np.ptp(m) or 1) else "white"
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", color=colour, fontsize=9)
    fig.colorbar(im, ax=ax, label="mean return per round")
    ax.set_title(f"{result['game']}: row's return per round vs column\n"
                 f"{result['games']} games per seat order, temperature {result['temperature']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class EvaluationRun:
    """The MLflow run of one evaluation: a child of `parent_run` (the `mlflow.parentRunId` tag, in
    the parent's experiment), else a top-level run in the config's experiment."""

    def __init__(self, cfg: Config, parent_run: str | None, game: str) -> None:
        from mlflow.tracking import MlflowClient

        from reciprocity.tracking import git_commit, tracking_uri, training_experiment

        self.client = MlflowClient(tracking_uri(cfg))
        tags = {"reciprocity.kind": "evaluation", "git_commit": git_commit()}
        if parent_run:
            experiment_id = self.client.get_run(parent_run).info.experiment_id
            tags["mlflow.parentRunId"] = parent_run
        else:
            experiment_id = training_experiment(self.client, cfg.tracking.experiment, self.client.tracking_uri)
        self.run_id: str = self.client.create_run(experiment_id, tags=tags, run_name=f"evaluate-{game}").info.run_id

    def finish(self, result: dict[str, Any], files: dict[str, Path]) -> None:
        """Params, metrics (`metrics(result)`) and the files as artifacts; the run ends FINISHED."""
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        rows = [Metric(k, v, now, 0) for k, v in metrics(result).items()]
        params = [
            Param("game", result["game"]),
            Param("games", str(result["games"])),
            Param("seed", str(result["seed"])),
            Param("temperature", str(result["temperature"])),
            Param("agents", json.dumps([a["spec"] for a in result["agents"]])[:6000]),
            Param("options", json.dumps(result["options"])[:6000]),
        ]
        self.client.log_batch(self.run_id, params=params)
        for i in range(0, len(rows), 1000):
            self.client.log_batch(self.run_id, metrics=rows[i : i + 1000])
        for path in files.values():
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self) -> None:
        self.client.set_terminated(self.run_id, "FAILED")


def open_run(cfg: Config, parent_run: str | None, game: str) -> EvaluationRun:
    return EvaluationRun(cfg, parent_run, game)


def write(result: dict[str, Any], out: Path) -> dict[str, Path]:
    """evaluation.json and heatmap.png under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "evaluation.json", "heatmap": out / "heatmap.png"}
    heatmap(result, files["heatmap"])
    files["json"].write_text(json.dumps({**result, "files": {k: str(v) for k, v in files.items()}}, indent=1))
    return files


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def print_result(result: dict[str, Any]) -> None:
    """The return matrix with each agent's exploitability, as a table."""
    from rich.console import Console
    from rich.table import Table

    names = [a["name"] for a in result["agents"]]
    table = Table(title=f"{result['game']}: row's mean return per round vs column "
                        f"({result['games']} games per seat order, seed {result['seed']})")
    table.add_column("agent")
    for name in names:
        table.add_column(name, justify="right")
    table.add_column("exploitability", justify="right")
    table.add_column("best responder")
    if result["exploiter"]:
        table.add_column(f"loss vs {result['exploiter']}", justify="right")
    for name, row in zip(names, result["return_matrix"], strict=True):
        e = result["exploitability"][name]
        extra = [_fmt(e["loss_vs_exploiter"])] if result["exploiter"] else []
        table.add_row(name, *map(_fmt, row), _fmt(e["loss"]), e["best_responder"], *extra)
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    console.print(table)
    files = result.get("files", {})
    if files:
        console.print(f"wrote {files['json']} and {files['heatmap']}")
    if result.get("mlflow_run_id"):
        console.print(f"MLflow run {result['mlflow_run_id']}")
