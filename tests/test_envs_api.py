"""The env contract (sysdesign/contracts.md): PettingZoo API, infos, observations, CRN, options."""

from __future__ import annotations

import json

import pytest
from pettingzoo.test import parallel_api_test

import envs
from envs import scripted
from envs.loop import play_game

GAMES = list(envs.GAMES)
VARIANTS = [
    ("ipd", {}),
    ("ipd", {"wording": "overt", "horizon": "geometric"}),
    ("split_nocomm", {}),
    ("split_nocomm", {"n_rounds": 3}),
    ("trust_and_split", {}),
    ("trust_and_split", {"values": "uniform", "horizon": "geometric", "n_rounds": 12}),
]


@pytest.mark.parametrize(("game", "options"), VARIANTS)
def test_parallel_api_test(game: str, options: dict) -> None:
    parallel_api_test(envs.make(game, **options), num_cycles=1000)


def _trace(game: str, names: tuple[str, str], seed: int, **options: object) -> list:
    """Everything an env emits over one scripted game."""
    env = envs.make(game, **options)
    seats = [scripted.make(game, n, seed=7) for n in names]
    obs, infos = env.reset(seed=seed)
    out = [(obs, infos)]
    while env.agents:
        actions = {a: seats[i].act(infos[a]) for i, a in enumerate(envs.AGENTS) if infos[a]["acts"]}
        obs, rewards, term, trunc, infos = env.step(actions)
        out.append((obs, rewards, term, trunc, infos))
    return [*out, env.game_info()]


@pytest.mark.parametrize("game", GAMES)
def test_common_random_numbers(game: str) -> None:
    names = (scripted.NAMES[game][-1], scripted.NAMES[game][-1])  # random vs random
    assert _trace(game, names, seed=5) == _trace(game, names, seed=5)
    if game != "ipd":  # IPD has no env randomness
        assert _trace(game, names, seed=5)[-1] != _trace(game, names, seed=6)[-1]


@pytest.mark.parametrize("game", ["split_nocomm", "trust_and_split"])
def test_same_seed_same_deal_whatever_the_play(game: str) -> None:
    """Values, hands and starters depend on the seed only, not on the agents' actions."""
    a = _trace(game, (scripted.NAMES[game][0], scripted.NAMES[game][0]), seed=11)[-1]
    b = _trace(game, ("random", "random"), seed=11)[-1]
    for key in ("values", "hands", "starter"):
        if key in a:
            assert a[key] == b[key]


@pytest.mark.parametrize("game", GAMES)
def test_infos_and_observations(game: str) -> None:
    env = envs.make(game)
    obs, infos = env.reset(seed=1)
    steps = 0
    while True:
        for agent in envs.AGENTS:
            info = infos[agent]
            assert {"acts", "round", "kind", "regex", "max_tokens", "state"} <= set(info)
            assert info["kind"] in ("action", "proposal", "message")
            json.dumps(info)
            if info["acts"]:
                assert obs[agent] and info["regex"] and info["max_tokens"] > 0
            else:
                assert obs[agent] == "" and info["regex"] == "" and info["max_tokens"] == 0
        if not env.agents:
            break
        actions = {a: "nonsense" for a in env.agents}
        obs, rewards, term, trunc, infos = env.step(actions)
        steps += 1
        ended = "last_round" in infos["alice"]
        assert ended == ("last_round" in infos["bob"])
        if not ended:
            assert rewards == {"alice": 0.0, "bob": 0.0}
        else:
            assert [rewards["alice"], rewards["bob"]] == infos["alice"]["last_round"]["rewards"]
    info = env.game_info()
    json.dumps(info)
    assert steps == 10 * (3 if game == "trust_and_split" else 1)
    assert all(len(a) == 10 for a in info["actions"]) and all(len(r) == 10 for r in info["rewards"])
    assert info["n_invalid"] == info["n_decisions"] == [steps if game != "trust_and_split" else 20] * 2


def test_round_info_and_termination() -> None:
    env = envs.make("ipd", n_rounds=2)
    _, infos = env.reset(seed=0)
    assert infos["alice"]["round"] == 0
    _, _, term, trunc, infos = env.step({"alice": "<A>", "bob": "<A>"})
    assert infos["bob"]["round"] == 1 and term == {"alice": False, "bob": False}
    assert infos["alice"]["last_round"] == {
        "round": 0,
        "actions": ["C", "C"],
        "rewards": [3.0, 3.0],
        "invalid": [0, 0],
    }
    obs, _, term, trunc, infos = env.step({"alice": "<B>", "bob": "<A>"})
    assert term == {"alice": True, "bob": True} and trunc == {"alice": False, "bob": False}
    assert env.agents == [] and obs == {"alice": "", "bob": ""}
    assert not infos["alice"]["acts"] and infos["alice"]["round"] == 2
    assert env.step({}) == ({}, {}, {}, {}, {})


