"""Cross-play evaluation: every ordered pair of agents (and each agent against itself) plays
`games` games; per pair the game's figures (envs.metrics.summarize), per agent its exploitability.

Entry points:
- `evaluate(game, agents, games, ...)` -> the result dict (and evaluation.json, heatmap.png and an
  MLflow run, see reciprocity/evaluation_report.py). `agents` are spec strings (reciprocity/agents.py)
  or `Agent`s. `worker` reuses a rollout worker: a rollout-worker actor handle (the training driver's)
  or a plain `RolloutWorker` not yet started; with None one is built here when a seat needs an
  engine and shut down at the end. Scripted-only matrices need no worker: they run through
  `envs.loop.play_scripted` (microseconds per round).
- `evaluate_async(...)`: the same, awaitable. A plain RolloutWorker on vLLM is bound to the event
  loop its engine started on: once started, drive it only with `await evaluate_async(...)` there.
- `play_pairs(...)`: the chosen ordered pairs only (what `reciprocity play` uses for LLM seats).

Game i of every pair uses env seed `seed + i` (common random numbers across pairs). Sampling is the
config's `rollout` section (temperature, max_tokens, free_samples). The definitions of the return
matrix and of exploitability are in sysdesign/evaluation.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pyarrow as pa

import envs
from actors.trajectories import concat
from actors.vllm_engine import lora_rank_for
from actors.worker import MatchSpec, RolloutWorker, SamplingSpec
from envs.loop import play_scripted
from envs.metrics import summarize
from reciprocity.agents import Agent, parse_agent, resolve
from reciprocity.config import Config
from reciprocity.metrics import game_records, iteration_metrics

# The reference exploiter per game: the greedy strategy naive RL converges to; in Trust-and-Split the
# liar, which also claims the upper hand to make a trusting opponent yield.
EXPLOITER = {"ipd": "always_defect", "split_nocomm": "greedy", "trust_and_split": "liar"}
ROLLOUT_KEYS = ("generated_tokens", "resample_rate", "guided_rate")

Pair = tuple[int, int]


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[TextIO]:
    """Route the process's stdout (fd 1, which vLLM's logger and engine processes write to) to
    stderr while an engine runs, so that a command's stdout carries only its result (`--json`).
    A quiet command (reciprocity.quiet: not --verbose) sends both to its log file instead. Yields
    the real stderr, for the command's own progress lines."""
    from reciprocity import quiet

    if quiet.log_file() is not None:
        print(f"library logs: {quiet.log_file()}", file=sys.stderr, flush=True)
        sys.stderr.flush()
        with open(os.dup(2), "w", buffering=1) as err, quiet.library_logs_to(quiet.log_file()):
            yield err
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield sys.stderr
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def with_exploiter(game: str, agents: list[Agent]) -> list[Agent]:
    """Append the game's reference exploiter (EXPLOITER) unless it is already among the agents."""
    name = EXPLOITER[game]
    if any(a.kind == "scripted" and a.player is not None and a.player.policy == name for a in agents):
        return agents
    return [*agents, parse_agent(f"scripted:{name}", game)]


def unique_names(agents: Sequence[Agent]) -> list[str]:
    """Agent labels, made unique with #2, #3 ... (the same spec may be listed twice)."""
    seen: dict[str, int] = {}
    names = []
    for a in agents:
        seen[a.name] = seen.get(a.name, 0) + 1
        names.append(a.name if seen[a.name] == 1 else f"{a.name}#{seen[a.name]}")
    return names


def worker_config(cfg: Config, agents: Sequence[Agent]) -> dict[str, Any]:
    """A RolloutWorker config for these agents: vLLM sized to their adapters (no engine at all
    when no seat needs one) and their API endpoints."""
    adapters = {a.adapter.key: a.adapter for a in agents if a.adapter is not None}
    config: dict[str, Any] = {
        "model": str(Path(cfg.model.path).absolute()),
        "engine": engine_options(cfg, max_loras=max(1, len(adapters)),
                                 max_lora_rank=lora_rank_for(int(v.config.get("r", 8)) for v in adapters.values())),
        "adapters": list(adapters.values()),
        "api": {a.player.policy: _asdict(a.api) for a in agents if a.api is not None and a.player is not None},
        "concurrency": cfg.rollout.concurrency,
    }
    if not any(a.needs_engine for a in agents):
        config["engine"] = None  # actors.engine.NoEngine
    return config


