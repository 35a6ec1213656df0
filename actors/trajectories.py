"""The trajectory batch: one Arrow row per (game, seat).

This is the contract between the rollout side (which builds batches) and the learner (which
reads them). Both seats of a game pair by ``game_id``. Scripted and API seats carry rewards and
actions but empty token lists.

Token layout of a row: ``token_ids`` is the whole chat of that seat (prompt tokens and generated
tokens interleaved, exactly as the engine saw and produced them). ``logprobs`` and
``token_round`` are aligned with it: ``token_round`` is -1 for prompt (non-generated) tokens and
the round index for generated tokens; ``logprobs`` is the engine's sampling log-prob for
generated tokens and 0 for prompt tokens. ``token_version`` is the adapter version that
generated each token (-1 for prompt tokens), so that an asynchronous learner knows how stale a
token is.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

SCHEMA = pa.schema(
    [
        pa.field("run", pa.string()),
        pa.field("iteration", pa.int32()),
        pa.field("game_id", pa.int64()),
        pa.field("group_id", pa.int64()),
        pa.field("env", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("seat", pa.int8()),  # 0 = alice, 1 = bob
        pa.field("policy_name", pa.string()),
        pa.field("policy_version", pa.int32()),  # -1 for scripted / api / base
        pa.field("opponent_name", pa.string()),
        pa.field("opponent_version", pa.int32()),
        pa.field("trainable", pa.bool_()),
        pa.field("token_ids", pa.list_(pa.int32())),
        pa.field("logprobs", pa.list_(pa.float32())),
        pa.field("token_round", pa.list_(pa.int8())),
        pa.field("token_version", pa.list_(pa.int32())),
        pa.field("guided", pa.list_(pa.bool_())),  # per decision, in order: was the accepted sample guided
        pa.field("decision_regex", pa.list_(pa.string())),  # per decision: its guided regex ("" if unguided)
        pa.field("rewards", pa.list_(pa.float32())),  # per round
        pa.field("actions", pa.list_(pa.string())),  # canonical parsed action per round
        pa.field("info_json", pa.string()),  # game-level structured info (values, hands, ...)
        pa.field("n_invalid", pa.int32()),  # decisions still invalid after the guided resample
        pa.field("n_resampled", pa.int32()),  # decisions that needed a resample
        pa.field("n_decisions", pa.int32()),
        pa.field("temperature", pa.float32()),
    ]
)

SEATS = ("alice", "bob")


class SchemaError(ValueError):
    """A trajectory batch does not match :data:`SCHEMA`."""


@dataclass
class SeatTrajectory:
    """One seat's side of one game, filled by the match runner."""

    run: str
    iteration: int
    game_id: int
    group_id: int
    env: str
    seed: int
    seat: int
    policy_name: str
    policy_version: int
    opponent_name: str
    opponent_version: int
    trainable: bool
    temperature: float
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    token_round: list[int] = field(default_factory=list)
    token_version: list[int] = field(default_factory=list)
    guided: list[bool] = field(default_factory=list)
    decision_regex: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    info_json: str = "{}"
    n_invalid: int = 0
    n_resampled: int = 0
    n_decisions: int = 0

    def add_prompt(self, ids: Sequence[int]) -> None:
        self.token_ids.extend(ids)
        self.logprobs.extend([0.0] * len(ids))
        self.token_round.extend([-1] * len(ids))
        self.token_version.extend([-1] * len(ids))

    def add_generated(self, ids: Sequence[int], logprobs: Sequence[float], round_: int, version: int) -> None:
        if len(ids) != len(logprobs):
            raise ValueError(f"{len(ids)} generated ids but {len(logprobs)} log-probs")
        self.token_ids.extend(ids)
        self.logprobs.extend(logprobs)
        self.token_round.extend([round_] * len(ids))
        self.token_version.extend([version] * len(ids))

    def row(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in SCHEMA.names}


def to_batch(rows: Iterable[SeatTrajectory]) -> pa.RecordBatch:
    """Build a validated record batch from seat trajectories."""
    batch = pa.RecordBatch.from_pylist([r.row() for r in rows], schema=SCHEMA)
    validate(batch)
    return batch


def concat(batches: Sequence[pa.RecordBatch | pa.Table]) -> pa.Table:
    tables = [b if isinstance(b, pa.Table) else pa.Table.from_batches([b]) for b in batches]
    if not tables:
        return SCHEMA.empty_table()
    return pa.concat_tables(tables)