def test_any_action_value_is_accepted() -> None:
    env = envs.make("trust_and_split")
    env.reset(seed=0)
    for junk in (None, 3, b"bytes", "\x00" * 10, "x" * 1_000_000):
        env.step({a: junk for a in envs.AGENTS})
    env.step({})  # a missing action is an empty (invalid) text


def test_valid() -> None:
    env = envs.make("trust_and_split")
    _, infos = env.reset(seed=0)
    starter = next(a for a in envs.AGENTS if infos[a]["acts"])
    other = "bob" if starter == "alice" else "alice"
    assert env.valid(starter, "<<message_start>>hi<<message_end>>")
    assert not env.valid(starter, "hi")
    assert not env.valid(other, "<<message_start>>hi<<message_end>>")  # no pending decision
    env.step({starter: "<<message_start>>hi<<message_end>>"})
    env.step({other: "<<message_start>>hello<<message_end>>"})
    assert env.valid("alice", "<<proposal_start>> 10 <<proposal_end>>")
    assert not env.valid("alice", "<<proposal_start>> 11 <<proposal_end>>")
    ipd = envs.make("ipd", wording="overt")
    ipd.reset(seed=0)
    assert ipd.valid("alice", " <Defect>\n") and not ipd.valid("alice", "<B>")


def test_unknown_game_and_options() -> None:
    with pytest.raises(envs.EnvConfigError, match="valid games: ipd, split_nocomm, trust_and_split"):
        envs.make("chess")
    with pytest.raises(envs.EnvConfigError, match="valid options: horizon, n_rounds, length_seed, wording"):
        envs.make("ipd", values="rps")
    with pytest.raises(envs.EnvConfigError, match="valid: neutral, overt"):
        envs.make("ipd", wording="loud")
    with pytest.raises(envs.EnvConfigError, match="valid: fixed, geometric"):
        envs.make("split_nocomm", horizon="forever")
    with pytest.raises(envs.EnvConfigError, match="valid: rps, uniform"):
        envs.make("trust_and_split", values="gaussian")
    for bad in (0, -1, 2.5, "10", True):
        with pytest.raises(envs.EnvConfigError, match="n_rounds"):
            envs.make("ipd", n_rounds=bad)
    with pytest.raises(envs.EnvConfigError, match="length_seed"):
        envs.make("ipd", length_seed=-1)
    with pytest.raises(ValueError):  # EnvConfigError is a ValueError
        envs.make("")
    for error in ("chess", "ipd"):
        try:
            envs.make(error, colour="red")
        except envs.EnvConfigError as e:
            assert "\n" not in str(e)


def test_geometric_horizon() -> None:
    lengths = []
    for seed in range(400):
        env = envs.make("ipd", horizon="geometric")
        obs, _ = env.reset(seed=seed)
        lengths.append(env.n_rounds)
        assert "very high" in obs["alice"]
        env2 = envs.make("ipd", horizon="geometric")
        env2.reset(seed=seed)
        assert env2.n_rounds == env.n_rounds
    assert min(lengths) >= 1 and max(lengths) <= 30
    expected = sum(0.85**k for k in range(30))  # E[min(1 + Geometric, 30)] = sum_{k<30} 0.85^k
    assert abs(sum(lengths) / len(lengths) - expected) < 0.8
    assert envs.make("ipd", horizon="geometric", n_rounds=3).reset(seed=1) and all(
        _n(envs.make("ipd", horizon="geometric", n_rounds=3), s) <= 3 for s in range(50)
    )
    fixed, _ = envs.make("ipd").reset(seed=0)
    assert "very high" not in fixed["alice"] and "number of rounds" not in fixed["alice"]


def test_length_seed_gives_one_length_to_many_games() -> None:
    lengths = {_n(envs.make("trust_and_split", horizon="geometric", length_seed=42), s) for s in range(30)}
    assert len(lengths) == 1
    assert len({_n(envs.make("trust_and_split", horizon="geometric"), s) for s in range(30)}) > 1


def _n(env: envs.TextGame, seed: int) -> int:
    env.reset(seed=seed)
    return env.n_rounds


@pytest.mark.parametrize("game", ["split_nocomm", "trust_and_split"])
def test_geometric_keeps_the_deal_of_each_round(game: str) -> None:
    """The horizon draws from its own stream: round t's deal does not depend on the game length."""
    for seed in range(20):
        fixed = envs.make(game, n_rounds=30)
        geo = envs.make(game, horizon="geometric")
        fixed.reset(seed=seed)
        geo.reset(seed=seed)
        deal = "_values" if game == "split_nocomm" else "_deals"
        assert getattr(geo, deal) == getattr(fixed, deal)[: geo.n_rounds]


def test_play_game_returns_a_record() -> None:
    env = envs.make("ipd")
    record = play_game(env, [scripted.make("ipd", "tit_for_tat"), scripted.make("ipd", "always_defect")], 0)
    assert record.actions == [["C"] + ["D"] * 9, ["D"] * 10]
    assert record.info["seed"] == 0 and record.n_decisions == [10, 10]
