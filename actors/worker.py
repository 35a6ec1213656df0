"""The rollout worker: one inference engine, its resident adapters, many concurrent matches.

`RolloutWorker` is a plain class (usable and testable without Ray, which it imports only when it
meets an object ref); the driver makes it a Ray actor (reciprocity/launcher.py: resources and
fault-tolerance options). A match is described by a
serialisable `MatchSpec` (no engine objects), whose seats are `PlayerSpec`s: an LLM seat bound to
an explicit adapter key (None = the base model), a scripted strategy, or an API endpoint named in
the worker's config. Matches run concurrently on the one engine (asyncio; the engine batches their
requests); the worker returns one validated Arrow record batch per group of matches.

Constructor config (a plain dict):
- `model`: path of the served base model (its tokenizer and chat template are used for chats);
- `engine`: keyword arguments of the engine (`VLLMEngine(model=..., **engine)`), or None: no LLM
  engine (`actors.engine.NoEngine`: every seat is scripted or API); `threads="node"` means this
  node's cores shared among `engines_per_node` engines (default 1);
- `engine_factory`: optional "module:callable" taking the config and returning an Engine (a test seam);
- `adapters`: AdapterVersions, AdapterRefs or object refs of them, to load at start;
- `adapter_source`: optional object or Ray actor handle with `versions()` returning the
  versions to hold now (the OpponentPool, as AdapterRefs): a restarted worker reloads them, so a
  restart serves exactly what the driver published, never a stale or missing version;

Adapters by reference: the driver sends `sync_adapters` the pool's AdapterRefs (metadata); the
worker reads the bytes of the versions it lacks from the run's adapter store itself, loads and
probes them, retires the rest. Every worker does this at once (one `ray.get` over all of them).
`rollout` returns, per group of games, an object ref of its Arrow batch and the batch's small
summary (`actors.trajectories.summary`): the token columns go from the worker's object store
straight to the learner, never through the driver.
- `api`: {endpoint name: APIConfig dict} for API seats;
- `system`: optional system prompt of LLM chats (None: the template's default);
- `check_template`: run the chat-template guard at start-up (default True);
- `concurrency`: default number of matches in flight (default 64).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

import envs
from actors.adapters import AdapterRef, AdapterVersion
from actors.api_engine import APIEngine
from actors.chat import ChatTemplate, check_template
from actors.device import node_cores
from actors.engine import Engine, NoEngine, UnknownAdapterError
from actors.match import SeatSpec, TextEngine, play_match
from actors.scripted_engine import ScriptedEngine
from actors.trajectories import SeatTrajectory, summary, to_batch

log = logging.getLogger(__name__)

KINDS = ("llm", "scripted", "api")


@dataclass(frozen=True)
class PlayerSpec:
    """Who takes a seat. kind "llm": `adapter` is the served adapter key (AdapterVersion.key) or
    None for the base model; "scripted": `policy` is the strategy name; "api": `policy` is the
    endpoint name in the worker's `api` config. `version` is the policy version (-1: none)."""

    kind: str
    policy: str
    version: int = -1
    adapter: str | None = None
    trainable: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown player kind {self.kind!r}; valid: {', '.join(KINDS)}")
        if self.kind != "llm" and (self.adapter is not None or self.trainable):
            raise ValueError(f"a {self.kind} seat has no adapter and cannot be trained")


