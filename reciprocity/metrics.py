"""Per-iteration figures from a trajectory table or its summary (actors.trajectories.summary): the
game's own metrics (envs.metrics) over the self-play games (buffer games excluded, as in the paper),
plus rollout counts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from actors.trajectories import list_offsets, list_values
from envs.metrics import GameRecord, summarize


def game_records(table: pa.Table) -> list[GameRecord]:
    """One record per game, from its seat-0 row (both rows of a game carry the same game info)."""
    seat = np.asarray(table.column("seat"))
    infos = table.column("info_json").to_pylist()
    return [GameRecord.from_game_info(json.loads(infos[i])) for i in np.flatnonzero(seat == 0)]


def self_play_mask(table: pa.Table) -> np.ndarray:
    """Rows of games where both seats are the same policy version (not a buffer snapshot)."""
    same_name = np.asarray(table.column("policy_name")) == np.asarray(table.column("opponent_name"))
    same_version = np.asarray(table.column("policy_version")) == np.asarray(table.column("opponent_version"))
    return same_name & same_version


def _mean_pair(pair: Sequence[float | None]) -> float | None:
    vals = [v for v in pair if v is not None]
    return float(np.mean(vals)) if vals else None


def side_returns(table: pa.Table) -> dict[str, float]:
    """Return per round of the trained seats (`learner_return_per_round`) and, over all games, of the
    frozen seats facing them (`opponent_return_per_round`: buffer snapshots or a fixed opponent)."""
    trainable = np.asarray(table.column("trainable"), dtype=bool)
    rewards = list_values(table.column("rewards")).astype(np.float64)
    offsets = list_offsets(table.column("rewards"))
    rounds = np.diff(offsets)
    totals = np.bincount(np.repeat(np.arange(table.num_rows), rounds), weights=rewards, minlength=table.num_rows)
    out: dict[str, float] = {}
    for name, mask in (("learner", trainable), ("opponent", ~trainable)):
        if mask.any() and rounds[mask].sum():
            out[f"{name}_return_per_round"] = float(totals[mask].sum() / rounds[mask].sum())
    return out


def iteration_metrics(table: pa.Table, game: str) -> dict[str, Any]:
    """Flat metric dict for MLflow and the progress line."""
    out: dict[str, Any] = {}
    sp = table.filter(pa.array(self_play_mask(table)))
    records = game_records(sp if sp.num_rows else table)
    summary = summarize(game, records)
    for key, value in summary.items():
        if isinstance(value, list):
            for seat, v in zip(("alice", "bob"), value, strict=True):
                if v is not None:
                    out[f"{key}/{seat}"] = v
            mean = _mean_pair(value)
            if mean is not None:
                out[key] = mean
        elif value is not None:
            out[key] = value
    out.update(side_returns(table))
    out["games"] = int(table.num_rows // 2)
    out["self_play_games"] = int(sp.num_rows // 2)
    if "generated_tokens" in table.schema.names:  # a rollout summary (actors.trajectories.summary)
        out["generated_tokens"] = int(np.asarray(table.column("generated_tokens"), dtype=np.int64).sum())
        lens = np.asarray(table.column("chat_tokens"), dtype=np.int64)
    else:
        out["generated_tokens"] = int((list_values(table.column("token_round")) >= 0).sum())
        lens = np.diff(list_offsets(table.column("token_ids")))
    out["chat_tokens_mean"] = float(lens[lens > 0].mean()) if (lens > 0).any() else 0.0
    decisions = int(np.asarray(table.column("n_decisions")).sum())
    out["decisions"] = decisions
    if decisions:
        out["invalid_rate_rollout"] = float(np.asarray(table.column("n_invalid")).sum()) / decisions
        out["resample_rate"] = float(np.asarray(table.column("n_resampled")).sum()) / decisions
    guided = list_values(table.column("guided"))
    if guided.size:
        out["guided_rate"] = float(np.mean(guided))
    return out
