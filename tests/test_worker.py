"""The rollout worker: groups, batches, counts and restarts on a token test double (no Ray); and as a
real Ray actor on vLLM with the tiny model, 8 IPD games between two LoRA adapters."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from actors.adapters import AdapterVersion
from actors.engine import UnknownAdapterError
from actors.pool import OpponentPool
from actors.trajectories import concat, validate
from actors.worker import MatchSpec, PlayerSpec, RolloutWorker, SamplingSpec


def tiny_version(name: str, v: int) -> AdapterVersion:
    import hashlib

    data = f"{name}{v}".encode()
    return AdapterVersion(name, v, hashlib.sha256(data).hexdigest(), data, {})


def ipd_specs(a: PlayerSpec, b: PlayerSpec, games: int, group_size: int, **kw: Any) -> list[MatchSpec]:
    return [
        MatchSpec("ipd", game_id=g, group_id=g // group_size, seed=0, seats=(a, b), run="t", iteration=2, **kw)
        for g in range(games)
    ]


@pytest.fixture()
def worker(model_dir: Path) -> RolloutWorker:
    config = {"model": str(model_dir), "engine_factory": "support:fake_engine", "adapters": [tiny_version("a", 1)]}
    return RolloutWorker(config)


def test_worker_plays_groups_into_validated_batches(worker: RolloutWorker) -> None:
    a = PlayerSpec("llm", "a", 1, adapter="a@v1", trainable=True)
    b = PlayerSpec("scripted", "tit_for_tat")
    batches = asyncio.run(worker.run(ipd_specs(a, b, 6, 3, options={"n_rounds": 3}), concurrency=2, refs=False))
    assert len(batches) == 2 and all(isinstance(x, pa.RecordBatch) and x.num_rows == 6 for x in batches)
    for batch in batches:
        validate(batch)
        assert len(set(batch.column("group_id").to_pylist())) == 1
        assert batch.column("seat").to_pylist() == [0, 1] * 3
    table = concat(batches)
    assert sorted(table.column("game_id").to_pylist()) == sorted([g for g in range(6) for _ in (0, 1)])
    rows = table.to_pylist()
    assert {(r["policy_name"], r["policy_version"], r["trainable"]) for r in rows} == {
        ("a", 1, True),
        ("tit_for_tat", -1, False),
    }
    assert all(r["run"] == "t" and r["iteration"] == 2 and len(r["rewards"]) == 3 for r in rows)
    stats = worker.stats()
    assert stats["last"]["games"] == 6 and stats["last"]["decisions"] == 36 and stats["adapters"] == ["a@v1"]
    assert stats["last"]["generated_tokens"] == sum(sum(t >= 0 for t in r["token_round"]) for r in rows) > 0
    assert stats["totals"]["runs"] == 1 and stats["last"]["seconds"] > 0


def test_worker_refuses_unloaded_adapters_and_unknown_endpoints(worker: RolloutWorker) -> None:
    b = PlayerSpec("scripted", "always_defect")
    with pytest.raises(UnknownAdapterError, match="a@v2"):
        asyncio.run(worker.run(ipd_specs(PlayerSpec("llm", "a", 2, adapter="a@v2"), b, 1, 1), refs=False))
    with pytest.raises(KeyError, match="no API endpoint"):
        asyncio.run(worker.run(ipd_specs(PlayerSpec("api", "gpt"), b, 1, 1), refs=False))
    with pytest.raises(ValueError, match="cannot be trained"):
        PlayerSpec("scripted", "x", trainable=True)
    assert worker.totals.get("games", 0) == 0


def test_worker_restart_reloads_from_the_adapter_source(model_dir: Path) -> None:
    pool = OpponentPool(snapshot_every=2)
    for it in range(5):
        pool.set_current(tiny_version("learner", it), it)
    config = {"model": str(model_dir), "engine_factory": "support:fake_engine", "adapter_source": pool}

    async def go() -> list[str]:
        w = RolloutWorker(config)
        await w.ready()
        assert await w.load_adapter(tiny_version("learner", 4)) == "learner@v4"  # idempotent
        return w.adapters()

    assert asyncio.run(go()) == ["learner@v2", "learner@v4"]


def test_a_sync_reads_only_the_versions_it_lacks(model_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Refs of versions already loaded are not read from the store again (at paper size a sync
    names the current version and up to 28 snapshots of 161 MB each)."""
    from actors.adapters import AdapterRef, AdapterStore

    store = AdapterStore(tmp_path / "adapters")
    refs = [store.put(tiny_version("learner", v)) for v in range(3)]
    reads: list[str] = []
    real_load = AdapterRef.load

    def counted(self: AdapterRef) -> AdapterVersion:
        reads.append(self.key)
        return real_load(self)

    monkeypatch.setattr(AdapterRef, "load", counted)

    async def go() -> list[list[str]]:
        w = RolloutWorker({"model": str(model_dir), "engine_factory": "support:fake_engine"})
        held = [await w.sync_adapters(refs[:2])]
        held.append(await w.sync_adapters(refs))  # v0 and v1 held: only v2 is read
        held.append(await w.sync_adapters(refs[1:]))  # nothing new: nothing read, v0 retired
        await w.load_adapter(refs[2])  # idempotent, no read
        return held

    held = asyncio.run(go())
    assert reads == ["learner@v0", "learner@v1", "learner@v2"]
    assert held == [["learner@v0", "learner@v1"], ["learner@v0", "learner@v1", "learner@v2"],
                    ["learner@v1", "learner@v2"]]