TOKEN_COLUMNS = ("token_ids", "logprobs", "token_round", "token_version", "decision_regex")


def summary(batch: pa.RecordBatch | pa.Table) -> pa.RecordBatch:
    """The small part of a trajectory batch that the driver and the pool need (game ids, seats,
    policies, rewards, actions, game info, counts) for the metrics and the Elo ratings: the token
    columns are dropped; `chat_tokens` (tokens of the chat) and `generated_tokens` (of them,
    generated) take their place. A few hundred bytes per row, whatever the chat length."""
    if isinstance(batch, pa.Table):
        batch = batch.combine_chunks().to_batches()[0] if batch.num_rows else pa.RecordBatch.from_pylist([],
                                                                                                     schema=SCHEMA)
    chat = np.diff(_offsets(batch.column("token_ids"))).astype(np.int32)
    rounds = _values(batch.column("token_round"))
    row_of = np.repeat(np.arange(batch.num_rows), np.diff(_offsets(batch.column("token_round"))))
    generated = np.bincount(row_of[rounds >= 0], minlength=batch.num_rows).astype(np.int32)
    keep = [n for n in batch.schema.names if n not in TOKEN_COLUMNS]
    return pa.RecordBatch.from_arrays([*(batch.column(n) for n in keep), pa.array(chat), pa.array(generated)],
                                      names=[*keep, "chat_tokens", "generated_tokens"])


def concat_summaries(summaries: Sequence[pa.RecordBatch | pa.Table]) -> pa.Table:
    tables = [b if isinstance(b, pa.Table) else pa.Table.from_batches([b]) for b in summaries]
    return pa.concat_tables(tables) if tables else summary(SCHEMA.empty_table())


def validate(batch: pa.RecordBatch | pa.Table) -> None:
    """Raise :class:`SchemaError` naming the first problem found."""
    missing = [n for n in SCHEMA.names if n not in batch.schema.names]
    if missing:
        raise SchemaError(f"trajectory batch lacks column(s) {missing}")
    for f in SCHEMA:
        got = batch.schema.field(f.name).type
        if got != f.type:
            raise SchemaError(f"trajectory column {f.name!r} has type {got}, expected {f.type}")
    if batch.num_rows == 0:
        return
    lens = {
        n: np.diff(_offsets(batch.column(n)))
        for n in ("token_ids", "logprobs", "token_round", "token_version")
    }
    for n in ("logprobs", "token_round", "token_version"):
        if not np.array_equal(lens[n], lens["token_ids"]):
            row = int(np.flatnonzero(lens[n] != lens["token_ids"])[0])
            raise SchemaError(f"row {row}: column {n!r} is not aligned with token_ids")
    n_rounds = np.diff(_offsets(batch.column("rewards")))
    n_actions = np.diff(_offsets(batch.column("actions")))
    if not np.array_equal(n_rounds, n_actions):
        row = int(np.flatnonzero(n_rounds != n_actions)[0])
        raise SchemaError(f"row {row}: {n_rounds[row]} rewards but {n_actions[row]} actions")
    n_guided = np.diff(_offsets(batch.column("guided")))
    if not np.array_equal(n_guided, np.diff(_offsets(batch.column("decision_regex")))):
        raise SchemaError("guided and decision_regex are not aligned (one of each per decision)")
    token_round = _values(batch.column("token_round"))
    if token_round.size:
        ends = np.repeat(n_rounds, lens["token_round"])
        if (token_round >= ends).any() or (token_round < -1).any():
            raise SchemaError("token_round holds a round outside [-1, n_rounds)")
    seats = np.asarray(batch.column("seat"))
    if not np.isin(seats, (0, 1)).all():
        raise SchemaError("seat must be 0 (alice) or 1 (bob)")


def _chunks(col: pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    return list(col.chunks) if isinstance(col, pa.ChunkedArray) else [col]


def _offsets(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Row offsets of a list column, concatenated over chunks (starting at 0)."""
    parts, base = [np.zeros(1, dtype=np.int64)], 0
    for c in _chunks(col):
        off = np.asarray(c.offsets, dtype=np.int64)
        parts.append(off[1:] - off[0] + base)
        base = int(parts[-1][-1]) if len(parts[-1]) else base
    return np.concatenate(parts)


def _values(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Flat values of a list column as numpy (zero-copy where Arrow allows)."""
    arrays = [np.asarray(c.flatten()) for c in _chunks(col)]
    return np.concatenate(arrays) if arrays else np.zeros(0)


list_offsets = _offsets
list_values = _values
