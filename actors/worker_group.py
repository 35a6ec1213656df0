"""The rollout workers as one group: every call the driver makes to them, their restarts and the
detection of their death, in one place (as RLlib's EnvRunnerGroup and OpenRLHF's RayActorGroup).

The driver (reciprocity/train.py) says what to do; the group does it on every worker:
- `create` / `wait_ready` (or `start`, both): create the actors (class, options and configs from
  reciprocity/launcher.py) and have them boot their engines at once, then, once the adapter source
  holds the first versions, wait until each one answers (a worker that Ray restarts while starting
  is waited for);
- `sync_adapters`: every worker loads the versions it lacks and retires the rest, all at once (one
  `ray.get` over all); a worker that rejects a version is named;
- `start_rollout` / `finish_rollout`: the specs split round-robin into one share per worker, played
  concurrently; a share whose worker dies is replayed once Ray has restarted the worker (which
  reloads the pool's versions), up to `max_restarts` times;
- `probe_errors`, `progress`, `stats`, `nodes`: one figure per worker, in worker order;
- `close`: shut every engine down, then kill the actors.

While it waits, a `poll` callback runs every `poll_s` seconds (the driver shows progress there); a
`warn` callback hears of a death before the group waits for the restart. Ray is the only dependency:
the group knows nothing of the run's config.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import ray

from actors.adapters import AdapterError, AdapterRef
from actors.worker import MatchSpec

Share = tuple[ray.ObjectRef, Any]  # an object ref of one Arrow record batch, and the batch's summary
WORKER_DIED = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


class WorkerError(RuntimeError):
    """A rollout worker failed for good: it rejected an adapter, did not come back, or died too often."""


@dataclass
class Pending:
    """A rollout in flight: its specs, each worker's share and the futures of the shares."""

    specs: list[MatchSpec]
    chunks: list[list[MatchSpec]]
    futures: dict[int, ray.ObjectRef]
    concurrency: int | None
    t0: float


def split(specs: Sequence[MatchSpec], workers: int) -> list[list[MatchSpec]]:
    """Worker i's share: every `workers`-th spec from the i-th (round-robin)."""
    return [list(specs[i::workers]) for i in range(workers)]


def _raised(future: ray.ObjectRef) -> bool:
    """Whether a finished call raised."""
    try:
        ray.get(future)
        return False
    except Exception:
        return True