ENGINE_STARTS: list[str] = []


def counting_engine(config: dict[str, Any]) -> Any:
    """A RolloutWorker `engine_factory` ("test_worker:counting_engine"): a FakeEngine whose `start`
    is counted and takes a moment, as a real engine's boot does."""
    from support import fake_engine

    engine = fake_engine(config)

    async def start() -> None:
        ENGINE_STARTS.append(config["model"])
        await asyncio.sleep(0.05)

    engine.start = start
    return engine


def test_engine_boots_once_before_the_first_version_exists(model_dir: Path) -> None:
    """The driver has the engine boot (`start_engine`) while the learner exports version 0; `ready`
    then loads the pool's versions on that same engine, never starting it twice."""
    pool = OpponentPool(snapshot_every=2)
    config = {"model": str(model_dir), "engine_factory": "test_worker:counting_engine", "adapter_source": pool}

    async def go() -> tuple[list[str], list[str]]:
        w = RolloutWorker(config)
        await asyncio.gather(w.start_engine(), w.start_engine())
        before = w.adapters()
        pool.set_current(tiny_version("learner", 0), 0)
        await asyncio.gather(w.ready(), w.ready())
        return before, w.adapters()

    ENGINE_STARTS.clear()
    assert asyncio.run(go()) == ([], ["learner@v0"])
    assert len(ENGINE_STARTS) == 1 and ENGINE_STARTS[0] == str(model_dir)


def test_engine_threads_node_are_the_cores_shared_among_the_runs_engines(model_dir: Path) -> None:
    """The driver cannot know a worker's node: `threads: "node"` is resolved by the worker itself,
    this node's cores over the engines a run packs on it; an explicit count passes through."""
    from actors.device import node_cores
    from actors.worker import default_engine

    def threads(engine: dict[str, Any], **config: Any) -> Any:
        return default_engine({"model": str(model_dir), "engine": engine, **config}).threads

    assert threads({"threads": "node"}) == node_cores(1)
    assert threads({"threads": "node"}, engines_per_node=2) == node_cores(2)
    assert threads({"threads": 3}, engines_per_node=2) == 3
    assert threads({}) is None  # not given: the engine process keeps the environment's count


def test_sampling_spec_reaches_the_engine(worker: RolloutWorker) -> None:
    a = PlayerSpec("llm", "a", 1, adapter="a@v1")
    specs = ipd_specs(a, a, 1, 1, options={"n_rounds": 2}, sampling=SamplingSpec(0.7, 0.9, 4, free_samples=1))
    asyncio.run(worker.run(specs, refs=False))
    calls = worker.engine.calls  # type: ignore[attr-defined]
    assert len(calls) == 8 and {(c[1].temperature, c[1].top_p, c[1].max_tokens) for c in calls} == {(0.7, 0.9, 4)}
    assert worker.last["resampled"] == 4


