"""The opponent pool: snapshot cadence, resident subsampling, pairing frequencies, Elo, checkpoints."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from actors.adapters import AdapterError, AdapterVersion
from actors.pool import OpponentPool, entry_key
from actors.trajectories import SeatTrajectory, to_batch


def version(v: int, name: str = "learner") -> AdapterVersion:
    data = f"weights {name} {v}".encode()
    return AdapterVersion(name, v, hashlib.sha256(data).hexdigest(), data, {"r": 8})


def trained(pool: OpponentPool, iterations: int) -> OpponentPool:
    for it in range(iterations):
        pool.set_current(version(it), it)
    return pool


def test_snapshot_cadence_and_resident_subsample() -> None:
    pool = OpponentPool(snapshot_every=10, max_resident=3, seed=1)
    froze = [pool.set_current(version(it), it) for it in range(61)]
    assert [it for it, f in enumerate(froze) if f] == [10, 20, 30, 40, 50, 60]  # never at it = 0
    assert pool.snapshots == [f"learner@v{k}" for k in (10, 20, 30, 40, 50, 60)]
    res = pool.resident(61)
    assert len(res) == 3 and set(res) <= set(pool.snapshots) and res == pool.resident(61)
    seen = {k for it in range(200) for k in pool.resident(it)}
    assert seen == set(pool.snapshots)  # every snapshot gets its turn
    keys = [v.key for v in pool.versions(61)]
    assert keys == list(dict.fromkeys(["learner@v60", *res]))  # what a worker must hold
    assert OpponentPool(use_buffer=False).set_current(version(10), 10) is False


def test_pairing_frequencies_and_seats() -> None:
    pool = trained(OpponentPool(snapshot_every=10, max_resident=28, p_buffer=0.5, seed=0), 32)
    groups = list(range(4000))
    pairs = pool.pairings(32, groups)
    assert pairs == pool.pairings(32, groups)  # deterministic
    assert pairs != pool.pairings(33, groups)
    assert all(p.learner_seat == g % 2 for p, g in zip(pairs, groups, strict=True))
    for p in pairs:
        learner, other = p.seats[p.learner_seat], p.seats[1 - p.learner_seat]
        assert learner.trainable and learner.adapter == "learner@v31" and not other.trainable
        assert other.adapter == p.opponent
    counts = {k: sum(p.opponent == k for p in pairs) / len(pairs) for k in ["learner@v31", *pool.snapshots]}
    assert pool.snapshots == ["learner@v10", "learner@v20", "learner@v30"]
    assert abs(counts["learner@v31"] - 0.5) < 0.03  # a frozen copy of the current adapter
    assert all(abs(counts[k] - 0.5 / 3) < 0.03 for k in pool.snapshots)  # uniform over the buffer


def test_pairings_without_buffer_are_self_play_and_with_scripted_entries() -> None:
    pool = trained(OpponentPool(use_buffer=False), 25)
    for p in pool.pairings(25, [0, 1, 2]):
        assert p.seats[0] == p.seats[1] and p.seats[0].trainable and p.seats[0].adapter == "learner@v24"
    pool = trained(OpponentPool(p_buffer=1.0), 5)  # no snapshot yet: the frozen current copy
    assert {p.opponent for p in pool.pairings(5, range(50))} == {"learner@v4"}
    pool.add_scripted("tit_for_tat", in_buffer=True)
    pool.add_api("gpt", in_buffer=False)
    pairs = pool.pairings(6, range(50))
    assert {p.opponent for p in pairs} == {"tit_for_tat"}
    seat = pairs[0].seats[1]
    assert (seat.kind, seat.policy, seat.adapter, seat.trainable) == ("scripted", "tit_for_tat", None, False)
    assert pool.entries["gpt"].player().kind == "api"
    with pytest.raises(ValueError, match="no current adapter"):
        OpponentPool().pairings(0, [0])


def test_elo_updates() -> None:
    pool = OpponentPool(elo_k=16.0)
    pool.add_scripted("always_defect")
    pool.add_scripted("always_cooperate")
    pool.record([("always_defect", "always_cooperate", 50.0, 0.0)])
    r = pool.ratings()
    assert r["always_defect"] == pytest.approx(1008.0) and r["always_cooperate"] == pytest.approx(992.0)
    assert pool.expected("always_defect", "always_cooperate") > 0.5
    pool.record([("always_defect", "always_cooperate", 10.0, 10.0)])  # a draw pulls them together
    assert pool.ratings()["always_defect"] < 1008.0
    pool.record([("x@v1", "x@v1", 1.0, 0.0)])  # self-play: no information
    assert "x@v1" not in pool.entries
    for _ in range(200):
        pool.record([("always_defect", "always_cooperate", 50.0, 0.0)])
    assert pool.ratings()["always_defect"] - pool.ratings()["always_cooperate"] > 400


def test_elo_from_a_trajectory_batch() -> None:
    pool = trained(OpponentPool(), 3)
    pool.add_scripted("always_defect")
    rows = []
    for gid in range(4):
        a = _row(gid, 0, "learner", 2, [3.0] * 2)
        b = _row(gid, 1, "always_defect", -1, [5.0] * 2)
        rows += [a, b]
    pool.record_batch(to_batch(rows))
    assert pool.entries["always_defect"].games == 4 and pool.ratings()["always_defect"] > 1000
    assert pool.ratings()["learner@v2"] < 1000 and entry_key("always_defect", -1) == "always_defect"


def _row(gid: int, seat: int, policy: str, v: int, rewards: list[float]) -> SeatTrajectory:
    t = SeatTrajectory("r", 0, gid, gid, "ipd", 0, seat, policy, v, "x", -1, False, 1.0)
    t.rewards, t.actions = rewards, ["C"] * len(rewards)
    return t


def test_state_round_trip() -> None:
    pool = trained(OpponentPool(snapshot_every=5, max_resident=2, seed=3), 23)
    pool.add_scripted("tit_for_tat", in_buffer=True)
    pool.record([("learner@v20", "tit_for_tat", 3.0, 1.0)])
    state = json.loads(json.dumps(pool.state_dict()))  # JSON-serialisable
    adapters = pool.adapters()
    assert set(adapters) == {"learner@v22", "learner@v5", "learner@v10", "learner@v15", "learner@v20"}
    restored = OpponentPool.from_state_dict(state, adapters)
    assert restored.state_dict() == pool.state_dict()
    assert restored.pairings(24, range(64)) == pool.pairings(24, range(64))
    assert [v.key for v in restored.versions()] == [v.key for v in pool.versions()]
    bad = dict(adapters)
    bad["learner@v5"] = version(5, "other")
    bad["learner@v5"] = AdapterVersion("learner", 5, bad["learner@v5"].sha256, bad["learner@v5"].data, {})
    with pytest.raises(AdapterError, match="does not match"):
        OpponentPool.from_state_dict(state, bad)
    with pytest.raises(AdapterError, match="needs adapter"):
        OpponentPool.from_state_dict(state, {})
    with pytest.raises(ValueError, match="differs"):
        OpponentPool(seed=4).load_state_dict(state, adapters)
    assert np.isfinite(list(restored.ratings().values())).all()


def test_fixed_opponent_takes_every_game_and_survives_a_checkpoint() -> None:
    pool = trained(OpponentPool(snapshot_every=2, max_resident=4, use_buffer=True, seed=0), 5)
    target = version(7, name="target")
    pool.set_fixed("adapter", "target", target)
    pool.set_current(version(5), 5)  # the learner moves on; the target stays served
    pairs = pool.pairings(5, list(range(40)))
    for g, p in enumerate(pairs):
        learner, other = p.seats[p.learner_seat], p.seats[1 - p.learner_seat]
        assert p.learner_seat == g % 2 and p.opponent == "target@v7"
        assert learner.trainable and learner.adapter == "learner@v5"
        assert not other.trainable and other.adapter == "target@v7"
    assert "target@v7" in [v.key for v in pool.versions(5)]

    state = json.loads(json.dumps(pool.state_dict()))
    restored = OpponentPool.from_state_dict(state, pool.adapters())
    assert restored.fixed == "target@v7" and restored.pairings(5, [0, 1]) == pool.pairings(5, [0, 1])
    with pytest.raises(AdapterError, match="target@v7"):
        OpponentPool.from_state_dict(state, {k: v for k, v in pool.adapters().items() if k != "target@v7"})

    scripted = trained(OpponentPool(use_buffer=False), 1)
    scripted.set_fixed("scripted", "tit_for_tat")
    assert {p.opponent for p in scripted.pairings(0, [0, 1, 2])} == {"tit_for_tat"}
    assert all(p.seats[1 - p.learner_seat].kind == "scripted" for p in scripted.pairings(0, [0, 1, 2]))