@dataclass(frozen=True)
class SamplingSpec:
    """Sampling of LLM seats: temperature, top-p, max new tokens (None: the env's per-decision
    hint), unguided samples before the guided one (0 = always guided) and what makes a free sample
    valid (`actors.match.FREE_SAMPLE_MATCH`)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None
    free_samples: int = 0
    free_sample_match: str = "lenient"


@dataclass(frozen=True)
class MatchSpec:
    game: str
    game_id: int
    group_id: int
    seed: int
    seats: tuple[PlayerSpec, PlayerSpec]
    options: dict[str, Any] = field(default_factory=dict)  # env options (envs.make)
    iteration: int = 0
    run: str = ""
    sampling: SamplingSpec = SamplingSpec()


def _import(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def default_engine(config: dict[str, Any]) -> Engine:
    if "engine" in config and config["engine"] is None:
        return NoEngine()
    from actors.vllm_engine import VLLMEngine

    engine = dict(config.get("engine") or {})
    if engine.get("threads") == "node":  # this node's cores, shared among the run's engines
        engine["threads"] = node_cores(int(config.get("engines_per_node", 1)))
    return VLLMEngine(model=str(config["model"]), **engine)


class RolloutWorker:
    """Plays matches on one engine; see the module doc for the config keys."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = dict(config)
        factory = _import(config["engine_factory"]) if config.get("engine_factory") else default_engine
        self.template = ChatTemplate.from_pretrained(str(config["model"]), system=config.get("system"))
        if config.get("check_template", True):
            check_template(self.template)  # refuse to run on a template that breaks token-in-token-out
        self.engine: Engine = factory(self.config)
        self.concurrency = int(config.get("concurrency", 64))
        self.loaded: dict[str, str] = {}  # served key -> sha256 (the bytes stay with the engine)
        self._text_engines: dict[tuple[str, str], TextEngine] = {}
        self._started: asyncio.Task | None = None
        self._engine_started: asyncio.Task | None = None
        self.totals: dict[str, float] = defaultdict(float)
        self.last: dict[str, float] = {}
        self._progress = {"planned": 0, "games": 0, "requests0": 0, "t0": time.perf_counter()}

    # -- adapters ----------------------------------------------------------------------------
    async def _start_engine(self) -> None:
        start = getattr(self.engine, "start", None)
        if start is not None:
            out = start()
            if asyncio.iscoroutine(out):
                await out

    async def start_engine(self) -> None:
        """Start the engine only, once (no adapters yet): the driver calls it as soon as the actor
        exists, so the engine boots while the learner starts and exports the first version."""
        if self._engine_started is None:
            self._engine_started = asyncio.ensure_future(self._start_engine())
        await asyncio.shield(self._engine_started)

    async def _start(self) -> None:
        await self.start_engine()
        versions = [await _resolve(v) for v in self.config.get("adapters", [])]
        source = self.config.get("adapter_source")
        if source is not None:
            versions += await _call(source, "versions")
        for version in versions:
            await self._load(version)

    async def ready(self) -> None:
        """Start the engine and (re)load the configured adapters, once."""
        if self._started is None:
            self._started = asyncio.ensure_future(self._start())
        await asyncio.shield(self._started)

    async def _load(self, version: Any) -> str:
        """Load a version given as an AdapterVersion, an AdapterRef or an object ref of either. A
        reference's bytes are read from the store only when the version is not loaded yet: a sync
        that changes nothing reads nothing (at paper size a sync names 29 versions of 161 MB)."""
        if not isinstance(version, AdapterVersion | AdapterRef):
            version = await _resolve(version)  # an object ref
        if self.loaded.get(version.key) == version.sha256:
            return version.key  # idempotent: a retried call after a restart is a no-op
        if isinstance(version, AdapterRef):
            version = await _resolve(version)
        key = await self.engine.load_adapter(version)
        self.loaded[key] = version.sha256
        return key

    async def load_adapter(self, version: AdapterVersion | AdapterRef) -> str:
        """Load (validate, probe) a version; return its key. Idempotent for the same version."""
        await self.ready()
        return await self._load(version)

    async def sync_adapters(self, versions: Sequence[AdapterRef | AdapterVersion], unload: bool = True) -> list[str]:
        """Hold exactly `versions` (with `unload`; else at least them): load (read from the store,
        validate, probe) those missing, in order, and retire the others. Returns the loaded keys."""
        await self.ready()
        for version in versions:
            await self._load(version)
        if unload:
            want = {v.key for v in versions}
            for key in [k for k in self.loaded if k not in want]:
                await self.unload_adapter(key)
        return self.adapters()

    async def unload_adapter(self, key: str) -> None:
        """Retire a version (the engine waits for its in-flight requests)."""
        await self.ready()
        if key in self.loaded:
            await self.engine.unload_adapter(key)
            del self.loaded[key]

    def probe_error(self, key: str) -> float:
        """The fidelity-probe error measured when `key` was loaded (0.0 when it had no probe)."""
        errors = getattr(self.engine, "probe_error", {})
        return float(errors.get(key, 0.0) or 0.0)

    def adapters(self) -> list[str]:
        return sorted(self.loaded)

    # -- matches -----------------------------------------------------------------------------
    def _seat(self, player: PlayerSpec, sampling: SamplingSpec) -> SeatSpec:
        engine: Engine | TextEngine
        if player.kind == "llm":
            if player.adapter is not None and player.adapter not in self.loaded:
                raise UnknownAdapterError(
                    f"adapter {player.adapter!r} is not loaded on this worker (loaded: {sorted(self.loaded)})"
                )
            engine = self.engine
        else:
            engine = self._text_engine(player)
        return SeatSpec(
            engine=engine,
            policy=player.policy,
            version=player.version,
            adapter=player.adapter,
            trainable=player.trainable,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            free_samples=sampling.free_samples,
            free_sample_match=sampling.free_sample_match,
        )

    def _text_engine(self, player: PlayerSpec) -> TextEngine:
        key = (player.kind, player.policy)
        if key not in self._text_engines:
            if player.kind == "scripted":
                self._text_engines[key] = ScriptedEngine(player.policy)
            else:
                apis = self.config.get("api", {})
                if player.policy not in apis:
                    raise KeyError(f"no API endpoint {player.policy!r} in the worker config (have: {sorted(apis)})")
                self._text_engines[key] = APIEngine(apis[player.policy], name=player.policy)
        return self._text_engines[key]

    async def _play(self, spec: MatchSpec, limit: asyncio.Semaphore) -> tuple[SeatTrajectory, SeatTrajectory]:
        seats = (self._seat(spec.seats[0], spec.sampling), self._seat(spec.seats[1], spec.sampling))
        async with limit:
            env = envs.make(spec.game, **spec.options)
            game = await play_match(
                env,
                seats,
                spec.seed,
                template=self.template,
                run=spec.run,
                iteration=spec.iteration,
                game_id=spec.game_id,
                group_id=spec.group_id,
            )
            self._progress["games"] += 1
            return game

    async def _groups(self, specs: Sequence[MatchSpec], concurrency: int | None) -> AsyncIterator[pa.RecordBatch]:
        """Play `specs` with at most `concurrency` matches in flight; yield one validated record
        batch per group (rows ordered by game id, then seat) as soon as the group's games are done."""
        await self.ready()
        for spec in specs:  # fail fast, before any game starts
            for player in spec.seats:
                self._seat(player, spec.sampling)
        limit = asyncio.Semaphore(concurrency or self.concurrency)
        self._progress = {"planned": len(specs), "games": 0, "requests0": self._requests(), "t0": time.perf_counter()}
        groups: dict[int, list[MatchSpec]] = defaultdict(list)
        for spec in specs:
            groups[spec.group_id].append(spec)

        async def group(members: list[MatchSpec]) -> list[SeatTrajectory]:
            games = await asyncio.gather(*(self._play(s, limit) for s in members))
            return [traj for game in sorted(games, key=lambda g: g[0].game_id) for traj in game]

        t0 = time.perf_counter()
        counts: dict[str, float] = defaultdict(float)
        api_before = self._api_counts()
        tasks = [asyncio.ensure_future(group(members)) for members in groups.values()]
        try:
            for done in asyncio.as_completed(tasks):
                rows = await done
                counts["games"] += len(rows) // 2
                for r in rows:
                    counts["generated_tokens"] += sum(1 for x in r.token_round if x >= 0)
                    counts["decisions"] += r.n_decisions
                    counts["invalid"] += r.n_invalid
                    counts["resampled"] += r.n_resampled
                counts["seconds"] = time.perf_counter() - t0
                yield to_batch(rows)
        finally:
            for t in tasks:
                t.cancel()
            counts["seconds"] = time.perf_counter() - t0
            counts["tokens_per_s"] = counts["generated_tokens"] / counts["seconds"] if counts["seconds"] else 0.0
            for k, v in self._api_counts().items():
                counts[f"api_{k}"] = v - api_before.get(k, 0)
            self.last = dict(counts)
            for k, v in counts.items():
                if k != "tokens_per_s":
                    self.totals[k] += v
            self.totals["runs"] += 1
            log.info("rollout: %s", {k: round(v, 3) for k, v in counts.items()})

    async def rollout(self, specs: Sequence[MatchSpec], concurrency: int | None = None) -> list[tuple[Any, Any]]:
        """Play `specs`; per group, in completion order: (object ref of its record batch, its summary).
        The driver keeps the summaries and hands the refs to the learner."""
        import ray

        if not ray.is_initialized():  # ray.put would silently start a local cluster
            raise RuntimeError("rollout needs Ray (call it on the actor)")
        return [(ray.put(b), summary(b)) async for b in self._groups(specs, concurrency)]

    async def run(self, specs: Sequence[MatchSpec], concurrency: int | None = None, refs: bool = True) -> list[Any]:
        """Play `specs`; return one record batch per group, in completion order: as object refs
        (`ray.put`, the default: a list of refs is not resolved by Ray on return) or as batches."""
        batches = [b async for b in self._groups(specs, concurrency)]
        if not refs:
            return batches
        import ray

        if not ray.is_initialized():  # ray.put would silently start a local cluster
            raise RuntimeError("run(refs=True) needs Ray (call it on the actor, or pass refs=False)")
        return [ray.put(b) for b in batches]

    async def run_stream(
        self, specs: Sequence[MatchSpec], concurrency: int | None = None
    ) -> AsyncIterator[pa.RecordBatch]:
        """Like `run`, but a generator: as a Ray actor method it streams each group's batch as an
        object ref the moment the group is done (`for ref in actor.run_stream.remote(specs)`)."""
        async for batch in self._groups(specs, concurrency):
            yield batch

    def shutdown(self) -> None:
        """Stop the engine (its process) before the actor goes away."""
        stop = getattr(self.engine, "shutdown", None)
        if stop is not None:
            stop()

    def _requests(self) -> int:
        return int(getattr(getattr(self.engine, "stats", None), "requests", 0))

    def progress(self) -> dict[str, float]:
        """The running (or last) `run`, cheap to ask while it plays: games planned and finished,
        model requests (LLM decisions; with free samples each sample counts) and seconds."""
        p = self._progress
        return {"planned": p["planned"], "games": p["games"], "decisions": self._requests() - p["requests0"],
                "seconds": time.perf_counter() - p["t0"]}

    def _api_counts(self) -> dict[str, int]:
        """API seats' counters summed over endpoints: requests, retries, reprompts, failed_format,
        failed_requests, forfeits (decisions played as invalid because the endpoint failed), breaker_skips."""
        out: dict[str, int] = defaultdict(int)
        for engine in self._text_engines.values():
            if isinstance(engine, APIEngine):
                for k, v in engine.stats.items():
                    out[k] += v
        return dict(out)

    def stats(self) -> dict[str, Any]:
        """Cumulative counts (games, generated tokens, decisions, invalid, resampled, seconds,
        runs, and `api_*`: the API seats' requests, retries, forfeits, ...), the last run's counts,
        the loaded adapter keys and the engine's own counters (prompt, prefix-cache-hit and
        generated tokens, ...; empty for an engine without them)."""
        metrics = getattr(self.engine, "metrics", None)
        return {"totals": dict(self.totals), "last": dict(self.last), "adapters": self.adapters(),
                "engine": metrics() if callable(metrics) else {}}


async def _resolve(value: Any) -> Any:
    """An object ref (nested in a config or list, hence not resolved by Ray) -> its value; an
    AdapterRef -> its AdapterVersion, read from the adapter store (off the event loop)."""
    if isinstance(value, AdapterRef):
        return await asyncio.to_thread(value.load)
    if "ray" not in sys.modules:  # no Ray in this process: no object ref either
        return value
    import ray

    return await _resolve(await value) if isinstance(value, ray.ObjectRef) else value


async def _call(target: Any, method: str) -> Any:
    """Call `method` on a plain object or a Ray actor handle."""
    fn = getattr(target, method)
    if hasattr(fn, "remote"):
        return await fn.remote()
    out = fn()
    return await out if asyncio.iscoroutine(out) else out
