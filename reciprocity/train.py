"""The training driver: one process that owns the loop, the config and the MLflow run.

One iteration (synchronous mode), as in sysdesign/architecture.md:
  1. plan: the opponent pool assigns seats for N games (learner seat by group parity; opponent a
     buffer snapshot with probability p, else a frozen copy of the current adapter), seeds per
     seed group (common random numbers);
  2. rollout: match specs are split across the workers, which play them concurrently on their
     engines and return Arrow record batches as object refs, each with its small summary (game
     ids, seats, rewards, actions, counts): the driver computes the metrics and the pool the Elo
     ratings from the summaries; the token columns never reach the driver;
  3. learn: every learner rank receives the refs and takes one optimizer step;
  4. publish: rank 0 exports version k+1 into the run's adapter store (`<run dir>/adapters/<sha256>`)
     and returns its AdapterRef (metadata only); the pool records it and freezes a snapshot every
     K iterations; every worker reads, loads and probes it at the same time (one ray.get over all);
  5. log and checkpoint (checkpoints refer to the stored adapters by sha256; bytes that neither the
     pool nor a kept checkpoint refers to are deleted).
The driver never holds adapter bytes (tests/test_pool.py checks it).
Every generated token carries its behaviour version and the learner reports staleness.

Asynchronous mode (`mode: async`, `max_staleness >= 1`): the rollout of iteration k+1 starts on
version k while the learners take the step on iteration k's batch, so rollout and learning overlap;
the new version is loaded next to the old one (which the running games still use) and the old one is
retired once that rollout is done. The pipeline is one iteration deep, so a batch is at most one
version behind the learner (staleness <= 1); the learner's truncated importance weights correct for it.

The actors: `Trainer.workers` is a `WorkerGroup` (actors/worker_group.py) and `Trainer.learners` a
`LearnerGroup` (learner/learner_group.py); every call to a rollout worker or a learner rank goes
through them, so this module holds the loop and the pool's calls only. The class reads top to
bottom: the loop (`step`, `steps_async`), its phases in order (plan, rollout, learn, publish, log),
evaluation, checkpoints and recovery, then the actors' start and close.

Faults: a rollout worker that dies mid-iteration is restarted by Ray (`max_restarts`), reloads the
pool's versions, and replays its share of the games (the WorkerGroup does it); the driver then checks
that the iteration holds exactly the planned game ids (none lost, none duplicated). Every
LearnerGroup call whose rank died raises `LearnerLost`: `iterations` replaces the ranks and restores
from the last checkpoint (`_recover`).

Periodic evaluation (`evaluation.every`): the current adapter plays each evaluation opponent
(`scripted:NAME`, `base`, `self`) on the same workers, untrained; figures go to MLflow as
`eval/<opponent>/<figure>` with an HTML transcript; the curves are re-plotted as a PNG artifact.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute
import ray
from rich.console import Console
from rich.table import Table

import envs
from actors import device, trajectories
from actors.adapters import AdapterRef, AdapterStore
from actors.chat import ChatTemplate
from actors.pool import OpponentPool
from actors.vllm_engine import lora_rank_for
from actors.worker import MatchSpec, PlayerSpec, RolloutWorker
from actors.worker_group import Pending, Share, WorkerError, WorkerGroup
from envs.metrics import GameRecord, summarize
from learner.learner import Learner
from learner.learner_group import LearnerGroup, LearnerLost
from reciprocity import checkpoint, launcher, progress
from reciprocity.config import Config, ConfigError
from reciprocity.evaluate import engine_options, sampling_of
from reciprocity.learner_settings import learner_config
from reciprocity.metrics import iteration_metrics
from reciprocity.models import model_sha
from reciprocity.report import CURVES, RETURN, SIDES, plot_curves, transcripts_html
from reciprocity.tracking import Tracker

EVAL_GAME_ID_BASE = 1 << 40  # evaluation game ids never meet training ones
console = Console(log_path=False)


class TrainError(RuntimeError):
    """The run cannot start or continue (the message says why)."""


def preflight(cfg: Config) -> None:
    """Everything that can be checked before a process starts."""
    try:
        envs.make(cfg.game.name, **cfg.game.options)
    except envs.EnvConfigError as e:
        raise ConfigError(f"game.options: {e}") from None
    if cfg.evaluation.every:
        for spec in cfg.evaluation.opponents:
            eval_player(cfg.game.name, spec)
    if cfg.opponent is not None:
        fixed_opponent(cfg)
    model = Path(cfg.model.path)
    if not (model / "config.json").is_file():
        raise ConfigError(f"model.path: no Hugging Face model at {model} (run `make model`, or set model.path)")


def fixed_opponent(cfg: Config) -> Any:
    """The `opponent` of an exploiter run as an `reciprocity.agents.Agent` (ConfigError if bad).
    An API opponent that keeps failing forfeits its decisions (counted) instead of stopping the run."""
    import dataclasses

    from reciprocity.agents import AgentSpecError, parse_agent
    from reciprocity.tracking import tracking_uri

    try:
        agent = parse_agent(str(cfg.opponent), cfg.game.name, tracking_uri(cfg))
    except AgentSpecError as e:
        raise ConfigError(f"opponent: {e}") from None
    if agent.player is None:
        raise ConfigError("opponent: a human cannot be trained against (use `reciprocity serve`)")
    if agent.api is not None:
        agent = dataclasses.replace(agent, api=dataclasses.replace(agent.api, on_failure="forfeit"))
    return agent


def worker_config(cfg: Config, run_dir: Path, pool: Any, opponent: Any = None, index: int = 0) -> dict[str, Any]:
    """The RolloutWorker's config: its engine, and the pool as the source of the adapter versions
    to (re)load at start, so that a restarted worker serves exactly what was published. Each worker
    has its own adapter directory: vLLM re-reads a version's files when it drops out of its cache,
    so one worker's unload must never delete what another still serves."""
    apis = {opponent.player.policy: opponent.api} if opponent is not None and opponent.api is not None else {}
    return {
        "api": apis,
        "model": str(Path(cfg.model.path).absolute()),
        "engine": engine_options(cfg, max_loras=cfg.rollout.max_loras, max_lora_rank=lora_rank_for([cfg.lora.r]),
                                 max_cpu_loras=max(cfg.rollout.max_loras, cfg.buffer.resident_max + 2),
                                 adapter_root=str(run_dir / "served-adapters" / f"worker-{index}"),
                                 probe_tolerance=cfg.rollout.probe_tolerance),
        "adapter_source": pool,
        "concurrency": cfg.rollout.concurrency,
        "engines_per_node": cfg.rollout.workers,  # engine threads "node": the cores shared among them
    }


