"""Scripted strategies: valid text for every decision, from info alone."""

from __future__ import annotations

import itertools

import pytest

import envs
from envs import scripted
from envs.loop import play_scripted

VARIANTS = {
    "ipd": [{}, {"wording": "overt"}],
    "split_nocomm": [{}],
    "trust_and_split": [{}, {"values": "uniform"}],
}
CASES = [
    (game, names, options)
    for game, variants in VARIANTS.items()
    for names in itertools.product(scripted.NAMES[game], repeat=2)
    for options in variants
]


@pytest.mark.parametrize(("game", "names", "options"), CASES)
def test_scripted_outputs_are_always_valid(game: str, names: tuple[str, str], options: dict) -> None:
    env = envs.make(game, **options)
    seats = [scripted.make(game, n, seed=i) for i, n in enumerate(names)]
    for seed in range(3):
        _, infos = env.reset(seed=seed)
        while env.agents:
            actions = {}
            for i, agent in enumerate(envs.AGENTS):
                text = seats[i].act(infos[agent])
                if infos[agent]["acts"]:
                    assert env.valid(agent, text), (agent, text)
                    actions[agent] = text
                else:
                    assert text == ""
            _, _, _, _, infos = env.step(actions)
        assert env.game_info()["n_invalid"] == [0, 0]


def test_names() -> None:
    assert scripted.NAMES["ipd"] == (
        "always_cooperate",
        "always_defect",
        "tit_for_tat",
        "grim_trigger",
        "suspicious_tit_for_tat",
        "random",
    )
    assert scripted.NAMES["split_nocomm"] == ("greedy", "welfare_maximising", "random")
    assert scripted.NAMES["trust_and_split"] == ("always_claim_10", "truthful", "liar", "random")


def test_unknown_strategy() -> None:
    with pytest.raises(envs.EnvConfigError, match="valid: always_cooperate, .*random_<p>"):
        scripted.make("ipd", "nice")
    for bad in ("random_1.5", "random_x", "random_"):
        with pytest.raises(envs.EnvConfigError):
            scripted.make("ipd", bad)
    with pytest.raises(envs.EnvConfigError, match="valid: greedy, welfare_maximising, random$"):
        scripted.make("split_nocomm", "random_0.5")
    with pytest.raises(envs.EnvConfigError, match="valid games"):
        scripted.make("go", "random")


def test_random_p() -> None:
    (never,) = play_scripted("ipd", ("random_0", "always_cooperate"), games=1)
    assert never.actions[0] == ["D"] * 10
    (always,) = play_scripted("ipd", ("random_1.0", "always_cooperate"), games=1)
    assert always.actions[0] == ["C"] * 10
    records = play_scripted("ipd", ("random_0.3", "always_cooperate"), games=200)
    rate = sum(r.actions[0].count("C") for r in records) / 2000
    assert abs(rate - 0.3) < 0.05


def test_reset_restarts_the_random_stream() -> None:
    env = envs.make("split_nocomm")
    _, infos = env.reset(seed=0)
    seat = scripted.make("split_nocomm", "random", seed=3)
    first = [seat.act(infos["alice"]) for _ in range(5)]
    seat.reset()
    assert [seat.act(infos["alice"]) for _ in range(5)] == first
    seat.reset(seed=4)
    assert [seat.act(infos["alice"]) for _ in range(5)] != first


def test_truthful_reads_the_claim_from_state() -> None:
    truthful = scripted.make("trust_and_split", "truthful")
    state = {"values": "rps", "my_hand": "rock", "my_value": None, "opp_claim": "scissors"}
    info = {"acts": True, "kind": "proposal", "state": state}
    assert truthful.act(info) == "<<proposal_start>> 10 <<proposal_end>>"
    assert truthful.act({**info, "state": {**state, "opp_claim": "paper"}}) == "<<proposal_start>> 0 <<proposal_end>>"
    assert truthful.act({**info, "state": {**state, "opp_claim": None}}) == "<<proposal_start>> 5 <<proposal_end>>"
    assert truthful.act({**info, "state": {**state, "opp_claim": "rock"}}) == "<<proposal_start>> 5 <<proposal_end>>"
    message = truthful.act({**info, "kind": "message"})
    assert message == "<<message_start>>My hand is rock.<<message_end>>"
    liar = scripted.make("trust_and_split", "liar")
    assert "paper" in liar.act({**info, "kind": "message", "state": {**state, "opp_claim": "rock"}})
    assert "20" in liar.act({**info, "kind": "message", "state": {**state, "values": "uniform", "my_value": 3}})
