"""Game rules with numbers derived by hand from spec section 2."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

import envs
from envs.allocation import allocate
from envs.loop import play_scripted
from envs.parsing import HANDS
from envs.split_nocomm import PATTERNS, draw_values, max_welfare


def _play_texts(env: envs.TextGame, texts: list[dict[str, str]], seed: int = 0) -> list[dict]:
    """Step through `texts` (one dict per step); returns each step's (obs, rewards, infos)."""
    out = [dict(zip(("obs", "infos"), env.reset(seed=seed), strict=True))]
    for actions in texts:
        obs, rewards, _, _, infos = env.step(actions)
        out.append({"obs": obs, "rewards": rewards, "infos": infos})
    return out


# -- IPD -----------------------------------------------------------------------------------------
def _ipd(a: str, b: str) -> list[float]:
    env = envs.make("ipd", n_rounds=1)
    return list(_play_texts(env, [{"alice": a, "bob": b}])[-1]["rewards"].values())


def test_ipd_payoffs() -> None:
    assert _ipd("<A>", "<A>") == [3, 3]
    assert _ipd("<B>", "<B>") == [1, 1]
    assert _ipd("<B>", "<A>") == [5, 0]
    assert _ipd("<A>", "<B>") == [0, 5]
    assert _ipd(" <A>\n", "\t<B> ") == [0, 5]  # surrounding whitespace is stripped


def test_ipd_invalid_counts_as_defect() -> None:
    for garbage in ("A", "<a>", "<A> <A>", "I play <A>", "", "<A", "<Cooperate>", "<A>."):
        assert _ipd(garbage, "<A>") == [5, 0], garbage
    env = envs.make("ipd", n_rounds=2)
    _play_texts(env, [{"alice": "<C>", "bob": "<A>"}, {"alice": "<A>", "bob": "nope"}])
    info = env.game_info()
    assert info["actions"] == [["D", "C"], ["C", "D"]]
    assert info["n_invalid"] == [1, 1] and info["n_decisions"] == [2, 2]


def test_ipd_overt_wording() -> None:
    env = envs.make("ipd", wording="overt", n_rounds=2)
    steps = _play_texts(env, [{"alice": "<Cooperate>", "bob": "<Defect>"}, {"alice": "<A>", "bob": "<B>"}])
    assert "cooperate" in steps[0]["obs"]["alice"] and steps[0]["infos"]["alice"]["regex"] == "(<Cooperate>|<Defect>)"
    assert steps[1]["rewards"] == {"alice": 0, "bob": 5}
    assert steps[1]["obs"]["alice"] == "Last round, the other agent played <Defect>."
    assert env.game_info()["n_invalid"] == [1, 1]  # <A>/<B> are not the overt labels


def test_ipd_prompts() -> None:
    env = envs.make("ipd", n_rounds=3)
    steps = _play_texts(env, [{"alice": "<A>", "bob": "<B>"}, {"alice": "<B>", "bob": "junk"}])
    first = steps[0]["obs"]["alice"]
    assert "<A>" in first and "<B>" in first and "3 points" in first and "5 points" in first
    assert steps[1]["obs"] == {
        "alice": "Last round, the other agent played <B>.",
        "bob": "Last round, the other agent played <A>.",
    }
    assert steps[2]["obs"]["alice"] == "Last round, the other agent played <B>."  # invalid shows as defect
    assert steps[0]["infos"]["alice"]["regex"] == "(<A>|<B>)"


def test_tit_for_tat_against_always_defect() -> None:
    """TFT: C then D x9 -> 0 + 9 x 1 = 9; AD: 5 + 9 x 1 = 14."""
    (record,) = play_scripted("ipd", ("tit_for_tat", "always_defect"), games=1)
    assert [sum(r) for r in record.rewards] == [9, 14]


@pytest.mark.parametrize(
    ("names", "returns"),
    [
        (("tit_for_tat", "suspicious_tit_for_tat"), [25, 25]),  # (C,D),(D,C),... : 5 x 0 + 5 x 5 each
        (("grim_trigger", "always_cooperate"), [30, 30]),
        (("grim_trigger", "always_defect"), [9, 14]),
        (("always_defect", "always_cooperate"), [50, 0]),
        (("suspicious_tit_for_tat", "always_cooperate"), [5 + 27, 27]),  # D then C: 5 + 9 x 3
    ],
)
def test_ipd_scripted_returns(names: tuple[str, str], returns: list[int]) -> None:
    (record,) = play_scripted("ipd", names, games=1)
    assert [sum(r) for r in record.rewards] == returns


