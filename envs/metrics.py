"""Game figures from per-game records: pure functions, independent of how a record was produced
(scripted play here, LLM rollouts in the trainer). Lists are per seat, alice first; a figure that
does not apply to a game (or has no data) is None.

- return_per_game: mean over games of the seat's summed rewards.
- return_per_round: the seat's total reward / total rounds (pooled over games).
- cooperation_rate (IPD): the share of the seat's rounds played C.
- p_coop_given_opp_coop / p_coop_given_opp_defect (IPD): P(seat plays C in round t | the opponent
  played C / D in round t-1), pooled over t >= 1 and games.
- efficiency (Split, TAS): mean over rounds of round welfare / the round's maximal welfare
  (Split: sum over items of 10 * max(v_A, v_B); TAS: 10 * max(v_A, v_B)).
- welfare_per_round: mean over rounds of the sum of both seats' rewards.
- fairness (Split, TAS; ours): mean over games of 1 - |R_A - R_B| / (R_A + R_B) with R a seat's
  summed rewards: 1 when both seats score alike, 0 when one seat takes everything (a game where
  both score 0 counts as fair).
- invalid_rate: the seat's invalid outputs / its decisions.
Trust-and-Split also gets mean_proposal (coins kept), honest_claim_rate (messages naming the
seat's true hand or value, among messages that name one) and mean_message_chars.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class GameRecord:
    """One game as the metrics need it. actions[seat][t] is the canonical action string of round t
    (IPD "C"/"D", Split "x,y,z", TAS the coins kept); rewards[seat][t] the round's reward."""

    game: str
    actions: list[list[str]]
    rewards: list[list[float]]
    info: dict[str, Any] = field(default_factory=dict)
    n_invalid: list[int] = field(default_factory=lambda: [0, 0])
    n_decisions: list[int] = field(default_factory=lambda: [0, 0])

    @classmethod
    def from_game_info(cls, info: dict[str, Any]) -> GameRecord:
        """A record from `env.game_info()`."""
        return cls(info["game"], info["actions"], info["rewards"], info, info["n_invalid"], info["n_decisions"])


Pair = list[float | None]


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _per_seat(num: Sequence[float], den: Sequence[float]) -> Pair:
    return [_ratio(num[0], den[0]), _ratio(num[1], den[1])]


def return_per_game(records: Sequence[GameRecord]) -> Pair:
    return _per_seat([sum(sum(r.rewards[s]) for r in records) for s in (0, 1)], [len(records)] * 2)


def return_per_round(records: Sequence[GameRecord]) -> Pair:
    rounds = [sum(len(r.rewards[s]) for r in records) for s in (0, 1)]
    return _per_seat([sum(sum(r.rewards[s]) for r in records) for s in (0, 1)], rounds)


def cooperation_rate(records: Sequence[GameRecord]) -> Pair:
    coop = [sum(r.actions[s].count("C") for r in records) for s in (0, 1)]
    return _per_seat(coop, [sum(len(r.actions[s]) for r in records) for s in (0, 1)])


def p_coop_given_opp(records: Sequence[GameRecord], opp_last: str) -> Pair:
    """P(C at t | opponent played `opp_last` at t-1), per seat."""
    out: Pair = []
    for seat in (0, 1):
        hits = total = 0
        for r in records:
            mine, theirs = r.actions[seat], r.actions[1 - seat]
            for t in range(1, min(len(mine), len(theirs))):
                if theirs[t - 1] == opp_last:
                    total += 1
                    hits += mine[t] == "C"
        out.append(_ratio(hits, total))
    return out


def welfare_per_round(records: Sequence[GameRecord]) -> float | None:
    welfare = sum(sum(r.rewards[0]) + sum(r.rewards[1]) for r in records)
    return _ratio(welfare, sum(len(r.rewards[0]) for r in records))


def fairness(records: Sequence[GameRecord]) -> float | None:
    """Mean over games of 1 - |R_A - R_B| / (R_A + R_B) (1 for a game where both score 0)."""
    if not records:
        return None
    per_game = []
    for r in records:
        a, b = sum(r.rewards[0]), sum(r.rewards[1])
        per_game.append(1.0 if a + b <= 0 else 1.0 - abs(a - b) / (a + b))
    return sum(per_game) / len(per_game)


def efficiency(records: Sequence[GameRecord]) -> float | None:
    """Mean over rounds of welfare / maximal welfare (records need info["max_welfare"] per round)."""
    shares = [
        (ra + rb) / best
        for r in records
        for ra, rb, best in zip(r.rewards[0], r.rewards[1], r.info["max_welfare"], strict=False)
    ]
    return _ratio(sum(shares), len(shares))


def invalid_rate(records: Sequence[GameRecord]) -> Pair:
    return _per_seat(
        [sum(r.n_invalid[s] for r in records) for s in (0, 1)],
        [sum(r.n_decisions[s] for r in records) for s in (0, 1)],
    )


def tas_statistics(records: Sequence[GameRecord]) -> dict[str, Pair]:
    """Proposal and message statistics of Trust-and-Split (records need info messages/claims/values)."""
    coins: list[list[int]] = [[], []]
    honest: list[list[bool]] = [[], []]
    chars: list[list[int]] = [[], []]
    for r in records:
        kind = r.info.get("options", {}).get("values", "rps")
        for t, (messages, claims) in enumerate(zip(r.info["messages"], r.info["claims"], strict=True)):
            truth = r.info["hands"][t] if kind == "rps" else r.info["values"][t]
            for seat in (0, 1):
                coins[seat].append(int(r.actions[seat][t]))
                chars[seat].append(len(messages[seat] or ""))
                if claims[seat] is not None:
                    honest[seat].append(claims[seat] == truth[seat])
    return {
        "mean_proposal": _per_seat([sum(c) for c in coins], [len(c) for c in coins]),
        "honest_claim_rate": _per_seat([sum(h) for h in honest], [len(h) for h in honest]),
        "mean_message_chars": _per_seat([sum(c) for c in chars], [len(c) for c in chars]),
    }


def summarize(game: str, records: Sequence[GameRecord]) -> dict[str, Any]:
    """All figures of one (ordered) pairing, as in `reciprocity play --json`."""
    ipd = game == "ipd"
    out: dict[str, Any] = {
        "return_per_game": return_per_game(records),
        "return_per_round": return_per_round(records),
        "cooperation_rate": cooperation_rate(records) if ipd else [None, None],
        "p_coop_given_opp_coop": p_coop_given_opp(records, "C") if ipd else [None, None],
        "p_coop_given_opp_defect": p_coop_given_opp(records, "D") if ipd else [None, None],
        "efficiency": None if ipd or not records else efficiency(records),
        "welfare_per_round": welfare_per_round(records),
        "invalid_rate": invalid_rate(records),
    }
    if not ipd:
        out["fairness"] = fairness(records)
    if game == "trust_and_split" and records:
        out.update(tas_statistics(records))
    return out
