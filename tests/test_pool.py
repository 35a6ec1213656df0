"""The opponent pool: snapshot cadence, resident subsampling, pairing frequencies, Elo, checkpoints."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

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


# -- by reference: the adapter store, refs in the pool, the bounded buffer, checkpoints ------------
def test_store_keeps_each_sha256_once_and_refs_carry_no_bytes(tmp_path) -> None:
    from actors.adapters import AdapterStore

    store = AdapterStore(tmp_path / "adapters")
    v = version(3)
    ref = store.put(v)
    again = store.put(AdapterVersion("other", 9, v.sha256, v.data, v.config))  # same bytes, another key
    assert [p.name for p in store.root.iterdir()] == [v.sha256] and again.uri == ref.uri
    assert (ref.key, ref.sha256, ref.size) == ("learner@v3", v.sha256, len(v.data))
    assert not any(isinstance(x, bytes) for x in vars(ref).values())
    assert ref.load() == v  # a worker's fetch: the bytes, checked against the sha256
    (Path(ref.uri) / "adapter_model.safetensors").write_bytes(b"X" * len(v.data))
    with pytest.raises(AdapterError, match="sha256 mismatch"):
        ref.load()
    store.put(version(4))
    assert store.collect({version(4).sha256}) == [v.sha256] and store.has(store.put(version(4)))


def test_served_copies_of_a_stored_version_share_its_file(tmp_path) -> None:
    """Workers on one node each write a served directory per version: for bytes read from the
    store it is a hard link to the store's file (one copy on disk), for other bytes a fresh file."""
    import dataclasses
    import pickle

    from actors.adapters import AdapterStore

    store = AdapterStore(tmp_path / "adapters")
    ref = store.put(version(5))
    stored = Path(ref.uri) / "adapter_model.safetensors"
    served = [ref.load().write(tmp_path / f"worker-{i}") / "adapter_model.safetensors" for i in range(3)]
    assert {f.stat().st_ino for f in served} == {stored.stat().st_ino} and stored.stat().st_nlink == 4
    assert all(f.read_bytes() == version(5).data for f in served)
    fresh = version(5).write(tmp_path / "worker-x") / "adapter_model.safetensors"  # not read from a store
    assert fresh.stat().st_ino != stored.stat().st_ino and fresh.read_bytes() == version(5).data
    other = version(6)  # other bytes that claim the store file as their origin are not linked to it
    copied = dataclasses.replace(other, origin=ref.uri).write(tmp_path / "worker-y") / "adapter_model.safetensors"
    assert copied.stat().st_ino != stored.stat().st_ino and copied.read_bytes() == other.data
    store.collect(set())  # the store lets go of the version: the served copies keep their bytes
    assert not stored.exists() and all(f.read_bytes() == version(5).data for f in served)
    bad = dataclasses.replace(version(5), data=b"X" * len(version(5).data))
    with pytest.raises(AdapterError, match="sha256 mismatch"):
        bad.write(tmp_path / "worker-z")
    good = version(7)
    good.check_sha()  # hashed once per object; a pickled copy (another process) hashes again
    assert not pickle.loads(pickle.dumps(good)).__dict__.get("_sha_checked") and good.__dict__["_sha_checked"]


def test_a_node_hashes_a_stored_version_once_and_still_rejects_a_rewrite(tmp_path, monkeypatch) -> None:
    """Workers on one node loading the same store file hash it once (the first records it); a
    rewrite of the file, another node, or a file written within the clock tick of the read (which a
    rewrite could not be told apart from) is hashed again, and corrupted bytes are rejected."""
    import os
    import time

    from actors import adapters
    from actors.adapters import AdapterStore

    hashed: list[int] = []
    real_sha256 = hashlib.sha256

    def counting(data: bytes = b"") -> object:
        hashed.append(len(data))
        return real_sha256(data)

    v = AdapterVersion("learner", 3, real_sha256(b"w" * 4096).hexdigest(), b"w" * 4096, {"r": 8})
    ref = AdapterStore(tmp_path / "adapters").put(v)
    file = Path(ref.uri) / "adapter_model.safetensors"
    monkeypatch.setattr(adapters.hashlib, "sha256", counting)

    assert ref.load() == v and ref.load() == v and len(hashed) == 2  # just written: racily clean, not recorded
    old = time.time_ns() - 10**9
    os.utime(file, ns=(old, old))  # as a file written a second before its first reader
    loads = [ref.load() for _ in range(4)]  # four workers on this node
    assert all(x == v for x in loads) and len(hashed) == 3
    monkeypatch.setattr(adapters.socket, "gethostname", lambda: "another-node")
    assert ref.load() == v and len(hashed) == 4  # another node hashes for itself
    monkeypatch.undo()
    monkeypatch.setattr(adapters.hashlib, "sha256", counting)
    file.write_bytes(b"X" * 4096)  # corrupted in place, same size and inode: a new mtime
    with pytest.raises(AdapterError, match="corrupted"):
        ref.load()
    os.utime(file, ns=(old, old))  # even with the recorded mtime put back, the bytes fail their hash
    with pytest.raises(AdapterError, match="corrupted"):
        ref.load()
    assert len(hashed) == 6


def test_pool_of_references_stays_small_with_many_snapshots(tmp_path) -> None:
    """300 snapshots of a 161 MB adapter: the pool holds metadata only (bounded whatever the count)."""
    import pickle

    from actors.adapters import AdapterRef

    def ref(v: int) -> AdapterRef:
        return AdapterRef("learner", v, hashlib.sha256(str(v).encode()).hexdigest(), 161_000_000,
                          str(tmp_path / str(v)), {"r": 32})

    pool = OpponentPool(snapshot_every=10, max_resident=28, seed=0)
    for it in range(3001):
        pool.set_current(ref(it), it)
    assert len(pool.snapshots) == 300 and len(pool.versions(3001)) == 29
    assert len(pickle.dumps(pool)) < 1_000_000  # ~150 B per version entry, not 161 MB per snapshot
    assert all(isinstance(v, AdapterRef) for v in pool.versions(3001))


