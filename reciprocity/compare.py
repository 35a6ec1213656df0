"""`reciprocity compare`: several training runs side by side, from their MLflow histories.

One PNG with a panel per figure (the run's self-play figures and its periodic evaluation against
scripted opponents, one line per run) and a JSON/Markdown table of each run's last value per figure,
its iterations and its wall-clock. Exploiter runs (their config names an `opponent`) get the
exploiter's and its target's return per round and the exploiter's gain beyond its target. This is
how the method comparison of `sysdesign/results.md` is drawn: the numbers come from MLflow, never
from the logs.
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

# Exploiter runs (`opponent` set): the exploiter's return and its frozen target's, per iteration, and
# the exploiter's gain beyond its target (their difference, at the steps that have both).
GAIN = "exploiter_gain_per_round"
EXPLOIT_FIGURES: dict[str, tuple[str, ...]] = {
    "ipd": ("learner_return_per_round", "opponent_return_per_round", GAIN, "cooperation_rate"),
    "split_nocomm": ("learner_return_per_round", "opponent_return_per_round", GAIN, "efficiency", "fairness"),
    "trust_and_split": ("learner_return_per_round", "opponent_return_per_round", GAIN, "efficiency", "fairness"),
}


def figures_of(game: str, exploit: bool) -> tuple[str, ...]:
    table = EXPLOIT_FIGURES if exploit else FIGURES
    return table.get(game, table["ipd"])


def with_gain(history: dict[str, list[tuple[int, float]]]) -> dict[str, list[tuple[int, float]]]:
    """`history` plus GAIN: learner minus opponent return per round, at each step both were logged."""
    mine = dict(history.get("learner_return_per_round", []))
    theirs = dict(history.get("opponent_return_per_round", []))
    return history | {GAIN: [(step, mine[step] - theirs[step]) for step in sorted(mine) if step in theirs]}


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
    exploit = {run.data.params.get("opponent", "None") not in ("None", "") for run in found}
    if len(exploit) > 1:
        raise ValueError("exploiter runs (with an `opponent`) and training runs cannot be compared in one table")
    exploit_runs = exploit.pop()
    runs: dict[str, dict[str, Any]] = {}
    for run in found:
        rid = run.info.run_id
        name = run.info.run_name or rid
        if name in runs:
            name = f"{name} ({rid[:8]})"
        history = {f: [(m.step, m.value) for m in client.get_metric_history(rid, f)]
                   for f in figures_of(game, exploit_runs) if f != GAIN}
        if exploit_runs:
            history = with_gain(history)
        # iterations: the steps of the per-iteration figures (an `eval/` figure has its cadence's only)
        steps = {step for f, points in history.items() if not f.startswith("eval/") for step, _ in points}
        end = run.info.end_time or run.info.start_time
        runs[name] = {"run_id": rid, "history": history, "iterations": len(steps),
                      "minutes": (end - run.info.start_time) / 60000.0, "last": last_values(history),
                      "opponent": run.data.params.get("opponent") if exploit_runs else None}
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
    figures = figures_of(game, any(r["opponent"] for r in runs.values()))
    out.mkdir(parents=True, exist_ok=True)
    plot_comparison({name: r["history"] for name, r in runs.items()}, figures, out / "comparison.png",
                    title=f"{game}: " + ", ".join(runs))
    table = markdown_table(runs, figures)
    (out / "comparison.md").write_text(table + "\n")
    keys = ("run_id", "iterations", "minutes", "last", "opponent")
    summary = {name: {k: r[k] for k in keys} | {"history": r["history"]} for name, r in runs.items()}
    (out / "comparison.json").write_text(json.dumps(summary, indent=1))
    print(table)
    print(f"\nwrote {out / 'comparison.png'}, comparison.md, comparison.json")
    return 0
