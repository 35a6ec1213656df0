"""Metrics on hand-made records, numbers worked out by hand."""

from __future__ import annotations

import pytest

from envs.loop import play_scripted
from envs.metrics import GameRecord, summarize


def _ipd(a: str, b: str, rewards: tuple[list[float], list[float]], invalid: tuple[int, int] = (0, 0)) -> GameRecord:
    return GameRecord("ipd", [list(a), list(b)], [rewards[0], rewards[1]], {}, list(invalid), [len(a), len(b)])


def test_ipd_summary() -> None:
    """Game 1: alice C C D, bob C D D; game 2: alice D C, bob C C.
    alice after bob's C: g1 t=1 C, g2 t=1 C -> 1.0; after bob's D: g1 t=2 D -> 0.0.
    bob after alice's C: g1 t=1 D, g1 t=2 D -> 0.0; after alice's D: g2 t=1 C -> 1.0."""
    g1 = _ipd("CCD", "CDD", ([3, 0, 1], [3, 5, 1]), invalid=(1, 0))
    g2 = _ipd("DC", "CC", ([5, 3], [0, 3]))
    s = summarize("ipd", [g1, g2])
    assert s["return_per_game"] == [(4 + 8) / 2, (9 + 3) / 2]
    assert s["return_per_round"] == [12 / 5, 12 / 5]
    assert s["cooperation_rate"] == [3 / 5, 3 / 5]
    assert s["p_coop_given_opp_coop"] == [1.0, 0.0]
    assert s["p_coop_given_opp_defect"] == [0.0, 1.0]
    assert s["efficiency"] is None
    assert s["welfare_per_round"] == 24 / 5
    assert s["invalid_rate"] == [1 / 5, 0.0]


def test_conditional_cooperation_without_data_is_none() -> None:
    """alice C C D, bob C D D: bob never follows a D of alice's."""
    s = summarize("ipd", [_ipd("CCD", "CDD", ([0] * 3, [0] * 3))])
    assert s["p_coop_given_opp_coop"] == [1.0, 0.0]
    assert s["p_coop_given_opp_defect"] == [0.0, None]


def test_split_efficiency() -> None:
    """Round 1 welfare 210 of 210; round 2 welfare 120 of 210 -> efficiency (1 + 4/7) / 2."""
    record = GameRecord(
        "split_nocomm",
        [["0,10,5", "10,10,10"], ["10,0,5", "10,10,10"]],
        [[105.0, 60.0], [105.0, 60.0]],
        {"max_welfare": [210, 210]},
        [0, 0],
        [2, 2],
    )
    s = summarize("split_nocomm", [record])
    assert s["efficiency"] == pytest.approx((1 + 120 / 210) / 2)
    assert s["welfare_per_round"] == 165.0
    assert s["cooperation_rate"] == [None, None] and s["p_coop_given_opp_coop"] == [None, None]


def test_tas_statistics() -> None:
    records = play_scripted("trust_and_split", ("liar", "truthful"), games=20)
    s = summarize("trust_and_split", records)
    assert s["mean_proposal"][0] == 10.0
    assert s["honest_claim_rate"][1] == 1.0 and s["honest_claim_rate"][0] < 1.0
    assert s["efficiency"] is not None and 0 < s["efficiency"] <= 1


def test_empty() -> None:
    s = summarize("ipd", [])
    assert s["return_per_game"] == [None, None] and s["welfare_per_round"] is None


def test_record_from_game_info_roundtrip() -> None:
    (record,) = play_scripted("split_nocomm", ("greedy", "greedy"), games=1)
    assert record.game == "split_nocomm" and len(record.actions[0]) == 10
    assert record.actions[0] == ["10,10,10"] * 10 and record.n_decisions == [10, 10]
