"""The learner ranks as one group: every call the driver makes to them, and the detection of a
rank's death, in one place (as RLlib's LearnerGroup and OpenRLHF's RayActorGroup).

A DeepSpeed group cannot lose a rank: every call of the group that finds a rank dead raises
`LearnerLost` (one wrapper, `_get`, for all of them), and the driver replaces the whole group and
restores it from the last checkpoint. The calls:
- `start`: rank 0 first (it picks the rendezvous address), then the other ranks with that address,
  then every rank's `ready` (process group joined, model and optimizer built);
- `train_step` starts one optimizer step on every rank on the batches' object refs and summaries
  (one rank resolves every ref; with more, each resolves only the refs of its own batches); `wait`
  returns the ranks' results, calling `poll` every `poll_s` seconds meanwhile;
- `export`: rank 0's AdapterRef of the current adapter (every rank joins: ZeRO-3 gathers);
- `save_checkpoint` / `load_checkpoint`, `progress` (rank 0's micro-batches, in its own concurrency
  group so that it answers during a step), `nodes`, `kill`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ray

from actors.adapters import AdapterRef


class LearnerLost(RuntimeError):
    """A learner rank died (its process is gone); the driver restores from the last checkpoint."""


class LearnerGroup:
    def __init__(self, actors: Sequence[Any] = (), progress_group: str | None = None) -> None:
        self.actors = list(actors)
        self.progress_group = progress_group  # the concurrency group of the ranks' `progress` calls

    @classmethod
    def start(cls, actor_cls: Any, config: Any, options: Sequence[dict[str, Any]],
              progress_group: str | None = None) -> LearnerGroup:
        """Rank r = `actor_cls.options(**options[r]).remote(config, rank=r, world_size=len(options))`
        (ranks > 0 with rank 0's rendezvous address), ready; nothing half-started outlives a failed start."""
        world = len(options)
        group = cls([], progress_group)
        try:
            rank0 = actor_cls.options(**options[0]).remote(config, rank=0, world_size=world)
            group.actors.append(rank0)
            master = group._get(rank0.master_address.remote())
            group.actors += [actor_cls.options(**options[r]).remote(config, rank=r, world_size=world, master=master)
                             for r in range(1, world)]
            group._get([a.ready.remote() for a in group.actors])
        except BaseException:
            group.kill()
            raise
        return group

    def __len__(self) -> int:
        return len(self.actors)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.actors)

    def __getitem__(self, rank: int) -> Any:
        return self.actors[rank]

    @staticmethod
    def _get(refs: Any, timeout: float | None = None) -> Any:
        """ray.get; a rank that died is a LearnerLost."""
        try:
            return ray.get(refs, timeout=timeout)
        except ray.exceptions.RayActorError as e:
            raise LearnerLost(f"a learner rank died ({type(e).__name__})") from e

    # -- learning ----------------------------------------------------------------------------
    def train_step(self, shares: Sequence[tuple[ray.ObjectRef, Any]]) -> list[ray.ObjectRef]:
        """Start every rank's optimizer step on the batches (object ref, summary); `wait` for the
        results. One rank resolves every ref; with more, the summaries go along (put once) and each
        rank resolves only the refs of the batches it is dealt."""
        refs = [r for r, _ in shares]
        if len(self.actors) == 1:
            return [self.actors[0].train_step.remote(refs)]
        summaries = ray.put([s for _, s in shares])
        return [a.train_step.remote(refs, summaries) for a in self.actors]

    def wait(self, futures: list[ray.ObjectRef], poll: Callable[[], None] | None = None,
             poll_s: float = 1.0) -> list[Any]:
        """The ranks' results of `futures`, calling `poll` every `poll_s` seconds while none is done.
        Once any rank is done (or dead) it is a blocking get: a lost rank raises at once."""
        while not ray.wait(futures, num_returns=1, timeout=poll_s)[0]:
            if poll is not None:
                poll()
        return self._get(futures)

    def progress(self, timeout: float | None = None) -> dict[str, int]:
        """Rank 0's micro-batches in the running (or last) step: done and planned."""
        method = self.actors[0].progress
        if self.progress_group is not None:
            method = method.options(concurrency_group=self.progress_group)
        return self._get(method.remote(), timeout=timeout)

    # -- adapters and checkpoints ------------------------------------------------------------
    def export(self, version: int, store: str) -> AdapterRef:
        """The current adapter as `version`, written by rank 0 into the adapter store at `store`:
        its AdapterRef only (every rank joins: ZeRO-3 gathers)."""
        return self._get([a.export.remote(version, store) for a in self.actors])[0]

    def save_checkpoint(self, path: str) -> None:
        """Every rank saves its part of the DeepSpeed checkpoint under `path`."""
        self._get([a.save_checkpoint.remote(path) for a in self.actors])

    def load_checkpoint(self, path: str) -> None:
        self._get([a.load_checkpoint.remote(path) for a in self.actors])

    def nodes(self) -> list[dict[str, str]]:
        """Where each rank runs (ip, node id, pid: `Located.node` of reciprocity/launcher.py)."""
        return self._get([a.node.remote() for a in self.actors])  # all at once

    def kill(self) -> None:
        for a in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(a)