class WorkerGroup:
    def __init__(self, actors: Sequence[Any] = (), max_restarts: int = 0) -> None:
        self.actors = list(actors)
        self.max_restarts = max_restarts  # Ray's max_restarts of each worker: replays of one share

    @classmethod
    def create(cls, actor_cls: Any, options: Sequence[dict[str, Any]], configs: Sequence[dict[str, Any]],
               max_restarts: int) -> WorkerGroup:
        """Worker i = `actor_cls.options(**options[i]).remote(configs[i])`, all created at once, each
        told to start its engine (no adapters yet) without waiting: the engines boot while the driver
        does the rest of its start-up (the learner's start and first export). `wait_ready` waits."""
        group = cls([actor_cls.options(**o).remote(c) for o, c in zip(options, configs, strict=True)], max_restarts)
        for w in group.actors:
            start_engine = getattr(w, "start_engine", None)
            if start_engine is not None:  # fire and forget: a failed start raises again in `ready`
                start_engine.remote()
        return group

    def wait_ready(self) -> None:
        """Wait until every worker has started its engine and loaded the adapter source's versions,
        one after another (a worker that Ray restarts while starting is waited for); a failed start
        kills every worker of the group."""
        try:
            for i in range(len(self)):
                self.await_restart(i)
        except BaseException:
            self.close()
            raise

    @classmethod
    def start(cls, actor_cls: Any, options: Sequence[dict[str, Any]], configs: Sequence[dict[str, Any]],
              max_restarts: int) -> WorkerGroup:
        """`create` then `wait_ready`: nothing half-started outlives a failed start."""
        group = cls.create(actor_cls, options, configs, max_restarts)
        group.wait_ready()
        return group

    def __len__(self) -> int:
        return len(self.actors)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.actors)

    def __getitem__(self, i: int) -> Any:
        return self.actors[i]

    # -- adapters ----------------------------------------------------------------------------
    def sync_adapters(self, versions: list[AdapterRef], unload: bool = True) -> None:
        """Every worker holds `versions` (loaded, validated and probed where missing); with `unload`,
        it retires the others. All workers at once."""
        futures = [w.sync_adapters.remote(versions, unload) for w in self.actors]
        try:
            ray.get(futures)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, AdapterError):
                i = next(i for i, f in enumerate(futures) if _raised(f))
                raise WorkerError(f"rollout worker {i} rejected an adapter: {e.cause}") from None
            raise

    def probe_errors(self, key: str) -> list[float]:
        """Each worker's fidelity-probe error of version `key` (its log-probs against the learner's)."""
        return ray.get([w.probe_error.remote(key) for w in self.actors])

    # -- rollouts ----------------------------------------------------------------------------
    def start_rollout(self, specs: list[MatchSpec], concurrency: int | None) -> Pending:
        """Split `specs` across the workers and start playing them (non-blocking)."""
        chunks = split(specs, len(self.actors))
        futures = {i: self.actors[i].rollout.remote(chunk, concurrency) for i, chunk in enumerate(chunks) if chunk}
        return Pending(specs, chunks, futures, concurrency, time.perf_counter())

    def finish_rollout(self, pending: Pending, poll: Callable[[], None] | None = None,
                       warn: Callable[[str], None] | None = None, poll_s: float = 1.0) -> tuple[list[Share], int]:
        """Wait for a rollout: its shares (batch ref, summary) per group of games, and how many
        worker shares were replayed. A worker that died is waited for (Ray restarts it and it
        reloads the pool's versions) and its share played again; the last death is a WorkerError."""
        shares: list[Share] = []
        replays = 0
        for i, future in pending.futures.items():
            for attempt in range(self.max_restarts + 1):
                try:
                    shares += self._wait(future, poll, poll_s)
                    break
                except WORKER_DIED as e:
                    if attempt == self.max_restarts:
                        raise WorkerError(f"rollout worker {i} died {attempt + 1} times: {e}") from None
                    replays += 1
                    if warn is not None:
                        warn(f"rollout worker {i} died ({type(e).__name__}); waiting for its restart to "
                             f"replay {len(pending.chunks[i])} games")
                    self.await_restart(i)
                    future = self.actors[i].rollout.remote(pending.chunks[i], pending.concurrency)
        return shares, replays

    def settle(self, pending: Pending, timeout_s: float = 600.0) -> None:
        """Let a rollout's calls end (whatever their outcome), up to `timeout_s`."""
        ray.wait(list(pending.futures.values()), num_returns=len(pending.futures), timeout=timeout_s)

    @staticmethod
    def _wait(future: ray.ObjectRef, poll: Callable[[], None] | None, poll_s: float) -> Any:
        """ray.get(future), calling `poll` every `poll_s` seconds while it runs."""
        while not ray.wait([future], timeout=poll_s)[0]:
            if poll is not None:
                poll()
        return ray.get(future)

    # -- restarts ----------------------------------------------------------------------------
    def await_restart(self, i: int, timeout_s: float = 600.0) -> None:
        """Block until worker i answers again (Ray restarts it; its `ready` reloads the adapters)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                ray.get(self.actors[i].ready.remote(), timeout=max(1.0, deadline - time.monotonic()))
                return
            except (*WORKER_DIED, ray.exceptions.GetTimeoutError) as e:
                if time.monotonic() > deadline or isinstance(e, ray.exceptions.ActorDiedError):
                    raise WorkerError(f"rollout worker {i} did not come back: {e}") from None
                time.sleep(1.0)

    # -- figures -----------------------------------------------------------------------------
    def progress(self, timeout: float | None = None) -> list[dict[str, float]]:
        """Each worker's progress in the running rollout (games planned and done, decisions, seconds)."""
        return ray.get([w.progress.remote() for w in self.actors], timeout=timeout)

    def stats(self) -> list[dict[str, Any]]:
        """Each worker's counters (`RolloutWorker.stats`: the last rollout's under "last")."""
        return ray.get([w.stats.remote() for w in self.actors])

    def nodes(self) -> list[dict[str, str]]:
        """Where each worker runs (ip, node id, pid: `Located.node` of reciprocity/launcher.py)."""
        return ray.get([w.node.remote() for w in self.actors])  # all at once

    # -- the end -----------------------------------------------------------------------------
    def close(self) -> None:
        """Shut each engine down (a dead worker needs none), then kill the actor."""
        for w in self.actors:
            with contextlib.suppress(Exception):
                ray.get(w.shutdown.remote(), timeout=30)
            with contextlib.suppress(Exception):
                ray.kill(w)
