"""The actor groups' own logic (actors/worker_group.py, learner/learner_group.py) without a Ray cluster:
fake actor handles whose calls return fake futures, and `ray.get` / `ray.wait` / `ray.kill` swapped for
functions that read them. Covered: the round-robin split, a dead worker's share replayed (and the
give-up after max_restarts), the worker that rejected an adapter named, a worker that does not come
back, polling while waiting, the learner ranks started rank 0 first, and LearnerLost from every
learner call whose rank died. The real stack runs them in tests/test_train_faults.py."""

from __future__ import annotations

from typing import Any

import pytest
import ray

from actors.adapters import AdapterError
from actors.worker_group import WorkerError, WorkerGroup, split
from learner.learner_group import LearnerGroup, LearnerLost


class Future:
    """A finished (or, for `pending` more polls, unfinished) call: its value or its error."""

    def __init__(self, value: Any = None, error: BaseException | None = None, pending: int = 0) -> None:
        self.value, self.error, self.pending = value, error, pending


def _get(refs: Any, timeout: float | None = None) -> Any:
    if isinstance(refs, list):
        return [_get(r) for r in refs]
    if refs.error is not None:
        raise refs.error
    return refs.value


def _wait(refs: list[Future], num_returns: int = 1, timeout: float | None = None) -> tuple[list, list]:
    for r in refs:
        r.pending = max(0, r.pending - 1) if r.pending else 0
    ready = [r for r in refs if not r.pending]
    return (ready, [r for r in refs if r.pending]) if len(ready) >= num_returns else ([], refs)


