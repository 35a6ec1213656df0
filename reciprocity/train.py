"""The training driver: one process that owns the loop, the config and the MLflow run.

One iteration (synchronous mode), as in sysdesign/architecture.md:
  1. plan: the opponent pool assigns seats for N games (learner seat by group parity; opponent a
     buffer snapshot with probability p, else a frozen copy of the current adapter), seeds per
     seed group (common random numbers);
  2. rollout: match specs are split across the workers, which play them concurrently on their
     engines and return Arrow record batches as object refs;
  3. learn: every learner rank receives the refs and takes one optimizer step;
  4. publish: rank 0 exports version k+1; every worker loads it, probes it and serves it; the
     pool records it and freezes a snapshot every K iterations;
  5. log and checkpoint.
Every generated token carries its behaviour version and the learner reports staleness; the
asynchronous mode (rollout of k+1 overlapping the update on k, bounded by `max_staleness`) is not
implemented yet and is refused by `preflight`.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import envs
from actors import trajectories
from actors.adapters import AdapterVersion
from actors.pool import OpponentPool
from actors.worker import MatchSpec, RolloutWorker, SamplingSpec
from learner.learner import Learner
from reciprocity import checkpoint, launcher
from reciprocity.config import Config, ConfigError
from reciprocity.metrics import iteration_metrics
from reciprocity.models import model_sha
from reciprocity.tracking import Tracker

LEARNER_NAME = "learner"
console = Console()


class TrainError(RuntimeError):
    """The run cannot start or continue (the message says why)."""


def preflight(cfg: Config) -> None:
    """Everything that can be checked before a process starts."""
    try:
        envs.make(cfg.game.name, **cfg.game.options)
    except envs.EnvConfigError as e:
        raise ConfigError(f"game.options: {e}") from None
    if cfg.mode == "async":
        raise ConfigError("mode: 'async' (rollout overlapping the update, bounded by max_staleness) is not "
                          "implemented yet; use mode: sync")
    if cfg.evaluation.every:
        raise ConfigError("evaluation.every: periodic cross-play evaluation during training is not implemented "
                          "yet; set it to 0")
    model = Path(cfg.model.path)
    if not (model / "config.json").is_file():
        raise ConfigError(f"model.path: no Hugging Face model at {model} (run `make model`, or set model.path)")


def worker_config(cfg: Config, run_dir: Path, pool: Any) -> dict[str, Any]:
    """The RolloutWorker's config: its engine, and the pool as the source of the adapter versions
    to (re)load at start, so that a restarted worker serves exactly what was published."""
    return {
        "model": str(Path(cfg.model.path).absolute()),
        "engine": {
            "max_loras": cfg.rollout.max_loras,
            "max_cpu_loras": max(cfg.rollout.max_loras, cfg.buffer.resident_max + 2),
            "max_lora_rank": cfg.lora.r,
            "max_model_len": cfg.model.max_model_len,
            "kv_cache_gib": cfg.rollout.kv_cache_gib,
            "adapter_root": str(run_dir / "served-adapters"),
            "probe_tolerance": cfg.rollout.probe_tolerance,
            "seed": cfg.seed,
        },
        "adapter_source": pool,
        "concurrency": cfg.rollout.concurrency,
    }


def learner_config(cfg: Config) -> dict[str, Any]:
    return {
        "model": str(Path(cfg.model.path).absolute()),
        "lora": cfg.lora.model_dump(),
        "method": cfg.method.model_dump(exclude={"name"}) | {"name": cfg.method.name},
        # torch intra-op threads = the CPUs Ray gives the rank (oversubscribing 2 cores costs ~20x)
        "learner": cfg.learner.model_dump() | {"num_threads": max(1, int(cfg.learner.cpus_per_rank))},
        "seed": cfg.seed,
        "name": LEARNER_NAME,
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
    sampling = SamplingSpec(temperature=cfg.rollout.temperature, max_tokens=cfg.rollout.max_tokens or None,
                            free_samples=cfg.rollout.free_samples)
    return [
        MatchSpec(
            game=cfg.game.name,
            game_id=iteration * n + g,
            group_id=0 if cfg.rollout.baseline == "batch" else seed_groups[g],
            seed=seed_of(cfg, iteration, seed_groups[g]),
            seats=pairings[g].seats,
            options=dict(cfg.game.options),
            iteration=iteration,
            run=run_id,
            sampling=sampling,
        )
        for g in range(n)
    ]


class Trainer:
    def __init__(self, cfg: Config, address: str | None = None, resume: Path | None = None) -> None:
        preflight(cfg)
        self.cfg = cfg
        self.run_dir = (Path(resume) if resume else Path(cfg.runs_dir) / cfg.run_name).absolute()
        self.ckpt_state: checkpoint.State | None = None
        self.ckpt_dir: Path | None = None
        if resume is not None:
            self.ckpt_dir, self.ckpt_state = checkpoint.load(self.run_dir, cfg)
        elif checkpoint.latest(self.run_dir) is not None:
            raise ConfigError(f"{self.run_dir} already holds checkpoints: pass --resume {self.run_dir} "
                              f"or choose another run_name")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        launcher.init_ray(address)
        tags = {"model_sha": model_sha(Path(cfg.model.path)) or "unprepared", "game": cfg.game.name,
                "method": cfg.method.name}
        self.tracker = Tracker(cfg, run_id=self.ckpt_state.run_id if self.ckpt_state else None, tags=tags)
        self.tracker.log_text(Path(self._config_yaml()).read_text(), "config.yaml")
        self.history: list[dict[str, Any]] = []
        self._start_actors()

    def _config_yaml(self) -> Path:
        import yaml

        p = self.run_dir / "config.yaml"
        p.write_text(yaml.safe_dump(self.cfg.model_dump(), sort_keys=False))
        return p

    # -- actors ------------------------------------------------------------------------------
    def _start_actors(self) -> None:
        cfg = self.cfg
        self.placement = launcher.place(cfg)
        learner_cls = launcher.actor_class(Learner)
        lcfg = learner_config(cfg)
        rank0 = learner_cls.options(**self.placement.learner_options(0, cfg)).remote(
            lcfg, rank=0, world_size=cfg.learner.ranks)
        master = ray.get(rank0.master_address.remote())
        self.learners = [rank0] + [
            learner_cls.options(**self.placement.learner_options(r, cfg)).remote(
                lcfg, rank=r, world_size=cfg.learner.ranks, master=master)
            for r in range(1, cfg.learner.ranks)
        ]
        ray.get([a.ready.remote() for a in self.learners])
        self.version, self.iteration = 0, 0
        self.pool = launcher.actor_class(OpponentPool).options(num_cpus=0).remote(
            snapshot_every=cfg.buffer.snapshot_every, max_resident=cfg.buffer.resident_max,
            p_buffer=cfg.buffer.p_snapshot, use_buffer=cfg.buffer.enabled, seed=cfg.seed)
        if self.ckpt_state is not None and self.ckpt_dir is not None:
            ray.get([a.load_checkpoint.remote(str(self.ckpt_dir / "learner")) for a in self.learners])
            self.version, self.iteration = self.ckpt_state.version, self.ckpt_state.iteration
            state, adapters = checkpoint.load_pool(self.ckpt_dir)
            ray.get(self.pool.load_state_dict.remote(state, adapters))
        else:
            ray.get(self.pool.set_current.remote(self._export(self.version), 0))
        worker_cls = launcher.actor_class(RolloutWorker)
        wcfg = worker_config(cfg, self.run_dir, self.pool)
        self.workers = [worker_cls.options(**self.placement.worker_options(i, cfg)).remote(wcfg)
                        for i in range(cfg.rollout.workers)]
        ray.get([w.ready.remote() for w in self.workers])
        self._report_placement()

    def _export(self, version: int) -> AdapterVersion:
        """Rank 0's export of the current adapter as `version` (every rank joins: ZeRO-3 gathers)."""
        return ray.get([a.export.remote(version) for a in self.learners])[0]

    def _report_placement(self) -> None:
        table = Table(title="placement")
        for col in ("actor", "node ip", "node id", "pid"):
            table.add_column(col)
        self.nodes: dict[str, str] = {}
        for name, actor in [*((f"rollout worker {i}", w) for i, w in enumerate(self.workers)),
                            *((f"learner rank {r}", a) for r, a in enumerate(self.learners))]:
            where = launcher.node_of(actor)
            self.nodes[name] = where["node_id"]
            table.add_row(name, where["ip"], where["node_id"][:12], where["pid"])
        console.print(table)

    # -- one iteration -----------------------------------------------------------------------
    def _sync_adapters(self) -> None:
        """Every worker holds exactly the pool's versions for this iteration (current + resident
        snapshots): load what is missing (validated and probed), retire what is no longer used."""
        versions: list[AdapterVersion] = ray.get(self.pool.versions.remote(self.iteration))
        want = {v.key for v in versions}
        for w in self.workers:
            have = set(ray.get(w.adapters.remote()))
            ray.get([w.load_adapter.remote(v) for v in versions if v.key not in have])
            ray.get([w.unload_adapter.remote(k) for k in have - want])

    def rollout(self, it: int) -> tuple[list[ray.ObjectRef], dict[str, Any]]:
        cfg = self.cfg
        t0 = time.perf_counter()
        self._sync_adapters()
        specs = plan_specs(cfg, self.tracker.run_id, it, self.pool)
        chunks = [specs[i::len(self.workers)] for i in range(len(self.workers))]
        results = ray.get([w.run.remote(chunk, cfg.rollout.concurrency)
                           for w, chunk in zip(self.workers, chunks, strict=True) if chunk])
        refs = [ref for batch_refs in results for ref in batch_refs]
        stats: dict[str, Any] = {"seconds/rollout": time.perf_counter() - t0}
        lasts = [s["last"] for s in ray.get([w.stats.remote() for w in self.workers])]
        stats["rollout/tokens_per_s"] = sum(s.get("tokens_per_s", 0.0) for s in lasts)
        stats["rollout/worker_seconds_max"] = max((s.get("seconds", 0.0) for s in lasts), default=0.0)
        return refs, stats

    def learn(self, refs: list[ray.ObjectRef]) -> dict[str, Any]:
        t0 = time.perf_counter()
        metrics = ray.get([a.train_step.remote(refs) for a in self.learners])[0]
        out = {f"learner/{k}": v for k, v in metrics.items() if isinstance(v, int | float)}
        out["seconds/learn"] = time.perf_counter() - t0
        return out

    def publish(self) -> dict[str, Any]:
        """Export version k+1, make it the pool's current (snapshot on cadence), serve it."""
        t0 = time.perf_counter()
        self.version += 1
        version = self._export(self.version)
        froze = ray.get(self.pool.set_current.remote(version, self.iteration + 1))
        self.iteration += 1
        self._sync_adapters()
        errors = [ray.get(w.probe_error.remote(version.key)) for w in self.workers]
        return {"seconds/publish": time.perf_counter() - t0, "version": self.version, "snapshot": int(froze),
                "probe_error": max(errors) if errors else 0.0}

    def step(self) -> dict[str, Any]:
        it = self.iteration
        t_iter = time.perf_counter()
        refs, rollout_stats = self.rollout(it)
        t0 = time.perf_counter()
        table = trajectories.concat(ray.get(refs))
        game_metrics = iteration_metrics(table, self.cfg.game.name)
        self.pool.record_batch.remote(table)
        transfer = time.perf_counter() - t0
        learn_metrics = self.learn(refs)
        pub = self.publish()
        metrics = {**game_metrics, **rollout_stats, **learn_metrics, **pub, "seconds/transfer": transfer}
        metrics["seconds/iteration"] = time.perf_counter() - t_iter
        self.tracker.log_metrics(metrics, step=it)
        self.history.append({"iteration": it, **metrics})
        if self.cfg.checkpoint.every and self.iteration % self.cfg.checkpoint.every == 0:
            self.save_checkpoint()
        return metrics

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        tmp = checkpoint.begin(self.run_dir, self.iteration)
        ray.get([a.save_checkpoint.remote(str(tmp / "learner")) for a in self.learners])
        checkpoint.save_pool(tmp, ray.get(self.pool.state_dict.remote()), ray.get(self.pool.adapters.remote()))
        state = checkpoint.State(self.iteration, self.version, self.tracker.run_id, self.cfg.fingerprint(),
                                 rng={"seed": self.cfg.seed})
        path = checkpoint.commit(tmp, state, self.cfg, self.cfg.checkpoint.keep)
        self.tracker.set_tag("last_checkpoint", str(path))
        return path

    def close(self) -> None:
        for w in self.workers:
            with contextlib.suppress(Exception):  # a dead worker needs no shutdown
                ray.get(w.shutdown.remote(), timeout=30)
            ray.kill(w)
        for a in [*self.learners, self.pool]:
            ray.kill(a)
        self.placement.remove()


def run(cfg: Config, address: str | None = None, resume: Path | None = None) -> list[dict[str, Any]]:
    trainer = Trainer(cfg, address=address, resume=resume)
    status = "FAILED"
    try:
        with Progress(TextColumn("[bold]iteration"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), TextColumn("{task.description}"), console=console) as progress:
            task = progress.add_task("", total=cfg.iterations, completed=trainer.iteration)
            while trainer.iteration < cfg.iterations:
                m = trainer.step()
                line = _progress_line(m)
                progress.update(task, advance=1, description=line)
                console.log(f"it {trainer.iteration - 1}: {line}")
        if not cfg.checkpoint.every or trainer.iteration % cfg.checkpoint.every:
            trainer.save_checkpoint()
        status = "FINISHED"
    finally:
        trainer.tracker.finish(status)
        trainer.close()
    _summary(cfg, trainer)
    return trainer.history


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


__all__ = ["TrainError", "Trainer", "run"]
