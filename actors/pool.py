"""The opponent pool: the agent buffer of past adapters (spec section 5), the other entries that can
take a seat (scripted strategies, API models, the base model), and an Elo rating per entry.

- Snapshots: every `snapshot_every` iterations (it > 0) the current adapter is frozen into the
  buffer; snapshots are kept for good (the paper), or, with `max_snapshots`, the oldest snapshot
  is retired once there are more: it leaves the buffer (never drawn again) but keeps its entry and
  rating, and its bytes are no longer kept by the run.
- By reference: the pool holds `AdapterRef`s (key, version, sha256, size, the store path of the
  bytes), never adapter bytes, so its memory does not grow with the adapter size; the bytes live
  once in the run's `AdapterStore` and each worker reads the resident ones it lacks.
- Resident: each iteration at most `max_resident` snapshots are served (a uniform subsample when
  more exist), drawn from (seed, iteration) alone, so any process computes the same set.
- Pairings (`pairings`): per game, the learner takes seat `group_id mod 2`; with the buffer, the
  other seat is with probability `p_buffer` a uniformly drawn resident snapshot (or buffer-listed
  scripted/API entry), else a frozen copy of the current adapter (same version, not trained): one
  trained trajectory per game. Without the buffer: self-play, both seats trained.
- Fixed opponent (`set_fixed`, exploiter training): every game pairs the learner with one frozen
  entry (an adapter version, a scripted strategy, an API model or the base model), buffer or not.
- Elo: `record` updates ratings from match results (score 1/0.5/0 by comparing the two seats'
  returns); self-play games carry no information and are skipped.
- Determinism: every draw uses a generator seeded by (seed, iteration, purpose), never a shared
  stream, so results do not depend on call order and survive a restart.
- Checkpoints: `state_dict()` is JSON-serialisable (metadata, sha256 sums, ratings); the adapter
  references are `adapters()` (saved by the caller) and are checked against the sums on load.
- Elo from summaries: `record_batch` reads five columns; the driver hands it the rollout's small
  summary (`actors.trajectories.summary`), never the token columns.

`OpponentPool` is plain Python; the driver makes it a Ray actor (reciprocity/launcher.py).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from actors.adapters import AdapterError, AdapterRef, AdapterVersion
from actors.worker import PlayerSpec

ENTRY_KINDS = ("adapter", "scripted", "api", "base")
Version = AdapterRef | AdapterVersion  # a reference (the training run), or the bytes (tests, tools)


def entry_key(policy: str, version: int) -> str:
    """The key of a (policy, version): AdapterVersion.key for versioned adapters, else the name."""
    return f"{policy}@v{version}" if version >= 0 else policy


@dataclass
class PoolEntry:
    key: str
    kind: str  # "adapter" | "scripted" | "api" | "base"
    policy: str
    version: int = -1
    sha256: str | None = None
    frozen_at: int | None = None  # the iteration an adapter snapshot was frozen at
    in_buffer: bool = False  # drawn as a buffer opponent (snapshots: always)
    rating: float = 1000.0
    games: int = 0

    def player(self, trainable: bool = False) -> PlayerSpec:
        if self.kind == "adapter":
            return PlayerSpec("llm", self.policy, self.version, adapter=self.key, trainable=trainable)
        if self.kind == "base":
            return PlayerSpec("llm", self.policy, -1, adapter=None, trainable=False)
        return PlayerSpec(self.kind, self.policy)


@dataclass(frozen=True)
class Pairing:
    """The two seats of one game and which of them is the learner's."""

    seats: tuple[PlayerSpec, PlayerSpec]
    learner_seat: int
    opponent: str  # the opponent's entry key