def seed_of(cfg: Config, iteration: int, seed_group: int) -> int:
    """Common random numbers: the games of one seed group share this env seed."""
    return int(np.random.SeedSequence([cfg.seed, iteration, seed_group]).generate_state(1)[0] % (2**31))


def plan_specs(cfg: Config, run_id: str, iteration: int, pool: Any) -> list[MatchSpec]:
    """Match specs of one iteration: seats from the pool (learner seat by seed-group parity),
    seeds per seed group, baseline groups (the whole batch, or the seed group)."""
    n, size = cfg.rollout.games_per_iteration, cfg.rollout.seed_group_size
    seed_groups = [g // size for g in range(n)]
    pairings = ray.get(pool.pairings.remote(iteration, seed_groups))
    sampling = sampling_of(cfg)
    return [
        MatchSpec(
            game=cfg.game.name,
            game_id=iteration * n + g,
            group_id={"batch": 0, "seed_group": seed_groups[g], "none": iteration * n + g}[cfg.rollout.baseline],
            seed=seed_of(cfg, iteration, seed_groups[g]),
            seats=pairings[g].seats,
            options=dict(cfg.game.options),
            iteration=iteration,
            run=run_id,
            sampling=sampling,
        )
        for g in range(n)
    ]


def check_game_ids(table: Any, specs: list[MatchSpec]) -> None:
    """Every planned game came back exactly once (two seat rows per game id), and nothing else."""
    ids = np.asarray(table.column("game_id"))
    got, counts = np.unique(ids, return_counts=True)
    planned = {s.game_id for s in specs}
    lost = planned - set(got.tolist())
    extra = set(got.tolist()) - planned
    dup = got[counts != 2].tolist()
    if lost or extra or dup:
        raise TrainError(f"rollout game ids do not match the plan: lost {sorted(lost)[:8]}, unplanned "
                         f"{sorted(extra)[:8]}, not exactly two seats {dup[:8]}")


def _learner_metrics(metrics: dict[str, Any], seconds: float) -> dict[str, Any]:
    out = {f"learner/{k}": v for k, v in metrics.items() if isinstance(v, int | float)}
    out["seconds/learn"] = seconds
    return out


# -- periodic evaluation -------------------------------------------------------------------------
def eval_player(game: str, spec: str) -> PlayerSpec | None:
    """An evaluation opponent (reciprocity/agents.py): `scripted:NAME`, `base` (the model without
    adapter) or `self` (the current adapter; returned as None). Other forms belong to `reciprocity evaluate`."""
    from reciprocity.agents import AgentSpecError, parse_agent, spec_kind

    if spec_kind(spec) not in ("scripted", "base", "self"):
        raise ConfigError(f"evaluation.opponents: {spec!r} is not an opponent for evaluation during training; "
                          f"use scripted:NAME, base or self (other agents: `reciprocity evaluate`)")
    try:
        return parse_agent(spec, game).player
    except AgentSpecError as e:
        raise ConfigError(f"evaluation.opponents: {e}") from None


def _label(spec: str) -> str:
    """The opponent's name in `eval/<name>/<figure>` (a strategy's name, base, self or the spec's label)."""
    from reciprocity.agents import parse_agent

    return parse_agent(spec).name


def plan_eval_specs(cfg: Config, run_id: str, iteration: int, me: PlayerSpec) -> list[MatchSpec]:
    """`evaluation.games` games per opponent; the agent takes seat g mod 2 in game g; group = opponent."""
    ev = cfg.evaluation
    sampling = sampling_of(cfg)
    specs = []
    for j, spec in enumerate(ev.opponents):
        other = eval_player(cfg.game.name, spec) or me
        for g in range(ev.games):
            seats = (me, other) if g % 2 == 0 else (other, me)
            seed = int(np.random.SeedSequence([cfg.seed, iteration, 7, j, g]).generate_state(1)[0] % (2**31))
            specs.append(MatchSpec(game=cfg.game.name, game_id=EVAL_GAME_ID_BASE + (iteration * len(ev.opponents)
                                   + j) * ev.games + g, group_id=j, seed=seed, seats=seats,
                                   options=dict(cfg.game.options), iteration=iteration, run=run_id,
                                   sampling=sampling))
    return specs


def eval_metrics(table: Any, cfg: Config, me: PlayerSpec) -> dict[str, float]:
    """`eval/<opponent>/<figure>`: the agent's own figures (its seat in each game) against each
    opponent, and the opponent's return per round."""
    import json

    rows = table.filter(pa.compute.equal(table.column("seat"), 0)).select(
        ["group_id", "policy_name", "policy_version", "info_json"]).to_pylist()
    out: dict[str, float] = {}
    for j, spec in enumerate(cfg.evaluation.opponents):
        by_seat: list[list[GameRecord]] = [[], []]
        for r in rows:
            if r["group_id"] == j:
                mine = r["policy_name"] == me.policy and r["policy_version"] == me.version
                by_seat[0 if mine else 1].append(GameRecord.from_game_info(json.loads(r["info_json"])))
        sums: dict[str, list[float]] = {}
        for seat, records in enumerate(by_seat):
            if not records:
                continue
            for key, value in summarize(cfg.game.name, records).items():
                pair = value if isinstance(value, list) else [value, value]
                if pair[seat] is not None:
                    sums.setdefault(key, []).extend([float(pair[seat])] * len(records))
                if key == RETURN and pair[1 - seat] is not None:
                    sums.setdefault(f"opponent_{RETURN}", []).extend([float(pair[1 - seat])] * len(records))
        for key, values in sums.items():
            out[f"eval/{_label(spec)}/{key}"] = float(np.mean(values))
    return out


class Trainer:
    """The loop: plan, rollout, learn, publish, log (`step`; `steps_async` overlaps the rollout of
    k+1 with the update on k). Every call to the rollout workers goes through `self.workers`
    (actors/worker_group.py), every call to the learner ranks through `self.learners`
    (learner/learner_group.py); the pool is one actor, called here."""

    def __init__(self, cfg: Config, address: str | None = None, resume: Path | None = None) -> None:
        preflight(cfg)
        self.cfg = cfg
        self.run_dir = run_dir_of(cfg, resume)
        self.opponent = fixed_opponent(cfg) if cfg.opponent is not None else None
        self.ckpt_state: checkpoint.State | None = None
        self.ckpt_dir: Path | None = None
        if resume is not None:
            self.ckpt_dir, self.ckpt_state = checkpoint.load(self.run_dir, cfg)
        elif checkpoint.latest(self.run_dir) is not None:
            raise ConfigError(f"{self.run_dir} already holds checkpoints: pass --resume {self.run_dir} "
                              f"or choose another run_name")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.store = AdapterStore(checkpoint.adapter_store(self.run_dir))
        self._previous: str | None = None  # sha256 of the version current before the last publish
        self._logged: set[int] = set()  # adapter versions this process logged to MLflow (adapters/v<N>)
        launcher.init_ray(address)
        tags = {"model_sha": model_sha(Path(cfg.model.path)) or "unprepared", "game": cfg.game.name,
                "method": cfg.method.name}
        self.tracker = Tracker(cfg, run_id=self.ckpt_state.run_id if self.ckpt_state else None, tags=tags)
        self.tracker.log_text(Path(self._config_yaml()).read_text(), "config.yaml")
        self.history: list[dict[str, Any]] = []
        self.template = ChatTemplate.from_pretrained(str(cfg.model.path))  # decodes transcripts
        self._pending: Pending | None = None  # the async rollout in flight
        self.restores = 0
        self.workers = WorkerGroup()
        self.learners = LearnerGroup()
        self.pool: Any = None
        self.placement: launcher.Placement | None = None
        self.view: progress.Silent = progress.Silent()  # run() shows progress.RunProgress
        try:
            self._start_actors()
        except BaseException:  # nothing half-started outlives a failed start (actors, the MLflow run)
            self.tracker.finish("FAILED")
            self.close()
            raise

    def iterations(self) -> Iterator[dict[str, Any]]:
        """Run the remaining iterations (sync or async mode), yielding each one's metrics. A learner
        rank that dies is replaced and the run goes on from the last checkpoint (`_recover`)."""
        while self.iteration < self.cfg.iterations:
            try:
                if self.cfg.mode == "async" and self.cfg.max_staleness >= 1:
                    yield from self.steps_async()
                else:
                    while self.iteration < self.cfg.iterations:
                        yield self.step()
            except LearnerLost as e:
                self._recover(e)

    # -- one iteration -----------------------------------------------------------------------
    def step(self) -> dict[str, Any]:
        """One synchronous iteration: plan, rollout, learn, publish, log."""
        it = self.iteration
        t_iter = time.perf_counter()
        self.view.start_iteration(it)
        self._sync_adapters()
        specs = self.plan(it)
        self.view.phase("rollout", total=len(specs))
        shares, rollout_stats = self._finish_rollout(self._start_rollout(specs))
        _, game_metrics = self._gather(shares, specs)
        learn_metrics = self.learn(shares)
        pub = self.publish()
        return self._end_iteration(it, t_iter, {**game_metrics, **rollout_stats, **learn_metrics, **pub})

    def steps_async(self) -> Iterator[dict[str, Any]]:
        """Asynchronous iterations: rollout of k+1 (on version k) overlaps the update on k."""
        self._sync_adapters()
        pending: Pending | None = self._start_rollout(self.plan(self.iteration))
        while pending is not None:
            self._pending = pending
            it, t_iter = self.iteration, time.perf_counter()
            self.view.start_iteration(it)
            self.view.phase("rollout", total=len(pending.specs))
            shares, rollout_stats = self._finish_rollout(pending)
            self._sync_adapters()  # retire the version the finished rollout no longer needs
            _, game_metrics = self._gather(shares, pending.specs)
            t0 = time.perf_counter()
            learning = self.learners.train_step(shares)
            pending = None
            nxt = it + 1
            if nxt < self.cfg.iterations and nxt - self.version <= self.cfg.max_staleness:
                self._sync_adapters(nxt, unload=False)
                pending = self._start_rollout(self.plan(nxt))
            self._pending = pending
            self.view.phase("learn" if pending is None else "learn (next rollout running)")
            learn_metrics = _learner_metrics(self._wait_learners(learning)[0], time.perf_counter() - t0)
            pub = self.publish(unload=pending is None)
            metrics = {**game_metrics, **rollout_stats, **learn_metrics, **pub, "overlapped": int(pending is not None)}
            yield self._end_iteration(it, t_iter, metrics)
            if pending is None and self.iteration < self.cfg.iterations:
                self._sync_adapters()
                pending = self._start_rollout(self.plan(self.iteration))

    # plan
    def plan(self, iteration: int) -> list[MatchSpec]:
        """The match specs of `iteration` (seats from the pool, seeds per seed group)."""
        return plan_specs(self.cfg, self.tracker.run_id, iteration, self.pool)

    # rollout
    def _sync_adapters(self, iteration: int | None = None, unload: bool = True) -> None:
        """Every worker holds the pool's versions for `iteration` (current + resident snapshots):
        load what is missing (validated and probed); with `unload`, retire what is no longer used
        (async mode keeps the previous version while a rollout on it is still running)."""
        it = self.iteration if iteration is None else iteration
        versions: list[AdapterRef] = ray.get(self.pool.versions.remote(it))  # metadata: key, sha256, path
        self.workers.sync_adapters(versions, unload)

    def _start_rollout(self, specs: list[MatchSpec]) -> Pending:
        """Split `specs` across the workers and start playing them (non-blocking)."""
        return self.workers.start_rollout(specs, self.cfg.rollout.concurrency)

    def _finish_rollout(self, pending: Pending) -> tuple[list[Share], dict[str, Any]]:
        """Wait for a rollout: (object ref of a record batch, its summary) per group of games (a
        worker that died is restarted by Ray and its share replayed), and the rollout's figures."""
        shares, replays = self.workers.finish_rollout(pending, poll=self._show_rollout, warn=self.view.warn,
                                                      poll_s=progress.POLL_S)
        stats: dict[str, Any] = {"seconds/rollout": time.perf_counter() - pending.t0, "rollout/replays": replays}
        lasts = [s["last"] for s in self.workers.stats()]
        stats["rollout/tokens_per_s"] = sum(s.get("tokens_per_s", 0.0) for s in lasts)
        stats["rollout/worker_seconds_max"] = max((s.get("seconds", 0.0) for s in lasts), default=0.0)
        forfeits = sum(s.get("api_forfeits", 0.0) for s in lasts)
        if forfeits:
            stats["rollout/api_forfeits"] = forfeits
            self.view.warn(f"{int(forfeits)} API opponent decision(s) forfeited (the endpoint kept failing)")
        return shares, stats

    def _show_rollout(self) -> None:
        """The workers' summed progress on the view (polled while a rollout runs)."""
        with contextlib.suppress(Exception):  # progress is for show; a dead worker's future raises in the group
            p = progress.sum_progress(self.workers.progress(timeout=progress.POLL_S))
            self.view.update(completed=p["games"], total=p["planned"], detail=progress.rollout_detail(p))
        self.view.tick()

    def _gather(self, shares: list[Share], specs: list[MatchSpec]) -> tuple[Any, dict[str, Any]]:
        """The iteration's summary table (no token columns: those stay behind the refs, for the
        learner) and its game figures (and the game-id check); the pool's Elo from the summaries."""
        t0 = time.perf_counter()
        table = trajectories.concat_summaries([s for _, s in shares])
        check_game_ids(table, specs)
        game_metrics = iteration_metrics(table, self.cfg.game.name)
        self.pool.record_batch.remote(table)
        return table, {**game_metrics, "seconds/transfer": time.perf_counter() - t0}

    # learn
    def learn(self, shares: list[Share]) -> dict[str, Any]:
        """One optimizer step of every learner rank on the batches' refs and summaries (a rank resolves
        only the refs of the batches it is dealt)."""
        t0 = time.perf_counter()
        self.view.phase("learn")
        metrics = self._wait_learners(self.learners.train_step(shares))[0]
        return _learner_metrics(metrics, time.perf_counter() - t0)

    def _wait_learners(self, futures: list[ray.ObjectRef]) -> list[Any]:
        """The learner ranks' train_step results, showing rank 0's micro-batches while they run."""
        return self.learners.wait(futures, poll=self._show_learning, poll_s=progress.POLL_S)

    def _show_learning(self) -> None:
        """Rank 0's micro-batches on the view (polled while a step runs)."""
        with contextlib.suppress(Exception):  # for show only: a lost rank raises in the group's wait
            p = self.learners.progress(timeout=progress.POLL_S)
            if p["micro_batches"]:
                self.view.update(completed=p["micro_batches_done"], total=p["micro_batches"],
                                 detail=f"{p['micro_batches_done']}/{p['micro_batches']} micro-batches")
        self.view.tick()

    # publish
    def publish(self, unload: bool = True) -> dict[str, Any]:
        """Export version k+1, make it the pool's current (snapshot on cadence), serve it."""
        t0 = time.perf_counter()
        self.view.phase("publish", detail=f"version {self.version + 1} to {len(self.workers)} worker(s)")
        self.version += 1
        previous = ray.get(self.pool.versions.remote())[0]
        version = self._export(self.version)
        froze = ray.get(self.pool.set_current.remote(version, self.iteration + 1))
        self.iteration += 1
        self._previous = previous.sha256
        self._sync_adapters(unload=unload)
        errors = self.workers.probe_errors(version.key)
        self._collect_adapters()
        if froze:
            self.log_adapter(version)
        return {"seconds/publish": time.perf_counter() - t0, "version": self.version, "snapshot": int(froze),
                "probe_error": max(errors) if errors else 0.0}

    def _export(self, version: int) -> AdapterRef:
        """Rank 0's export of the current adapter as `version`, written into the adapter store: the
        driver gets its AdapterRef only."""
        return self.learners.export(version, str(self.store.root))

    def _collect_adapters(self) -> None:
        """Delete the stored adapter bytes that neither the pool, nor a kept checkpoint, nor the
        version current just before the last publish (async rollouts may still read it) refers to."""
        keep = {r.sha256 for r in ray.get(self.pool.adapters.remote()).values()}
        keep |= checkpoint.referenced_blobs(self.run_dir) | ({self._previous} if self._previous else set())
        self.store.collect(keep)

    # log
    def _end_iteration(self, it: int, t_iter: float, metrics: dict[str, Any]) -> dict[str, Any]:
        """Periodic evaluation, MLflow, history, checkpoint (the iteration counter is it + 1)."""
        ev = self.cfg.evaluation
        if ev.every and self.iteration % ev.every == 0:
            metrics.update(self.evaluate())
        metrics["seconds/iteration"] = time.perf_counter() - t_iter
        self.tracker.log_metrics(metrics, step=it)
        record = {"iteration": it, **metrics}
        self.history.append(record)
        if self.cfg.checkpoint.every and self.iteration % self.cfg.checkpoint.every == 0:
            self.save_checkpoint()
        return record

    # -- evaluation and artifacts ------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        """The current adapter (untrained seat) against each evaluation opponent, on the workers."""
        t0 = time.perf_counter()
        cfg = self.cfg
        current = ray.get(self.pool.versions.remote(self.iteration))[0]
        me = PlayerSpec("llm", current.name, current.version, adapter=current.key)
        specs = plan_eval_specs(cfg, self.tracker.run_id, self.iteration, me)
        self.view.phase("evaluate", total=len(specs))
        shares, _ = self._finish_rollout(self._start_rollout(specs))
        table = trajectories.concat(ray.get([r for r, _ in shares]))  # the transcripts need the tokens
        check_game_ids(table, specs)
        out = eval_metrics(table, cfg, me)
        page = transcripts_html(table, self.template.decode, f"{cfg.run_name}: evaluation at iteration "
                                f"{self.iteration} ({current.key})", max_games=2 * len(cfg.evaluation.opponents))
        self.tracker.log_text(page, f"transcripts/eval-it{self.iteration:04d}.html")
        self.log_adapter(current)  # the evaluated version can be played again: run:ID@N
        out["seconds/evaluate"] = time.perf_counter() - t0
        return out

    def log_adapter(self, version: AdapterRef) -> None:
        """The adapter files of `version` as MLflow artifacts `adapters/v<N>/` (for `run:ID@N` specs),
        copied from the adapter store (file to file: the driver does not read the adapter). The two
        PEFT files only: not the store's per-node verification records next to them. Logged for
        every buffer snapshot, every evaluated version and the last one; once per version."""
        if version.version in self._logged:
            return
        self._logged.add(version.version)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            self.tracker.log_artifact(Path(version.uri) / name, f"adapters/v{version.version}")

    def log_curves(self) -> None:
        """Re-plot the run's curves (the whole MLflow history, so a resumed run plots all of it)."""
        keys = [*CURVES.get(self.cfg.game.name, ()), RETURN, *(SIDES if self.cfg.opponent else ())]
        keys += [f"eval/{_label(s)}/{RETURN}" for s in self.cfg.evaluation.opponents]
        history = self.tracker.history(keys)
        with tempfile.TemporaryDirectory() as tmp:
            png = plot_curves(history, self.cfg.game.name, Path(tmp) / "curves.png",
                              title=f"{self.cfg.run_name}: {self.cfg.game.name} / {self.cfg.method.name}")
            self.tracker.log_artifact(png, "plots")

    # -- checkpoints and recovery ------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        self.view.phase("checkpoint")
        tmp = checkpoint.begin(self.run_dir, self.iteration)
        self.learners.save_checkpoint(str(tmp / "learner"))
        checkpoint.save_pool(tmp, ray.get(self.pool.state_dict.remote()), ray.get(self.pool.adapters.remote()))
        state = checkpoint.State(self.iteration, self.version, self.tracker.run_id, self.cfg.fingerprint(),
                                 rng={"seed": self.cfg.seed})
        path = checkpoint.commit(tmp, state, self.cfg, self.cfg.checkpoint.keep)
        self._collect_adapters()  # the versions only the pruned checkpoints referred to
        self.tracker.set_tag("last_checkpoint", str(path))
        self.log_curves()
        return path

    def _restore(self, ckpt_dir: Path, state: checkpoint.State) -> None:
        """Learner ranks and pool from a checkpoint; the iteration and version counters with them."""
        self.learners.load_checkpoint(str(ckpt_dir / "learner"))
        self.version, self.iteration = state.version, state.iteration
        pool_state, adapters = checkpoint.load_pool(ckpt_dir, verify=False)  # workers check the sha256 on load
        adapters = {k: self.store.adopt(r) for k, r in adapters.items()}  # an older checkpoint's bytes move in
        ray.get(self.pool.load_state_dict.remote(pool_state, adapters))

    def _recover(self, lost: LearnerLost) -> None:
        """Replace every learner rank (a ZeRO group cannot lose one) and restore learners, pool and
        counters from the last checkpoint; the iterations after it are re-run and re-logged at the
        same MLflow steps. The workers keep their engines and resync their adapters."""
        found = checkpoint.latest(self.run_dir)
        if found is None:
            raise TrainError(f"{lost}; no checkpoint to restore from (set checkpoint.every)") from None
        console.log(f"[yellow]{lost}: restoring the learners from {found.name}")
        t0 = time.perf_counter()
        if self._pending is not None:  # let the orphaned rollout end before its adapters are retired
            self.workers.settle(self._pending, timeout_s=600)
            self._pending = None
        self.learners.kill()
        self._start_learners()
        ckpt_dir, state = checkpoint.load(self.run_dir, self.cfg)
        self._restore(ckpt_dir, state)
        self._sync_adapters()
        self.history = [h for h in self.history if h["iteration"] < self.iteration]
        self.restores += 1
        self.tracker.set_tag("learner_restores", str(self.restores))
        self.tracker.log_metrics({"recovery/seconds": time.perf_counter() - t0, "recovery/to_iteration":
                                  self.iteration}, step=self.iteration)

    def _config_yaml(self) -> Path:
        import yaml

        p = self.run_dir / "config.yaml"
        p.write_text(yaml.safe_dump(self.cfg.model_dump(), sort_keys=False))
        return p

    # -- the actors --------------------------------------------------------------------------
    def _start_actors(self) -> None:
        """Placement groups, the pool, the rollout workers (their engines boot from here on), the
        learner ranks, the pool's version 0 (or the checkpoint resumed), then the workers loading the
        pool's versions; where each one runs. The engines' boot overlaps the learners' start: on
        CPU each takes most of a minute, and neither needs the other until the first version exists."""
        cfg = self.cfg
        self.placement = launcher.place(cfg)
        self.pool = launcher.actor_class(OpponentPool).options(num_cpus=0).remote(
            snapshot_every=cfg.buffer.snapshot_every, max_resident=cfg.buffer.resident_max,
            p_buffer=cfg.buffer.p_snapshot, use_buffer=cfg.buffer.enabled, seed=cfg.seed,
            max_snapshots=cfg.buffer.max_snapshots)
        indices = range(cfg.rollout.workers)
        self.workers = WorkerGroup.create(
            launcher.actor_class(RolloutWorker), [self.placement.worker_options(i, cfg) for i in indices],
            [worker_config(cfg, self.run_dir, self.pool, self.opponent, index=i) for i in indices],
            max_restarts=launcher.WORKER_MAX_RESTARTS)
        self._start_learners()
        self.version, self.iteration = 0, 0
        if self.ckpt_state is not None and self.ckpt_dir is not None:
            self._restore(self.ckpt_dir, self.ckpt_state)
        else:
            ray.get(self.pool.set_current.remote(self._export(self.version), 0))
            if self.opponent is not None:
                ray.get(self.pool.set_fixed.remote(self.opponent.kind if self.opponent.kind in ("scripted", "api",
                        "base") else "adapter", self.opponent.player.policy,
                        None if self.opponent.adapter is None else self.store.put(self.opponent.adapter)))
        self.workers.wait_ready()
        self._report_placement()

    def _start_learners(self) -> None:
        cfg = self.cfg
        self.learners = LearnerGroup.start(launcher.learner_class(Learner), learner_config(cfg),
                                           [self.placement.learner_options(r, cfg) for r in range(cfg.learner.ranks)],
                                           progress_group=launcher.PROGRESS_GROUP)

    def _report_placement(self) -> None:
        table = Table(title="placement")
        for col in ("actor", "node ip", "node id", "pid", "malloc", "MKL CNR"):
            table.add_column(col)
        self.nodes: dict[str, str] = {}
        wanted = {"rollout worker": self.placement.worker_malloc, "learner rank": self.placement.learner_malloc}
        cnr = os.environ.get("MKL_CBWR", "")  # the driver's (actors.device.reproducible_blas), passed to the actors
        for role, i, where in [*(("rollout worker", i, w) for i, w in enumerate(self.workers.nodes())),
                               *(("learner rank", r, a) for r, a in enumerate(self.learners.nodes()))]:
            name = f"{role} {i}"
            self.nodes[name] = where["node_id"]
            table.add_row(name, where["ip"], where["node_id"][:12], where["pid"], where["allocator"],
                          "strict" if where["mkl_cbwr"] == device.REPRODUCIBLE_BLAS_ENV["MKL_CBWR"]
                          else where["mkl_cbwr"] or "off")
            if where["allocator"] != wanted[role]:  # e.g. Ray installed elsewhere on that node: LD_PRELOAD ignored
                console.print(f"[yellow]warning:[/] {name} runs on {where['allocator']}, not the {wanted[role]} "
                              "its config asks for (memory and speed only)")
            if where["mkl_cbwr"] != cnr:
                console.print(f"[yellow]warning:[/] {name} runs MKL with MKL_CBWR={where['mkl_cbwr']!r}, not the "
                              f"driver's {cnr!r}: its numbers may not repeat bit for bit")
        console.print(table)

    def close(self) -> None:
        self.workers.close()
        self.learners.kill()
        if self.pool is not None:
            with contextlib.suppress(Exception):
                ray.kill(self.pool)
        if self.placement is not None:
            self.placement.remove()


def run_dir_of(cfg: Config, resume: Path | None = None) -> Path:
    """Where a run (new or resumed) keeps its checkpoints, config and logs."""
    return (Path(resume) if resume else Path(cfg.runs_dir) / cfg.run_name).absolute()


def run(cfg: Config, address: str | None = None, resume: Path | None = None,
        out: Any = None) -> list[dict[str, Any]]:
    """Train to `cfg.iterations`, showing live progress; `out`: the stream for the run's own lines
    (default stdout; `reciprocity train` passes the real stdout while library logs go to a file)."""
    if out is not None:
        console.file = out
    try:
        return _run(cfg, address, resume)
    finally:
        console.file = None  # back to sys.stdout


def _run(cfg: Config, address: str | None, resume: Path | None) -> list[dict[str, Any]]:
    starting = "starting Ray, the learner and the rollout workers (about a minute on CPU)"
    if not console.is_terminal:  # a status spinner shows nothing there
        console.print(starting, highlight=False)
    with progress.spinner(console, starting):
        trainer = Trainer(cfg, address=address, resume=resume)
    status = "FAILED"
    previous = _stop_on_sigterm()
    try:
        trainer.view = view = progress.RunProgress(console, cfg.iterations, trainer.iteration)
        try:
            for m in trainer.iterations():
                view.end_iteration(_progress_line(m))
                notes = progress.describe(m)
                if notes:
                    view.warn(notes)
            if not cfg.checkpoint.every or trainer.iteration % cfg.checkpoint.every:
                trainer.save_checkpoint()
            view.phase("finish", detail="last adapter to MLflow")
            trainer.log_adapter(ray.get(trainer.pool.versions.remote(trainer.iteration))[0])
        finally:
            view.close()
            trainer.view = progress.Silent()
        status = "FINISHED"
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (`kill`, `timeout`)
        status = "KILLED"
        console.print(f"[yellow]stopped at iteration {trainer.iteration}: the last checkpoint resumes it "
                      f"(--resume {trainer.run_dir})")
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        trainer.tracker.finish(status)
        with progress.spinner(console, "shutting down the workers"):
            trainer.close()
    _summary(cfg, trainer)
    return trainer.history


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _stop_on_sigterm() -> Any:
    """Make SIGTERM stop the run as Ctrl-C does (MLflow status KILLED, the actors and their engines
    stopped, the local Ray shut down); installed after Ray's own handler. Returns the handler it
    replaced, or None off the main thread (where no handler can be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _interrupt)


def _progress_line(m: dict[str, Any]) -> str:
    parts = []
    for key, label in (("cooperation_rate", "coop"), ("p_coop_given_opp_coop", "P(C|C)"),
                       ("p_coop_given_opp_defect", "P(C|D)"), ("efficiency", "eff"),
                       ("return_per_round", "ret/round"), ("seconds/iteration", "s")):
        if key in m:
            parts.append(f"{label} {m[key]:.3g}")
    return "  ".join(parts)


def _summary(cfg: Config, trainer: Trainer) -> None:
    table = Table(title=f"{cfg.run_name}: {cfg.game.name} / {cfg.method.name}")
    for col in ("it", "coop", "P(C|C)", "P(C|D)", "ret/round", "tokens", "s/it"):
        table.add_column(col, justify="right")
    for h in trainer.history:
        def f(key: str, h: dict[str, Any] = h) -> str:
            return f"{h[key]:.3f}" if key in h else "-"
        table.add_row(str(h["iteration"]), f("cooperation_rate"), f("p_coop_given_opp_coop"),
                      f("p_coop_given_opp_defect"), f("return_per_round"), str(h.get("generated_tokens", "-")),
                      f"{h['seconds/iteration']:.1f}")
    console.print(table)
    console.print(f"MLflow run {trainer.tracker.run_id} in {trainer.tracker.uri}")
    console.print(f"open the UI:  make mlflow-ui   (or: mlflow ui --backend-store-uri {trainer.tracker.uri})")
    console.print(f"checkpoints:  {checkpoint.checkpoints_dir(trainer.run_dir)}")


__all__ = ["LearnerLost", "TrainError", "Trainer", "WorkerError", "run"]