def test_grim_trigger_never_forgives() -> None:
    """Opponent defects once, in round 3: grim C,C,C,C then D x6 -> 3x3 + 0 + 6x5 = 39; opp 9 + 5 + 0 = 14."""
    env = envs.make("ipd")
    from envs.scripted import make

    grim = make("ipd", "grim_trigger")
    _, infos = env.reset(seed=0)
    for t in range(10):
        _, _, _, _, infos = env.step({"alice": grim.act(infos["alice"]), "bob": "<B>" if t == 3 else "<A>"})
    assert [sum(r) for r in env.game_info()["rewards"]] == [39, 14]


# -- allocation ----------------------------------------------------------------------------------
def test_allocate() -> None:
    assert allocate(3, 4) == (3, 4)  # fits: granted as claimed
    assert allocate(10, 0) == (10, 0)
    assert allocate(0, 0) == (0, 0)
    assert allocate(10, 10) == (5, 5)
    assert allocate(7, 7) == (5, 5)  # denom 14
    assert allocate(10, 5) == pytest.approx((20 / 3, 10 / 3))  # denom 15
    assert allocate(6, 9) == pytest.approx((4, 6))


# -- Split No-Comm -------------------------------------------------------------------------------
def test_value_patterns() -> None:
    """The rejection rule keeps exactly the 12 ordered pairs with equal totals that differ somewhere."""
    by_hand = [
        (a, b)
        for a in itertools.product((1, 10), repeat=3)
        for b in itertools.product((1, 10), repeat=3)
        if sum(a) == sum(b) and a != b
    ]
    assert len(by_hand) == 12
    assert sorted((tuple(a), tuple(b)) for a, b in PATTERNS.values()) == sorted(by_hand)
    drawn = Counter((tuple(a), tuple(b)) for a, b in draw_values(np.random.default_rng(0), 24_000))
    assert set(drawn) == set(by_hand)
    assert all(abs(n - 2000) < 200 for n in drawn.values())  # equally likely (sd ~ 43)
    for a, b in drawn:
        assert sum(a) == sum(b) and a != b


def test_max_welfare() -> None:
    assert max_welfare([10, 1, 1], [1, 10, 1]) == 210
    assert max_welfare([10, 10, 1], [10, 1, 10]) == 300


def _seed_with_values(a: list[int], b: list[int]) -> int:
    for seed in range(10_000):
        env = envs.make("split_nocomm", n_rounds=1)
        env.reset(seed=seed)
        if env._values[0] == (a, b):
            return seed
    raise AssertionError("no seed")


def test_split_greedy_against_welfare_maximising() -> None:
    """Values A (10,1,1), B (1,10,1). Greedy A claims (10,10,10); welfare-maximising B claims (0,10,5).
    Hats: A gets 10 -> 100. Books: 5/5 -> A 5, B 50. Balls: denom 15 -> A 20/3, B 10/3.
    A = 100 + 5 + 20/3 = 111.67; B = 50 + 10/3 = 53.33; efficiency 165/210."""
    seed = _seed_with_values([10, 1, 1], [1, 10, 1])
    (record,) = play_scripted("split_nocomm", ("greedy", "welfare_maximising"), games=1, seed=seed, n_rounds=1)
    assert record.actions == [["10,10,10"], ["0,10,5"]]
    assert record.rewards[0][0] == pytest.approx(100 + 5 + 20 / 3)
    assert record.rewards[1][0] == pytest.approx(50 + 10 / 3)
    assert record.info["max_welfare"] == [210]


def test_split_welfare_maximisers_reach_full_efficiency() -> None:
    """A (10,10,1), B (10,1,10): hats tie 5/5, books to A, balls to B -> 150 each = 300 = max."""
    seed = _seed_with_values([10, 10, 1], [10, 1, 10])
    (record,) = play_scripted("split_nocomm", ("welfare_maximising",) * 2, games=1, seed=seed, n_rounds=1)
    assert record.actions == [["5,10,0"], ["5,0,10"]] and record.rewards == [[150.0], [150.0]]
    (greedy,) = play_scripted("split_nocomm", ("greedy",) * 2, games=1, seed=seed, n_rounds=1)
    assert greedy.rewards == [[105.0], [105.0]]  # 5 of everything: 50 + 50 + 5