def test_max_snapshots_retires_the_oldest() -> None:
    pool = OpponentPool(snapshot_every=2, max_resident=2, seed=0, max_snapshots=3)
    trained(pool, 13)  # snapshots at 2, 4, ..., 12
    assert pool.snapshots == ["learner@v8", "learner@v10", "learner@v12"]
    old = pool.entries["learner@v2"]
    assert not old.in_buffer and old.frozen_at == 2 and "learner@v2" not in pool.adapters()
    assert set(pool.adapters()) == {"learner@v8", "learner@v10", "learner@v12"}
    assert all(p.opponent not in ("learner@v2", "learner@v4", "learner@v6") for p in pool.pairings(13, range(64)))
    assert pool.config()["max_snapshots"] == 3 and "max_snapshots" not in OpponentPool().config()
    state = json.loads(json.dumps(pool.state_dict()))
    assert OpponentPool.from_state_dict(state, pool.adapters()).state_dict() == pool.state_dict()
    with pytest.raises(ValueError):
        OpponentPool(max_snapshots=0)


def test_checkpoints_share_the_adapter_bytes(tmp_path) -> None:
    """keep = 3 checkpoints of a pool cost the unique versions' bytes once; older checkpoints (bytes
    inside each checkpoint) still load."""
    from actors.adapters import AdapterStore
    from reciprocity import checkpoint

    run = tmp_path / "run"
    store = AdapterStore(checkpoint.adapter_store(run))
    big = [AdapterVersion("learner", v, hashlib.sha256(d).hexdigest(), d, {"r": 8})
           for v, d in enumerate(bytes([v]) * 100_000 for v in range(6))]
    pool = OpponentPool(snapshot_every=1, max_resident=2, seed=0)
    for it in range(1, 4):
        pool.set_current(store.put(big[it]), it)
        ckpt = checkpoint.checkpoints_dir(run) / f"it-{it:06d}"
        ckpt.mkdir(parents=True)
        checkpoint.save_pool(ckpt, pool.state_dict(), pool.adapters())
        (ckpt / "state.json").write_text("{}")
    assert store.nbytes() < 3 * 100_000 * 1.05  # versions 1, 2, 3 once, not 1 + 2 + 3 times
    assert checkpoint.referenced_blobs(run) == {big[i].sha256 for i in (1, 2, 3)}
    state, refs = checkpoint.load_pool(ckpt)
    assert state == json.loads(json.dumps(pool.state_dict())) and set(refs) == set(pool.adapters())
    assert OpponentPool.from_state_dict(state, refs).state_dict() == pool.state_dict()
    assert refs["learner@v3"].load() == big[3]

    old = tmp_path / "old" / "checkpoints" / "it-000001"  # the format before the store
    old.mkdir(parents=True)
    (old / "pool.json").write_text(json.dumps({"iteration": 1}))
    d = big[4].write(old / "adapters")
    (d / "version.json").write_text(json.dumps({"key": big[4].key, "name": "learner", "version": 4,
                                                "sha256": big[4].sha256, "probe": None}))
    state, refs = checkpoint.load_pool(old)
    assert state == {"iteration": 1} and refs[big[4].key].load() == big[4]
    adopted = store.adopt(refs[big[4].key])
    assert Path(adopted.uri) == store.path(big[4].sha256) and adopted.load() == big[4]
    (d / "adapter_model.safetensors").write_bytes(b"0" * 100_000)
    with pytest.raises(AdapterError, match="corrupted"):
        checkpoint.load_pool(old)


def test_rollout_summary_gives_the_same_metrics_and_elo() -> None:
    from actors.trajectories import concat_summaries, summary
    from reciprocity.metrics import iteration_metrics

    rows = []
    for gid in range(6):
        for seat in (0, 1):
            t = _row(gid, seat, "learner", 2 + (gid % 2) * seat, [float(gid + seat), 1.0])
            t.opponent_name, t.opponent_version = "learner", 2 + (gid % 2) * (1 - seat)
            t.trainable = seat == 0 or gid % 2 == 0
            t.info_json = json.dumps({"game": "ipd", "actions": [["C", "D"], ["D", "D"]], "rewards": [[0.0, 5.0],
                                      [1.0, 1.0]], "n_invalid": [0, 0], "n_decisions": [2, 2]})
            t.add_prompt([1, 2, 3])
            t.add_generated([7, 8], [-0.5, -0.25], 0, 2)
            t.add_prompt([4])
            t.add_generated([9], [-1.0], 1, 2)
            t.guided = [True, False]
            t.decision_regex = ["C|D", ""]
            t.n_decisions = 2
            rows.append(t)
    batches = [to_batch(rows[:4]), to_batch(rows[4:])]
    small = concat_summaries([summary(b) for b in batches])
    assert "token_ids" not in small.schema.names and small.column("generated_tokens").to_pylist() == [3] * 12
    from actors.trajectories import concat

    assert iteration_metrics(small, "ipd") == iteration_metrics(concat(batches), "ipd")
    a, b = trained(OpponentPool(), 4), trained(OpponentPool(), 4)
    a.record_batch(small)
    b.record_batch(concat(batches))
    assert a.state_dict() == b.state_dict()