@pytest.fixture(autouse=True)
def fake_ray(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    killed: list[Any] = []
    monkeypatch.setattr(ray, "get", _get)
    monkeypatch.setattr(ray, "wait", _wait)
    monkeypatch.setattr(ray, "kill", killed.append)
    monkeypatch.setattr(ray, "put", lambda value: Future(value))
    monkeypatch.setattr("time.sleep", lambda s: None)
    return killed


class Method:
    def __init__(self, actor: Actor, name: str) -> None:
        self.actor, self.name = actor, name

    def options(self, **kw: Any) -> Method:
        self.actor.calls.append((f"{self.name}.options", kw))
        return self

    def remote(self, *args: Any, **kw: Any) -> Future:
        self.actor.calls.append((self.name, args))
        answer = self.actor.answers.get(self.name)
        if isinstance(answer, list):  # one answer per call
            answer = answer.pop(0)
        if isinstance(answer, BaseException):
            return Future(error=answer)
        if isinstance(answer, Future):
            return answer
        return Future(answer(*args) if callable(answer) else answer)


class Actor:
    """A fake handle: `answers[method]` is a value, an exception, a Future, a callable of the
    call's arguments, or a list of those (one per call)."""

    def __init__(self, **answers: Any) -> None:
        self.answers = answers
        self.calls: list[tuple[str, Any]] = []

    def __getattr__(self, name: str) -> Method:
        return Method(self, name)


class ActorClass:
    """A fake Ray actor class: records each actor created, with its options and arguments."""

    def __init__(self, make: Any) -> None:
        self.make, self.created = make, []

    def options(self, **opts: Any) -> ActorClass:
        self._opts = opts
        return self

    def remote(self, *args: Any, **kw: Any) -> Actor:
        actor = self.make(len(self.created))
        self.created.append((self._opts, args, kw))
        return actor


def test_split_is_round_robin_and_a_worker_without_games_gets_no_call() -> None:
    assert split(list(range(7)), 3) == [[0, 3, 6], [1, 4], [2, 5]]
    workers = [Actor(rollout=lambda chunk, c: [(f"ref{g}", g) for g in chunk]) for _ in range(3)]
    pending = WorkerGroup(workers).start_rollout([10, 11], concurrency=8)
    assert sorted(pending.futures) == [0, 1] and workers[2].calls == []
    assert workers[0].calls == [("rollout", ([10], 8))]
    shares, replays = WorkerGroup(workers).finish_rollout(pending)
    assert shares == [("ref10", 10), ("ref11", 11)] and replays == 0


def test_a_dead_workers_share_is_replayed_after_its_restart() -> None:
    died = ray.exceptions.RayActorError()
    flaky = Actor(rollout=[died, [("b", 1)]], ready=None)
    group = WorkerGroup([Actor(rollout=[[("a", 0)]]), flaky], max_restarts=3)
    warnings: list[str] = []
    shares, replays = group.finish_rollout(group.start_rollout([0, 1], 4), warn=warnings.append)
    assert shares == [("a", 0), ("b", 1)] and replays == 1
    assert [c for c in flaky.calls if c[0] != "ready"] == [("rollout", ([1], 4)), ("rollout", ([1], 4))]
    assert ("ready", ()) in flaky.calls  # waited for the restart before replaying
    assert warnings == ["rollout worker 1 died (RayActorError); waiting for its restart to replay 1 games"]


def test_a_worker_that_keeps_dying_is_given_up_after_max_restarts() -> None:
    died = ray.exceptions.ActorUnavailableError("gone", None)
    group = WorkerGroup([Actor(rollout=[died, died], ready=None)], max_restarts=1)
    with pytest.raises(WorkerError, match="rollout worker 0 died 2 times"):
        group.finish_rollout(group.start_rollout([0], None))


def test_a_worker_that_does_not_come_back_is_an_error() -> None:
    group = WorkerGroup([Actor(ready=None), Actor(ready=ray.exceptions.ActorDiedError())])
    group.await_restart(0)
    with pytest.raises(WorkerError, match="rollout worker 1 did not come back"):
        group.await_restart(1)


def test_the_worker_that_rejected_an_adapter_is_named() -> None:
    rejected = ray.exceptions.RayTaskError("sync_adapters", "tb", AdapterError("sha256 mismatch"))
    group = WorkerGroup([Actor(sync_adapters=["a"]), Actor(sync_adapters=[rejected])])
    with pytest.raises(WorkerError, match="rollout worker 1 rejected an adapter: sha256 mismatch"):
        group.sync_adapters(["v1"], unload=True)
    other = ray.exceptions.RayTaskError("sync_adapters", "tb", ValueError("no"))
    with pytest.raises(ray.exceptions.RayTaskError):  # not an adapter's fault: raised as it is
        WorkerGroup([Actor(sync_adapters=other)]).sync_adapters([], unload=False)


def test_polls_while_a_rollout_runs() -> None:
    polls: list[int] = []
    group = WorkerGroup([Actor(rollout=Future([("a", 0)], pending=3))])
    shares, _ = group.finish_rollout(group.start_rollout([0], 1), poll=lambda: polls.append(1))
    assert shares == [("a", 0)] and len(polls) == 2


def test_a_failed_start_closes_every_worker_it_made(fake_ray: list[Any]) -> None:
    cls = ActorClass(lambda i: Actor(ready=None if i == 0 else ray.exceptions.ActorDiedError(), shutdown=None))
    with pytest.raises(WorkerError, match="rollout worker 1 did not come back"):
        WorkerGroup.start(cls, [{"num_cpus": 1}] * 2, [{"i": 0}, {"i": 1}], max_restarts=3)
    assert [c[1] for c in cls.created] == [({"i": 0},), ({"i": 1},)]
    assert len(fake_ray) == 2  # both killed


def test_created_workers_boot_their_engines_before_anyone_waits_for_them() -> None:
    """`create` tells every worker to start its engine and returns at once (the driver starts the
    learner meanwhile); only `wait_ready` asks for `ready`, which loads the adapters."""
    cls = ActorClass(lambda i: Actor(start_engine=None, ready=None))
    group = WorkerGroup.create(cls, [{"num_cpus": 1}] * 2, [{"i": 0}, {"i": 1}], max_restarts=0)
    assert [[name for name, _ in w.calls] for w in group] == [["start_engine"], ["start_engine"]]
    group.wait_ready()
    assert [[name for name, _ in w.calls] for w in group] == [["start_engine", "ready"]] * 2


def test_learner_ranks_start_rank0_first_with_its_address_for_the_others() -> None:
    cls = ActorClass(lambda r: Actor(master_address="10.0.0.1:2345", ready=True))
    group = LearnerGroup.start(cls, "cfg", [{"rank": r} for r in range(3)], progress_group="progress")
    assert len(group) == 3
    assert [(o, kw) for o, _, kw in cls.created] == [
        ({"rank": 0}, {"rank": 0, "world_size": 3}),
        ({"rank": 1}, {"rank": 1, "world_size": 3, "master": "10.0.0.1:2345"}),
        ({"rank": 2}, {"rank": 2, "world_size": 3, "master": "10.0.0.1:2345"})]
    group.progress()
    assert ("progress.options", {"concurrency_group": "progress"}) in group[0].calls


def test_every_learner_call_whose_rank_died_is_learner_lost() -> None:
    died = ray.exceptions.ActorDiedError()
    dead = Actor(train_step=died, export=died, save_checkpoint=died, load_checkpoint=died, progress=died,
                 node=died)
    group = LearnerGroup([Actor(train_step={}, export="ref", save_checkpoint="p", load_checkpoint=1,
                                progress={}, node={}), dead])
    calls = [lambda: group.wait(group.train_step([])), lambda: group.export(1, "/store"),
             lambda: group.save_checkpoint("/ck"), lambda: group.load_checkpoint("/ck"),
             lambda: LearnerGroup([dead]).progress(), lambda: group.nodes()]
    for call in calls:
        with pytest.raises(LearnerLost, match=r"a learner rank died \(ActorDiedError\)"):
            call()
    alive = LearnerGroup([Actor(export=lambda v, s: f"ref{v}@{s}", train_step={"loss": 1.0})])
    assert alive.export(3, "/store") == "ref3@/store"
    assert alive.wait(alive.train_step([("r", "summary")])) == [{"loss": 1.0}]


def test_one_rank_gets_the_refs_and_more_ranks_also_the_summaries_put_once() -> None:
    """One rank resolves every batch; with two, each rank gets the refs plus one object of all the
    summaries, from which it deals the batches and resolves only its own (learner/batch.py)."""
    shares = [("ref0", "sum0"), ("ref1", "sum1")]
    one = LearnerGroup([Actor(train_step={})])
    one.train_step(shares)
    assert one[0].calls == [("train_step", (["ref0", "ref1"],))]
    two = LearnerGroup([Actor(train_step={}), Actor(train_step={})])
    two.train_step(shares)
    (name0, (refs0, put0)), (name1, (refs1, put1)) = two[0].calls[0], two[1].calls[0]
    assert (name0, name1) == ("train_step", "train_step") and refs0 == refs1 == ["ref0", "ref1"]
    assert put0 is put1 and put0.value == ["sum0", "sum1"]


def test_a_failed_learner_start_kills_the_ranks_it_made(fake_ray: list[Any]) -> None:
    cls = ActorClass(lambda r: Actor(master_address="h:1", ready=ray.exceptions.RayActorError() if r else True))
    with pytest.raises(LearnerLost):
        LearnerGroup.start(cls, "cfg", [{}, {}])
    assert len(fake_ray) == 2