def test_split_parse_and_invalid() -> None:
    env = envs.make("split_nocomm", n_rounds=2)
    steps = _play_texts(
        env,
        [
            {"alice": "proposal: 3 BOOKS", "bob": "I want everything"},
            {"alice": "Proposal: 10 hats, 10 books, 10 balls", "bob": "Proposal: 0 hats, 0 books, 0 balls"},
        ],
    )
    info = env.game_info()
    assert info["actions"] == [["0,3,0", "10,10,10"], ["0,0,0", "0,0,0"]]
    assert info["n_invalid"] == [0, 1]
    values = info["values"][0][0]
    assert steps[1]["rewards"]["alice"] == 3 * values[1]  # claims fit: 3 books granted
    assert "Last round, you proposed 0 hats, 3 books, 0 balls and received" in steps[1]["obs"]["alice"]
    assert "the other agent proposed 0 hats, 0 books, 0 balls and received 0.0 points" in steps[1]["obs"]["alice"]


def test_split_prompt_shows_both_value_vectors() -> None:
    env = envs.make("split_nocomm")
    obs, infos = env.reset(seed=4)
    a, b = env._values[0]
    assert f"hats {a[0]}, books {a[1]}, balls {a[2]}" in obs["alice"].split("other agent's values")[0]
    assert f"hats {b[0]}, books {b[1]}, balls {b[2]}." in obs["alice"].split("other agent's values")[1]
    assert infos["bob"]["state"]["my_values"] == b and infos["bob"]["state"]["opp_values"] == a


# -- Trust-and-Split -----------------------------------------------------------------------------
def _upper(hands: list[str]) -> int:
    """The seat holding the winning hand."""
    a, b = HANDS.index(hands[0]), HANDS.index(hands[1])
    return 0 if b == (a + 2) % 3 else 1


def test_tas_deal() -> None:
    counts: Counter = Counter()
    for record in play_scripted("trust_and_split", ("random", "random"), games=300, seed=0):
        for hands, values in zip(record.info["hands"], record.info["values"], strict=True):
            assert hands[0] != hands[1]
            up = _upper(hands)
            assert values[up] == 10 and values[1 - up] == 1
            counts[tuple(hands)] += 1
        starters = record.info["starter"]
        assert all(starters[t] == (starters[0] + t) % 2 for t in range(10))  # alternates
        assert starters[0] == record.info["first_starter"]
    assert len(counts) == 6 and all(abs(n - 500) < 100 for n in counts.values())


def test_tas_both_claim_10() -> None:
    """5 coins each: the upper hand gets 50, the lower 5 -> 27.5 each per round on average."""
    records = play_scripted("trust_and_split", ("always_claim_10", "always_claim_10"), games=400, seed=0)
    for r in records:
        for t, hands in enumerate(r.info["hands"]):
            up = _upper(hands)
            assert (r.rewards[up][t], r.rewards[1 - up][t]) == (50.0, 5.0)
    mean = np.mean([r.rewards for r in records], axis=(0, 2))
    assert mean == pytest.approx([27.5, 27.5], abs=1.0)


def test_tas_truthful_upper_takes_all() -> None:
    """Both truthful: the upper hand keeps 10 (100 points), the lower 0 -> 50 each on average."""
    records = play_scripted("trust_and_split", ("truthful", "truthful"), games=400, seed=0)
    for r in records:
        for t, hands in enumerate(r.info["hands"]):
            up = _upper(hands)
            assert (r.rewards[up][t], r.rewards[1 - up][t]) == (100.0, 0.0)
    assert np.mean([r.rewards for r in records], axis=(0, 2)) == pytest.approx([50, 50], abs=1.5)


def test_tas_always_10_against_truthful() -> None:
    """A (always 10) upper: B keeps 0 -> 100 / 0. B upper: both keep 10 -> 5 / 50. Means 52.5 vs 25."""
    records = play_scripted("trust_and_split", ("always_claim_10", "truthful"), games=400, seed=0)
    for r in records:
        for t, hands in enumerate(r.info["hands"]):
            expected = (100.0, 0.0) if _upper(hands) == 0 else (5.0, 50.0)
            assert (r.rewards[0][t], r.rewards[1][t]) == expected
    assert np.mean([r.rewards for r in records], axis=(0, 2)) == pytest.approx([52.5, 25], abs=1.5)


def test_tas_liar_against_truthful() -> None:
    """Liar second: it claims the hand beating the truthful one's, which keeps 0 -> liar 10 coins.
    Liar first: it tells its own hand; truthful keeps 10 when upper (5 coins each), else 0."""
    for r in play_scripted("trust_and_split", ("liar", "truthful"), games=100, seed=0):
        for t, (hands, values, starter) in enumerate(
            zip(r.info["hands"], r.info["values"], r.info["starter"], strict=True)
        ):
            liar_upper = _upper(hands) == 0
            truthful_keeps_0 = starter == 1 or liar_upper
            expected = (10.0 * values[0], 0.0) if truthful_keeps_0 else (5.0, 50.0)
            assert (r.rewards[0][t], r.rewards[1][t]) == expected
            if starter == 1:
                assert r.info["claims"][t][0] == HANDS[(HANDS.index(hands[1]) + 1) % 3]


