"""Pure pieces of the driver: game-id accounting, evaluation plans and opponents, worker configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.trajectories import SeatTrajectory, to_batch
from actors.worker import PlayerSpec
from reciprocity.config import Config, ConfigError
from reciprocity.train import TrainError, check_game_ids, eval_player, plan_eval_specs, worker_config


def rows(game_ids: list[int]) -> object:
    return to_batch([SeatTrajectory(run="r", iteration=0, game_id=g, group_id=0, env="ipd", seed=0, seat=s,
                                    policy_name="p", policy_version=0, opponent_name="p", opponent_version=0,
                                    trainable=True, temperature=1.0) for g in game_ids for s in (0, 1)])


class Spec:
    def __init__(self, game_id: int) -> None:
        self.game_id = game_id


def test_check_game_ids_catches_lost_duplicated_and_unplanned_games() -> None:
    planned = [Spec(g) for g in (3, 4, 5)]
    check_game_ids(rows([5, 3, 4]), planned)  # order does not matter
    with pytest.raises(TrainError, match=r"lost \[4\]"):
        check_game_ids(rows([3, 5]), planned)
    with pytest.raises(TrainError, match=r"not exactly two seats \[5\]"):
        check_game_ids(rows([3, 4, 5, 5]), planned)
    with pytest.raises(TrainError, match=r"unplanned \[9\]"):
        check_game_ids(rows([3, 4, 5, 9]), planned)


def test_eval_opponents_and_plan() -> None:
    assert eval_player("ipd", "self") is None
    assert eval_player("ipd", "base") == PlayerSpec("llm", "base", -1, adapter=None)
    assert eval_player("ipd", "scripted:tit_for_tat") == PlayerSpec("scripted", "tit_for_tat")
    with pytest.raises(ConfigError, match="evaluation.opponents: unknown scripted strategy 'greedy'"):
        eval_player("ipd", "scripted:greedy")
    with pytest.raises(ConfigError, match="reciprocity evaluate"):
        eval_player("ipd", "adapter:/some/where")
    # the one agent-spec parser (reciprocity/agents.py): its bare and labelled forms too
    assert eval_player("ipd", "tit_for_tat") == PlayerSpec("scripted", "tit_for_tat")
    assert eval_player("ipd", "nice=scripted:tit_for_tat") == PlayerSpec("scripted", "tit_for_tat")
    with pytest.raises(ConfigError, match="reciprocity evaluate"):
        eval_player("ipd", "human")

    cfg = Config.model_validate({"evaluation": {"every": 1, "games": 4,
                                                "opponents": ["scripted:always_defect", "self"]}})
    me = PlayerSpec("llm", "learner", 7, adapter="learner@v7")
    specs = plan_eval_specs(cfg, "run", 7, me)
    assert len(specs) == 8 and len({s.game_id for s in specs}) == 8
    assert all(s.game_id >= 1 << 40 for s in specs)  # never a training game id
    assert [s.seats.index(me) for s in specs[:4]] == [0, 1, 0, 1]  # the agent alternates seats
    assert all(not p.trainable for s in specs for p in s.seats)
    assert specs[4].seats == (me, me) and {s.group_id for s in specs} == {0, 1}
    assert plan_eval_specs(cfg, "run", 8, me)[0].game_id != specs[0].game_id


def test_each_worker_has_its_own_adapter_directory(tmp_path: Path) -> None:
    cfg = Config()
    roots = {worker_config(cfg, tmp_path, pool=None, index=i)["engine"]["adapter_root"] for i in range(3)}
    assert len(roots) == 3 and all(r.startswith(str(tmp_path)) for r in roots)