# -- a real Ray actor on vLLM ---------------------------------------------------------------------
def make_lora(model_dir: Path, out: Path, name: str, version: int, seed: int) -> AdapterVersion:
    """A random (non-zero) rank-8 LoRA on q/v projections of the tiny model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(str(out))
    return AdapterVersion.from_dir(out, name, version)


@pytest.mark.slow
def test_ray_worker_plays_8_ipd_games_between_two_adapters(tiny_model_dir: Path, tmp_path: Path) -> None:
    import ray


    v_a = make_lora(tiny_model_dir, tmp_path / "a", "alpha", 3, seed=1)
    v_b = make_lora(tiny_model_dir, tmp_path / "b", "beta", 5, seed=2)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        config = {
            "model": str(tiny_model_dir),
            "engine": {"max_loras": 2, "max_lora_rank": 8, "max_model_len": 2048},
            "adapters": [v_a],
        }
        actor = ray.remote(RolloutWorker).options(num_cpus=1).remote(config)
        assert ray.get(actor.load_adapter.remote(v_b), timeout=300) == "beta@v5"
        a = PlayerSpec("llm", "alpha", 3, adapter=v_a.key, trainable=True)
        b = PlayerSpec("llm", "beta", 5, adapter=v_b.key, trainable=False)
        specs = ipd_specs(a, b, 8, 4, options={"n_rounds": 4}, sampling=SamplingSpec(max_tokens=8))
        refs = ray.get(actor.run.remote(specs, 8), timeout=600)
        assert len(refs) == 2 and all(isinstance(r, ray.ObjectRef) for r in refs)
        table = concat(ray.get(refs))
        validate(table)
        stats = ray.get(actor.stats.remote())
        # the streaming variant: one ref per group as each group finishes
        tft, ad = PlayerSpec("scripted", "tit_for_tat"), PlayerSpec("scripted", "always_defect")
        streamed = [ray.get(ref) for ref in actor.run_stream.remote(ipd_specs(tft, ad, 4, 2))]
        assert [b.num_rows for b in streamed] == [4, 4]
        assert concat(streamed).column("rewards").to_pylist()[1] == [5.0] + [1.0] * 9
        ray.get(actor.shutdown.remote())
    finally:
        ray.shutdown()
    rows = table.to_pylist()
    assert len(rows) == 16
    by_game: dict[int, dict[int, dict]] = {}
    for r in rows:
        by_game.setdefault(r["game_id"], {})[r["seat"]] = r
    assert sorted(by_game) == list(range(8)) and all(set(g) == {0, 1} for g in by_game.values())
    for g in by_game.values():
        for seat, (name, version, opp) in enumerate([("alpha", 3, "beta"), ("beta", 5, "alpha")]):
            r = g[seat]
            assert (r["policy_name"], r["policy_version"], r["opponent_name"]) == (name, version, opp)
            gen = [i for i, t in enumerate(r["token_round"]) if t >= 0]
            assert len(r["token_ids"]) == len(r["logprobs"]) == len(r["token_version"])
            assert gen and all(r["token_version"][i] == version and r["logprobs"][i] <= 0.0 for i in gen)
            assert r["n_decisions"] == 4 and r["n_invalid"] == 0 and r["guided"] == [True] * 4
            assert r["decision_regex"] == ["(<A>|<B>)"] * 4
        assert [sum(g[0]["rewards"]), sum(g[1]["rewards"])] == [
            sum(x) for x in json.loads(g[0]["info_json"])["rewards"]
        ]
    assert stats["last"]["games"] == 8 and stats["adapters"] == ["alpha@v3", "beta@v5"]
    # the engine's own counters: at least every generated token of the games, and the prompt tokens
    # of which the prefix cache served a part
    engine = stats["engine"]
    assert engine["generated_tokens"] >= sum(sum(t >= 0 for t in r["token_round"]) for r in rows)
    assert 0 <= engine["cached_prompt_tokens"] <= engine["prompt_tokens"] and engine["prompt_tokens"] > 0