def test_tas_uniform_values() -> None:
    for r in play_scripted("trust_and_split", ("truthful", "truthful"), games=50, seed=0, values="uniform"):
        assert r.info["hands"] == [None] * 10
        for t, (va, vb) in enumerate(r.info["values"]):
            assert 1 <= va <= 20 and 1 <= vb <= 20
            coins = (10, 0) if va > vb else (0, 10) if va < vb else (5, 5)
            assert (r.rewards[0][t], r.rewards[1][t]) == (coins[0] * va, coins[1] * vb)
            assert r.info["max_welfare"][t] == 10 * max(va, vb)


def test_tas_steps_prompts_and_rewards() -> None:
    """One round, step by step: starter writes, the other reads and replies, both propose."""
    env = envs.make("trust_and_split", n_rounds=2)
    obs, infos = env.reset(seed=2)
    s = 0 if infos["alice"]["acts"] else 1
    starter, second = envs.AGENTS[s], envs.AGENTS[1 - s]
    names = {"alice": "Alice", "bob": "Bob"}
    hand = {a: infos[a]["state"]["my_hand"] for a in envs.AGENTS}
    assert obs[second] == "" and not infos[second]["acts"] and infos[starter]["kind"] == "message"
    assert obs[starter].startswith(f"You are {names[starter]}")
    assert f"Your hand this round is {hand[starter]}." in obs[starter]
    assert hand[second] not in obs[starter].split("Your hand")[1]
    assert infos[starter]["regex"].startswith("<<message_start>>")

    obs, rewards, _, _, infos = env.step({starter: "<<message_start>> I hold rock <<message_end>>"})
    assert rewards == {"alice": 0.0, "bob": 0.0} and obs[starter] == ""
    assert obs[second].startswith(f"You are {names[second]}")  # its first turn carries the rules
    assert obs[second].endswith(
        f"Your hand this round is {hand[second]}.\n{names[starter]} said: I hold rock\n"
        "Send your message now as <<message_start>>...<<message_end>> (at most 500 characters)."
    )
    assert infos[second]["state"]["opp_claim"] == "rock"

    obs, rewards, _, _, infos = env.step({second: "no tags here, paper"})
    assert rewards == {"alice": 0.0, "bob": 0.0}
    assert infos[starter]["kind"] == infos[second]["kind"] == "proposal"
    assert obs[starter] == (
        f"{names[second]} said: no tags here, paper\n"
        "Submit your proposal as <<proposal_start>> x <<proposal_end>> where x is an integer from 0 to 10."
    )
    assert (
        obs[second]
        == "Submit your proposal as <<proposal_start>> x <<proposal_end>> where x is an integer from 0 to 10."
    )
    assert infos[starter]["regex"] == "<<proposal_start>> (10|[0-9]) <<proposal_end>>"

    obs, rewards, _, _, infos = env.step(
        {starter: "<<proposal_start>>6<<proposal_end>>", second: "<<proposal_start>> 12"}
    )
    values = env.game_info()["values"][0]
    assert rewards[starter] == 6 * values[s] and rewards[second] == 0.0  # invalid proposal keeps 0 coins
    last = infos["alice"]["last_round"]
    assert last["actions"][s] == "6" and last["actions"][1 - s] == "0"
    assert last["invalid"][1 - s] == 2 and last["invalid"][s] == 0  # untagged message + bad proposal
    assert last["messages"][s] == "I hold rock" and last["messages"][1 - s] == "no tags here, paper"
    # round 1: the other seat starts, with the recap
    assert infos[second]["acts"] and not infos[starter]["acts"] and infos[second]["round"] == 1
    upper = "an upper" if values[s] == 10 else "a lower"
    assert obs[second].startswith(f"In the previous round, {names[starter]} had {upper} hand and proposed 6 coins.\n")
    assert "You are" not in obs[second]


def test_tas_message_truncation() -> None:
    starters = set()
    for seed in range(8):  # both agents start in some of these games
        env = envs.make("trust_and_split", n_rounds=1)
        _, infos = env.reset(seed=seed)
        starter = "alice" if infos["alice"]["acts"] else "bob"
        starters.add(starter)
        env.step({starter: "<<message_start>>" + "x" * 600 + "<<message_end>>"})
        info = env.game_info()
        assert info["n_truncated"] == ([1, 0] if starter == "alice" else [0, 1])
        assert info["n_invalid"] == [0, 0]
        assert env._messages[envs.AGENTS.index(starter)] == "x" * 500
    assert starters == {"alice", "bob"}
