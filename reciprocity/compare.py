"""`reciprocity compare`: several training runs side by side, from their MLflow histories.

One PNG with a panel per figure (the run's self-play figures and its periodic evaluation against
scripted opponents, one line per run) and a JSON/Markdown table of each run's last value per figure,
its iterations and its wall-clock. This is how the method comparison of `sysdesign/results.md` is
drawn: the numbers come from MLflow, never from the logs.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from reciprocity.report import plot_comparison

History = Mapping[str, Sequence[tuple[int, float]]]

FIGURES: dict[str, tuple[str, ...]] = {
    "ipd": ("cooperation_rate", "p_coop_given_opp_coop", "p_coop_given_opp_defect", "return_per_round",
            "eval/always_defect/p_coop_given_opp_defect", "eval/tit_for_tat/cooperation_rate",
            "eval/always_cooperate/cooperation_rate", "eval/always_defect/return_per_round"),
    "split_nocomm": ("efficiency", "welfare_per_round", "fairness", "return_per_round",
                     "eval/greedy/return_per_round", "eval/greedy/opponent_return_per_round",
                     "eval/welfare_maximising/return_per_round", "eval/welfare_maximising/fairness"),
    "trust_and_split": ("efficiency", "welfare_per_round", "fairness", "return_per_round", "honest_claim_rate",
                        "mean_message_chars", "eval/always_claim_10/return_per_round",
                        "eval/always_claim_10/opponent_return_per_round", "eval/truthful/return_per_round",
                        "eval/truthful/opponent_return_per_round"),
}


def last_values(history: History) -> dict[str, float | None]:
    """The value at the highest step of each figure (None when the run never logged it)."""
    return {k: (max(v)[1] if v else None) for k, v in history.items()}


def markdown_table(rows: Mapping[str, Mapping[str, Any]], figures: Sequence[str]) -> str:
    """One row per run: iterations, minutes, then the last value of each figure (3 decimals, '-' if none)."""
    head = ["run", "iterations", "minutes", *figures]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in rows.items():
        cells = [name, str(row["iterations"]), f"{row['minutes']:.1f}"]
        cells += ["-" if row["last"].get(f) is None else f"{row['last'][f]:.3f}" for f in figures]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fetch(run_ids: Sequence[str], uri: str) -> tuple[dict[str, dict[str, Any]], str]:
    """The runs' game, and each run's histories of that game's FIGURES, iterations and wall-clock
    from MLflow. Runs are labelled by their run name (with the id prefix when two share a name);
    runs of different games are refused (ValueError)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = [client.get_run(rid) for rid in run_ids]
    games = {run.data.params.get("game.name", "ipd") for run in found}
    if len(games) > 1:
        raise ValueError(f"the runs played different games: {sorted(games)}")
    game = games.pop()
    runs: dict[str, dict[str, Any]] = {}
    for run in found:
        rid = run.info.run_id
        name = run.info.run_name or rid
        if name in runs:
            name = f"{name} ({rid[:8]})"
        history = {f: [(m.step, m.value) for m in client.get_metric_history(rid, f)]
                   for f in FIGURES.get(game, FIGURES["ipd"])}
        # iterations: the steps of the per-iteration figures (an `eval/` figure has its cadence's only)
        steps = {step for f, points in history.items() if not f.startswith("eval/") for step, _ in points}
        end = run.info.end_time or run.info.start_time
        runs[name] = {"run_id": rid, "history": history, "iterations": len(steps),
                      "minutes": (end - run.info.start_time) / 60000.0, "last": last_values(history)}
    return runs, game


def main(run_ids: Sequence[str], out: Path, uri: str) -> int:
    from mlflow.exceptions import MlflowException

    if not run_ids:
        print("error: no run ids given: reciprocity compare RUN_ID RUN_ID ...", file=sys.stderr)
        return 2
    try:
        runs, game = fetch(run_ids, uri)
    except (MlflowException, ValueError) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    figures = FIGURES.get(game, FIGURES["ipd"])
    out.mkdir(parents=True, exist_ok=True)
    plot_comparison({name: r["history"] for name, r in runs.items()}, figures, out / "comparison.png",
                    title=f"{game}: " + ", ".join(runs))
    table = markdown_table(runs, figures)
    (out / "comparison.md").write_text(table + "\n")
    summary = {name: {k: r[k] for k in ("run_id", "iterations", "minutes", "last")} | {"history": r["history"]}
               for name, r in runs.items()}
    (out / "comparison.json").write_text(json.dumps(summary, indent=1))
    print(table)
    print(f"\nwrote {out / 'comparison.png'}, comparison.md, comparison.json")
    return 0