class OpponentPool:
    def __init__(
        self,
        snapshot_every: int = 10,
        max_resident: int = 28,
        p_buffer: float = 0.5,
        use_buffer: bool = True,
        seed: int = 0,
        elo_k: float = 16.0,
        initial_rating: float = 1000.0,
        max_snapshots: int | None = None,
    ) -> None:
        if snapshot_every < 1 or max_resident < 0 or not 0.0 <= p_buffer <= 1.0:
            raise ValueError("need snapshot_every >= 1, max_resident >= 0 and 0 <= p_buffer <= 1")
        if max_snapshots is not None and max_snapshots < 1:
            raise ValueError("max_snapshots must be None (keep all) or >= 1")
        self.max_snapshots = max_snapshots
        self.snapshot_every, self.max_resident, self.p_buffer = snapshot_every, max_resident, p_buffer
        self.use_buffer, self.seed, self.elo_k, self.initial_rating = use_buffer, seed, elo_k, initial_rating
        self.entries: dict[str, PoolEntry] = {}
        self.snapshots: list[str] = []  # keys, in freezing order
        self.current: str | None = None
        self.fixed: str | None = None  # the one opponent of every game (exploiter training)
        self.iteration = 0  # of the last set_current
        self._versions: dict[str, Version] = {}  # current + snapshots (+ the fixed adapter): references

    def config(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "snapshot_every": self.snapshot_every,
            "max_resident": self.max_resident,
            "p_buffer": self.p_buffer,
            "use_buffer": self.use_buffer,
            "seed": self.seed,
            "elo_k": self.elo_k,
            "initial_rating": self.initial_rating,
        }
        if self.max_snapshots is not None:  # absent by default: states saved before it existed compare equal
            out["max_snapshots"] = self.max_snapshots
        return out

    # -- entries -------------------------------------------------------------------------------
    def _entry(self, key: str, kind: str, policy: str, version: int = -1, **kw: Any) -> PoolEntry:
        if kind not in ENTRY_KINDS:
            raise ValueError(f"unknown entry kind {kind!r}; valid: {', '.join(ENTRY_KINDS)}")
        if key not in self.entries:
            self.entries[key] = PoolEntry(key, kind, policy, version, rating=self.initial_rating, **kw)
        return self.entries[key]

    def add_scripted(self, name: str, in_buffer: bool = False) -> PoolEntry:
        e = self._entry(name, "scripted", name)
        e.in_buffer = in_buffer
        return e

    def add_api(self, name: str, in_buffer: bool = False) -> PoolEntry:
        e = self._entry(name, "api", name)
        e.in_buffer = in_buffer
        return e

    def set_fixed(self, kind: str, policy: str, version: Version | None = None) -> PoolEntry:
        """Make one frozen entry the opponent of every game (adapter `version`, or a scripted /
        api / base entry named `policy`)."""
        if version is not None:
            _check(version)
            entry = self._entry(version.key, "adapter", version.name, version.version, sha256=version.sha256)
            self._versions[version.key] = version
        else:
            entry = self._entry(policy, kind, policy)
        self.fixed = entry.key
        return entry

    # -- adapters and the snapshot cadence -------------------------------------------------------
    def set_current(self, version: Version, iteration: int) -> bool:
        """Make `version` the learner's current adapter at `iteration`; freeze it into the buffer
        when the cadence says so (it > 0, it % snapshot_every == 0). Returns whether it froze.
        A new version starts from the rating of the previous current version."""
        _check(version)
        rating = self.entries[self.current].rating if self.current in self.entries else self.initial_rating
        new = version.key not in self.entries
        entry = self._entry(version.key, "adapter", version.name, version.version, sha256=version.sha256)
        if new:
            entry.rating = rating
        if (self.current is not None and self.current != version.key and self.current not in self.snapshots
                and self.current != self.fixed):
            self._versions.pop(self.current, None)
        self.current, self.iteration = version.key, iteration
        self._versions[version.key] = version
        if self.use_buffer and iteration > 0 and iteration % self.snapshot_every == 0:
            self.freeze(version, iteration)
            return True
        return False

    def freeze(self, version: Version, iteration: int) -> PoolEntry:
        """Put `version` into the buffer (idempotent); with `max_snapshots`, retire the oldest
        snapshot(s) beyond it (see the module doc)."""
        _check(version)
        entry = self._entry(version.key, "adapter", version.name, version.version, sha256=version.sha256)
        if entry.sha256 != version.sha256:
            raise AdapterError(f"{version.key}: a different adapter with this key is already in the pool")
        if version.key not in self.snapshots:
            entry.frozen_at, entry.in_buffer = iteration, True
            self.snapshots.append(version.key)
        self._versions[version.key] = version
        while self.max_snapshots is not None and len(self.snapshots) > self.max_snapshots:
            self.retire(self.snapshots[0])
        return entry

    def retire(self, key: str) -> None:
        """Take a snapshot out of the buffer: never drawn again; its entry and rating stay."""
        self.snapshots.remove(key)
        self.entries[key].in_buffer = False
        if key not in (self.current, self.fixed):
            self._versions.pop(key, None)

    def _rng(self, iteration: int, purpose: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, iteration, zlib.crc32(purpose.encode())])

    def resident(self, iteration: int) -> list[str]:
        """Snapshot keys served at `iteration`: all, or a uniform subsample of `max_resident`."""
        if len(self.snapshots) <= self.max_resident:
            return list(self.snapshots)
        pick = self._rng(iteration, "resident").choice(len(self.snapshots), self.max_resident, replace=False)
        return [self.snapshots[i] for i in sorted(pick)]

    def versions(self, iteration: int | None = None) -> list[Version]:
        """Adapter versions a worker must hold at `iteration` (default: that of the last
        set_current): the current one and the resident snapshots. The restart source of workers."""
        keys = [self.current] if self.current else []
        keys += self.resident(self.iteration if iteration is None else iteration)
        keys += [self.fixed] if self.fixed in self._versions else []
        return [self._versions[k] for k in dict.fromkeys(keys)]

    def adapters(self) -> dict[str, Version]:
        """The adapter versions a checkpoint must save (current and snapshots), by key."""
        return dict(self._versions)

    # -- pairings --------------------------------------------------------------------------------
    def buffer(self, iteration: int) -> list[str]:
        """Entries a buffer draw picks from: resident snapshots and buffer-listed other entries."""
        others = [k for k, e in self.entries.items() if e.in_buffer and e.kind != "adapter"]
        return self.resident(iteration) + others

    def pairings(self, iteration: int, group_ids: Sequence[int]) -> list[Pairing]:
        """One pairing per game (`group_ids[i]` is game i's group), deterministic in (seed, iteration)."""
        if self.current is None:
            raise ValueError("the pool has no current adapter: call set_current first")
        current = self.entries[self.current]
        if self.fixed is not None:
            fixed = self.entries[self.fixed].player(False)
            return [Pairing((current.player(True), fixed) if g % 2 == 0 else (fixed, current.player(True)),
                            int(g) % 2, self.fixed) for g in group_ids]
        rng = self._rng(iteration, "pairings")
        pool = self.buffer(iteration) if self.use_buffer else []
        out = []
        for g in group_ids:
            learner = int(g) % 2
            if not self.use_buffer:
                seats = (current.player(True), current.player(True))
                out.append(Pairing(seats, learner, current.key))
                continue
            draw, pick = rng.random(), rng.integers(max(len(pool), 1))
            opponent = self.entries[pool[pick]] if pool and draw < self.p_buffer else current
            pair = [current.player(True), opponent.player(False)]
            seats = (pair[0], pair[1]) if learner == 0 else (pair[1], pair[0])
            out.append(Pairing(seats, learner, opponent.key))
        return out

    # -- ratings ---------------------------------------------------------------------------------
    def expected(self, a: str, b: str) -> float:
        ra, rb = self.entries[a].rating, self.entries[b].rating
        return 1.0 / (1.0 + 10.0 ** ((rb - ra) / 400.0))

    def record(self, results: Iterable[tuple[str, str, float, float]]) -> None:
        """Update Elo from (key_a, key_b, return_a, return_b) per game, in order. Unknown keys get
        an entry (kind from the key: versioned -> adapter, else scripted)."""
        for a, b, ret_a, ret_b in results:
            if a == b:
                continue
            for key in (a, b):
                if key not in self.entries:
                    policy, _, v = key.partition("@v")
                    self._entry(key, "adapter" if v else "scripted", policy, int(v) if v else -1)
            score = 1.0 if ret_a > ret_b else 0.5 if ret_a == ret_b else 0.0
            delta = self.elo_k * (score - self.expected(a, b))
            self.entries[a].rating += delta
            self.entries[b].rating -= delta
            self.entries[a].games += 1
            self.entries[b].games += 1

    def record_batch(self, batch: pa.RecordBatch | pa.Table) -> None:
        """Update Elo from a trajectory batch or its summary (both seats of each game, paired by game id)."""
        rows = batch.select(["game_id", "seat", "policy_name", "policy_version", "rewards"]).to_pylist()
        games: dict[int, dict[int, dict]] = {}
        for r in rows:
            games.setdefault(r["game_id"], {})[r["seat"]] = r
        results = []
        for gid in sorted(games):
            pair = games[gid]
            if 0 in pair and 1 in pair:
                a, b = pair[0], pair[1]
                results.append(
                    (
                        entry_key(a["policy_name"], a["policy_version"]),
                        entry_key(b["policy_name"], b["policy_version"]),
                        float(sum(a["rewards"])),
                        float(sum(b["rewards"])),
                    )
                )
        self.record(results)

    def ratings(self) -> dict[str, float]:
        return {k: e.rating for k, e in self.entries.items()}

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.config(),
            "entries": [asdict(e) for e in self.entries.values()],
            "snapshots": list(self.snapshots),
            "current": self.current,
            "fixed": self.fixed,
            "iteration": self.iteration,
        }

    def load_state_dict(self, state: dict[str, Any], adapters: dict[str, Version]) -> None:
        """Restore from `state_dict()` and the saved adapter versions (checked against the sums).
        The pool's configuration is kept as constructed (it must match the checkpoint's)."""
        if state["config"] != self.config():
            raise ValueError(f"pool checkpoint config {state['config']} differs from this pool's {self.config()}")
        fixed = state.get("fixed")
        fixed_adapter = fixed is not None and state_entry_kind(state, fixed) == "adapter"
        need = [k for k in [state["current"], *state["snapshots"], fixed if fixed_adapter else None] if k]
        missing = [k for k in need if k not in adapters]
        if missing:
            raise AdapterError(f"pool checkpoint needs adapter(s) {missing}")
        entries = {e["key"]: PoolEntry(**e) for e in state["entries"]}
        for k in need:
            _check(adapters[k])
            if entries[k].sha256 != adapters[k].sha256:
                raise AdapterError(f"{k}: saved adapter does not match the pool's sha256")
        self.entries = entries
        self.snapshots = list(state["snapshots"])
        self.current = state["current"]
        self.fixed = fixed
        self.iteration = int(state.get("iteration", 0))
        self._versions = {k: adapters[k] for k in need}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], adapters: dict[str, Version]) -> OpponentPool:
        pool = cls(**state["config"])
        pool.load_state_dict(state, adapters)
        return pool


def _check(version: Version) -> None:
    """A version given with its bytes is checked against its sha256; a reference carries none."""
    if isinstance(version, AdapterVersion):
        version.check_sha()


def state_entry_kind(state: dict[str, Any], key: str) -> str | None:
    return next((e["kind"] for e in state["entries"] if e["key"] == key), None)

