"""Every game trains: Split No-Comm and Trust-and-Split, sync and async, on the tiny model with the
real stack (vLLM, DeepSpeed, Ray, MLflow). Each run checks what comes out of it: the trajectory
batches validate, seed groups of 8 share their deals, credits come per round with a leave-one-out
baseline inside each seed group, the game's figures are logged as MLflow curves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from support import tiny_overrides

pytestmark = pytest.mark.slow

GAMES = 16  # two seed groups of 8: the learner seat alternates between the groups (buffer on)
ROUNDS = 3


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


CASES = [
    # game, mode, method, buffer
    ("split_nocomm", "sync", "naive", False),
    ("split_nocomm", "async", "aa", True),
    ("trust_and_split", "sync", "aa", True),
    ("trust_and_split", "async", "naive", True),
]


@pytest.mark.parametrize(("game", "mode", "method", "buffer"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_game_trains(ray_local, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                     game: str, mode: str, method: str, buffer: bool) -> None:
    from mlflow.tracking import MlflowClient

    from actors.trajectories import validate
    from learner.batch import CreditSpec, build_iteration, row_credits
    from learner.constrain import Constrainer
    from reciprocity import train
    from reciprocity.config import load_config
    from reciprocity.metrics import self_play_mask

    tables = []
    gather = train.Trainer._gather

    def keep_table(self, shares, specs):  # the real gather; the test fetches each iteration's whole table
        import ray

        from actors.trajectories import concat

        summary, metrics = gather(self, shares, specs)
        tables.append(concat(ray.get([ref for ref, _ in shares])))
        assert summary.num_rows == tables[-1].num_rows and "token_ids" not in summary.schema.names
        return summary, metrics

    monkeypatch.setattr(train.Trainer, "_gather", keep_table)
    options = f"{{n_rounds: {ROUNDS}" + (", message_chars: 40}" if game == "trust_and_split" else "}")
    config = Path(f"configs/{game}_{method}_cpu.yaml")
    overrides = [*tiny_overrides(tiny_model_dir, tmp_path), f"mode={mode}", f"game.options={options}",
                 f"rollout.games_per_iteration={GAMES}", f"buffer.enabled={str(buffer).lower()}",
                 "evaluation.every=0", "rollout.concurrency=32"]
    cfg = load_config(config, overrides)
    assert cfg.rollout.seed_group_size == 8 and cfg.rollout.baseline == "seed_group"
    assert cfg.method.reward_normaliser == 100
    history = train.run(cfg)

    assert [h["iteration"] for h in history] == [0, 1]
    assert [h["version"] for h in history] == [1, 2]
    if mode == "async":
        assert history[0]["overlapped"] == 1  # the rollout of iteration 1 ran during the update on 0
    assert len(tables) == 2
    spec = CreditSpec(cfg.method.name, cfg.method.discount, cfg.method.reward_normaliser, cfg.method.beta,
                      cfg.method.gamma)
    constrainer = Constrainer.from_model_dir(tiny_model_dir)
    for it, table in enumerate(tables):
        validate(table)
        assert table.num_rows == 2 * GAMES
        rows = table.to_pylist()
        # seed groups of 8 share the env seed, hence the deals of every round
        by_group: dict[int, list[dict]] = {}
        for r in rows:
            by_group.setdefault(r["group_id"], []).append(r)
        assert len(by_group) == GAMES // 8
        for members in by_group.values():
            infos = [json.loads(r["info_json"]) for r in members]
            assert len({r["seed"] for r in members}) == 1
            deal = "values" if game == "split_nocomm" else "hands"
            assert all(i[deal] == infos[0][deal] for i in infos)
            assert all(len(r["rewards"]) == ROUNDS for r in members)
        if buffer and it > 0:  # snapshot v1 exists from iteration 1: the learner seat alternates by group
            trained_seats = {r["group_id"]: r["seat"] for r in rows if r["trainable"]}
            assert sorted(trained_seats.values()) == [0, 1]
        # credits per round; naive: the leave-one-out advantages of a (group, seat, role) sum to 0
        C = row_credits(table, spec)
        assert C.shape == (2 * GAMES, ROUNDS) and np.isfinite(C).all()
        if method == "naive":
            labels = {(r["group_id"], r["seat"], r["trainable"]) for r in rows}
            for g, s, t in labels:
                mask = np.array([(r["group_id"], r["seat"], r["trainable"]) == (g, s, t) for r in rows])
                if mask.sum() > 1:
                    np.testing.assert_allclose(C[mask].sum(axis=0), 0.0, atol=1e-9)
        batch = build_iteration(table, spec, constrainer=constrainer)
        trainable = [r for r in rows if r["trainable"]]
        assert batch.n_tok == sum(sum(1 for t in r["token_round"] if t >= 0) for r in trainable) > 0
        assert constrainer.n_rejected == 0  # the guided tokens replay under the engine's grammar
        if game == "trust_and_split":  # every round: a message then a proposal per seat
            for r in trainable:
                assert len(r["guided"]) == 2 * ROUNDS
            games = {r["game_id"]: json.loads(r["info_json"]) for r in rows}
            messages = [m for info in games.values() for ms in info["messages"] for m in ms]
            assert len(messages) == 2 * ROUNDS * GAMES and all(m is None or len(m) <= 40 for m in messages)
        assert self_play_mask(table).sum() % 2 == 0

    figures = ["efficiency", "welfare_per_round", "fairness", "return_per_round"]
    if game == "trust_and_split":
        figures += ["mean_message_chars", "mean_proposal"]
    for key in figures:
        assert key in history[0] and np.isfinite(history[0][key]), key
    assert 0.0 <= history[0]["efficiency"] <= 1.0 and 0.0 <= history[0]["fairness"] <= 1.0
    if "honest_claim_rate" in history[0]:  # only where a message named a hand (rare for a random model)
        assert 0.0 <= history[0]["honest_claim_rate"] <= 1.0

    client = MlflowClient(cfg.tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert len(runs) == 1
    for key in figures:
        assert [m.step for m in client.get_metric_history(runs[0].info.run_id, key)] == [0, 1], key