def _asdict(api: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(api)


async def _call(worker: Any, method: str, *args: Any) -> Any:
    """A method of a plain RolloutWorker (async or not), or of a rollout-worker actor handle."""
    fn = getattr(worker, method)
    out = fn.remote(*args) if hasattr(fn, "remote") else fn(*args)
    return await out if inspect.isawaitable(out) else out


def engine_options(cfg: Config, **sizing: Any) -> dict[str, Any]:
    """VLLMEngine keyword arguments of a rollout worker from the config (context length, KV cache,
    seed, threads, KV block size) plus the caller's LoRA sizing (max_loras, max_lora_rank, ...): the one place
    engines are sized."""
    return {"max_model_len": cfg.model.max_model_len, "kv_cache_gib": cfg.rollout.kv_cache_gib, "seed": cfg.seed,
            "threads": engine_threads(cfg),
            "block_size": None if cfg.rollout.block_size == "auto" else cfg.rollout.block_size, **sizing}


def engine_threads(cfg: Config) -> int | str:
    """An engine's torch threads: the explicit count; in sync mode "node" (the worker's node's cores
    shared among the workers: the learner idles while the engine rolls out); in async mode the CPUs
    Ray gives the worker, because there the learner learns beside it."""
    threads = cfg.rollout.engine_threads
    if threads != "auto":
        return threads
    return "node" if cfg.mode == "sync" else max(1, int(cfg.rollout.cpus_per_worker))


def sampling_of(cfg: Config) -> SamplingSpec:
    r = cfg.rollout
    return SamplingSpec(temperature=r.temperature, max_tokens=r.max_tokens or None, free_samples=r.free_samples,
                        free_sample_match=r.free_sample_match)


def pair_summary(game: str, table: pa.Table) -> dict[str, Any]:
    """The game's figures of one ordered pair (as `reciprocity play --json`) plus rollout counts."""
    out = summarize(game, game_records(table))
    counts = iteration_metrics(table, game)
    out.update({k: counts[k] for k in ROLLOUT_KEYS if k in counts})
    return out


async def play_pairs(
    game: str,
    agents: Sequence[Agent],
    pairs: Sequence[Pair],
    games: int,
    *,
    cfg: Config | None = None,
    seed: int = 0,
    options: dict[str, Any] | None = None,
    worker: Any = None,
    on_progress: Callable[[dict[str, float]], None] | None = None,
    progress_every_s: float = 60.0,
) -> list[dict[str, Any]]:
    """Play `games` games of each ordered pair (agents[a] as alice, agents[b] as bob); one figure
    dict per pair, in order. Without a worker, scripted-only pairs run on envs.loop, others on a
    RolloutWorker built (and shut down) here. `on_progress` gets the worker's progress (games
    planned and done, decisions, seconds) every `progress_every_s` seconds while the games run."""
    cfg = cfg or Config()
    options = dict(options or {})
    seated = {i for pair in pairs for i in pair}
    if worker is None and all(agents[i].kind == "scripted" for i in seated):
        return [
            summarize(game, play_scripted(game, (agents[a].name, agents[b].name), games, seed, **options))
            for a, b in pairs
        ]
    own = worker is None
    if own:
        worker = RolloutWorker(worker_config(cfg, [agents[i] for i in sorted(seated)]))
    try:
        for i in sorted(seated):
            if agents[i].adapter is not None:
                await _call(worker, "load_adapter", agents[i].adapter)
        sampling = sampling_of(cfg)
        specs = [
            MatchSpec(
                game,
                game_id=p * games + g,
                group_id=p,
                seed=seed + g,
                seats=(agents[a].player, agents[b].player),  # type: ignore[arg-type]
                options=options,
                run="evaluate",
                sampling=sampling,
            )
            for p, (a, b) in enumerate(pairs)
            for g in range(games)
        ]
        watch = asyncio.ensure_future(_watch(worker, on_progress, progress_every_s)) if on_progress else None
        try:
            table = concat(await _call(worker, "run", specs, None, False))
        finally:
            if watch is not None:
                watch.cancel()
    finally:
        if own:
            worker.shutdown()
    group = np.asarray(table.column("group_id"))
    return [pair_summary(game, table.filter(pa.array(group == p))) for p in range(len(pairs))]


async def _watch(worker: Any, on_progress: Callable[[dict[str, float]], None], every_s: float) -> None:
    """Report the worker's progress every `every_s` seconds until cancelled (for show: a failed
    query is skipped)."""
    while True:
        await asyncio.sleep(every_s)
        with contextlib.suppress(Exception):
            on_progress(await _call(worker, "progress"))


def return_matrix(n: int, pairs: Sequence[Pair], results: Sequence[dict[str, Any]]) -> list[list[float]]:
    """M[i][j]: agent i's mean return per round against agent j, averaged over both seat orders
    (i as alice vs j, and j as alice vs i); the diagonal is self-play, both seats."""
    by_pair = dict(zip(pairs, results, strict=True))
    m = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            m[i, j] = (by_pair[(i, j)]["return_per_round"][0] + by_pair[(j, i)]["return_per_round"][1]) / 2
    return m.tolist()


def exploitability(names: Sequence[str], m: Sequence[Sequence[float]], exploiter: str | None) -> dict[str, Any]:
    """Per agent j: its loss against the best responder b = argmax_i M[i][j] among the evaluated
    agents, loss = M[b][j] - M[j][b] (per round); and the same loss against the reference exploiter."""
    a = np.asarray(m)
    out: dict[str, Any] = {}
    for j, name in enumerate(names):
        b = int(np.argmax(a[:, j]))
        entry: dict[str, Any] = {
            "best_responder": names[b],
            "responder_return": float(a[b, j]),
            "return": float(a[j, b]),
            "loss": float(a[b, j] - a[j, b]),
        }
        if exploiter is not None:
            x = names.index(exploiter)
            entry["loss_vs_exploiter"] = float(a[x, j] - a[j, x])
        out[name] = entry
    return out


async def evaluate_async(
    game: str,
    agents: Sequence[str | Agent],
    games: int = 256,
    *,
    cfg: Config | None = None,
    seed: int = 0,
    options: dict[str, Any] | None = None,
    out: str | Path | None = None,
    parent_run: str | None = None,
    worker: Any = None,
    add_exploiter: bool = True,
    track: bool = True,
    on_progress: Callable[[dict[str, float]], None] | None = None,
    progress_every_s: float = 60.0,
) -> dict[str, Any]:
    """The cross-play matrix of `agents` (see the module doc). Writes evaluation.json and
    heatmap.png under `out` (a temporary directory when None), and with `track` an MLflow run
    (nested under `parent_run` when given) in the config's tracking store."""
    from reciprocity import evaluation_report as report

    cfg = cfg or Config()
    options = dict(options or {})
    resolved = resolve(game, agents, cfg)
    envs.make(game, **options)  # unknown options fail before anything starts
    if add_exploiter:
        resolved = with_exploiter(game, resolved)
    names = unique_names(resolved)
    n = len(resolved)
    pairs = [(i, j) for i in range(n) for j in range(n)]
    run = report.open_run(cfg, parent_run, game) if track else None  # a bad parent fails now, not after the games
    try:
        t0 = time.perf_counter()
        results = await play_pairs(game, resolved, pairs, games, cfg=cfg, seed=seed, options=options, worker=worker,
                                   on_progress=on_progress, progress_every_s=progress_every_s)
        m = return_matrix(n, pairs, results)
        exploiter = next((nm for nm, a in zip(names, resolved, strict=True) if a.kind == "scripted"
                          and a.player is not None and a.player.policy == EXPLOITER[game]), None)
        result: dict[str, Any] = {
            "game": game,
            "games": games,
            "seed": seed,
            "options": options,
            "temperature": cfg.rollout.temperature,
            "agents": [{"name": nm, "spec": a.spec, "kind": a.kind} for nm, a in zip(names, resolved, strict=True)],
            "pairs": [{"agents": [names[a], names[b]], **r} for (a, b), r in zip(pairs, results, strict=True)],
            "return_matrix": m,
            "mean_return_per_round": {nm: float(np.mean(row)) for nm, row in zip(names, m, strict=True)},
            "exploiter": exploiter,
            "exploitability": exploitability(names, m, exploiter),
            "seconds": time.perf_counter() - t0,
            "mlflow_run_id": run.run_id if run else None,
        }
        if out is None:
            with tempfile.TemporaryDirectory(prefix="reciprocity-eval-") as tmp:
                files = report.write(result, Path(tmp))
                if run:
                    run.finish(result, files)
        else:
            files = report.write(result, Path(out))
            result["files"] = {k: str(v) for k, v in files.items()}
            if run:
                run.finish(result, files)
    except BaseException:
        if run:
            run.fail()
        raise
    return result


def evaluate(game: str, agents: Sequence[str | Agent], games: int = 256, **kwargs: Any) -> dict[str, Any]:
    """Synchronous `evaluate_async` (same keyword arguments). A plain RolloutWorker whose engine has
    started already lives on another event loop: use `await evaluate_async(...)` on that loop."""
    worker = kwargs.get("worker")
    if isinstance(worker, RolloutWorker) and getattr(worker, "_started", None) is not None:
        raise ValueError("this RolloutWorker's engine runs on another event loop: await evaluate_async(...) there")
    return asyncio.run(evaluate_async(game, agents, games, **kwargs))


async def play_agents(
    game: str,
    specs: tuple[str | Agent, str | Agent],
    games: int,
    *,
    cfg: Config | None = None,
    seed: int = 0,
    options: dict[str, Any] | None = None,
    worker: Any = None,
) -> list[dict[str, Any]]:
    """`reciprocity play` for any two agents: both seat orders, A as alice first."""
    cfg = cfg or Config()
    agents = resolve(game, specs, cfg, command="play")
    envs.make(game, **(options or {}))
    return await play_pairs(game, agents, [(0, 1), (1, 0)], games, cfg=cfg, seed=seed, options=options, worker=worker)


def _print_progress(p: dict[str, float], stream: TextIO) -> None:
    """`reciprocity evaluate`'s progress line on stderr (a long tournament is otherwise silent)."""
    from reciprocity.progress import rollout_detail

    line = f"{rollout_detail(p)}, {p['seconds'] / 60:.0f} min" if p["planned"] else "starting the engine"
    print(f"evaluate: {line}", file=stream, flush=True)


def main(
    game: str,
    specs: list[str],
    games: int,
    config: Path | None,
    out: Path | None,
    parent_run: str | None,
    seed: int,
    options: list[str],
    as_json: bool,
) -> int:
    """`reciprocity evaluate`: exit 0, or 2 with one line for a bad spec, option, config or parent run."""
    import json

    from mlflow.exceptions import MlflowException

    from reciprocity import evaluation_report as report
    from reciprocity.agents import AgentSpecError
    from reciprocity.config import ConfigError, load_config, parse_options

    try:
        cfg = load_config(config) if config else Config()
        opts = (dict(cfg.game.options) if cfg.game.name == game else {}) | parse_options(options)
        out = out or Path(cfg.runs_dir) / "eval" / f"{game}-{time.strftime('%Y%m%d-%H%M%S')}"
        if not specs:
            raise AgentSpecError("no agents given: reciprocity evaluate --game G --agents A B ...")
        # everything that can be refused is checked before the engine phase (and its log-file line)
        agents = resolve(game, specs, cfg)
        envs.make(game, **opts)
        if parent_run:
            from mlflow.tracking import MlflowClient

            from reciprocity.tracking import tracking_uri

            MlflowClient(tracking_uri(cfg)).get_run(parent_run)
        with stdout_to_stderr() as err:
            result = evaluate(game, agents, games, cfg=cfg, seed=seed, options=opts, out=out, parent_run=parent_run,
                              on_progress=lambda p: _print_progress(p, err))
    except (AgentSpecError, envs.EnvConfigError, ConfigError, MlflowException) as e:
        line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {line}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(result))
    else:
        report.print_result(result)
    return 0
