"""Scripted strategies: `make(game, name, seed)` -> an agent whose `act(info)` returns valid raw text
for the pending decision, read from `info["kind"]` and `info["state"]` only (never the prompt).

IPD: always_cooperate, always_defect, tit_for_tat, grim_trigger, suspicious_tit_for_tat, random
(cooperates with probability 0.5; `random_<p>` for another p). Split: greedy, welfare_maximising,
random. Trust-and-Split: always_claim_10 (tells its hand honestly, keeps 10), truthful (tells its
hand honestly; keeps 10 when the other's claimed hand loses to its own, 0 when it wins, 5 when the
other has claimed no hand or its own hand), liar (keeps 10; claims the hand that beats the other's
claimed hand, or its own hand when it writes first), random. With values="uniform" a hand claim is
a per-coin value claim and the liar claims 20. Every game has `random`: uniformly random valid play.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from envs import check_game
from envs.base import EnvConfigError
from envs.parsing import HANDS, format_message, format_proposal, format_split

Decide = Callable[[dict[str, Any], random.Random], str]


class Scripted:
    """A scripted seat. `reset(seed)` restarts its random stream (strategies keep no other memory:
    the history they react to is in info["state"])."""

    def __init__(self, game: str, name: str, decide: Decide, seed: int = 0) -> None:
        self.game, self.name, self._decide, self.seed = game, name, decide, seed
        self._rng = random.Random(seed)

    def reset(self, seed: int | None = None) -> None:
        if seed is not None:
            self.seed = seed
        self._rng = random.Random(self.seed)

    def act(self, info: dict[str, Any]) -> str:
        """Raw text for the pending decision; "" when the seat does not act."""
        return self._decide(info, self._rng) if info.get("acts") else ""

    def __repr__(self) -> str:
        return f"Scripted({self.game!r}, {self.name!r})"


# -- IPD: a rule maps the state to "C" or "D" ----------------------------------------------------
def _ipd(rule: Callable[[dict[str, Any], random.Random], str]) -> Decide:
    return lambda info, rng: info["state"]["labels"][rule(info["state"], rng)]


def _random_ipd(p: float) -> Decide:
    return _ipd(lambda s, rng: "C" if rng.random() < p else "D")


IPD = {
    "always_cooperate": _ipd(lambda s, rng: "C"),
    "always_defect": _ipd(lambda s, rng: "D"),
    "tit_for_tat": _ipd(lambda s, rng: s["opp_actions"][-1] if s["opp_actions"] else "C"),
    "grim_trigger": _ipd(lambda s, rng: "D" if "D" in s["opp_actions"] else "C"),
    "suspicious_tit_for_tat": _ipd(lambda s, rng: s["opp_actions"][-1] if s["opp_actions"] else "D"),
    "random": _random_ipd(0.5),
}


# -- Split No-Comm: a rule maps the state to (hats, books, balls) kept ---------------------------
def _welfare_maximising(state: dict[str, Any]) -> list[int]:
    """All of the items it values more, half of the ties, none of the others."""
    return [10 if a > b else 5 if a == b else 0 for a, b in zip(state["my_values"], state["opp_values"], strict=True)]


SPLIT: dict[str, Decide] = {
    "greedy": lambda info, rng: format_split([10, 10, 10]),
    "welfare_maximising": lambda info, rng: format_split(_welfare_maximising(info["state"])),
    "random": lambda info, rng: format_split([rng.randint(0, 10) for _ in range(3)]),
}


# -- Trust-and-Split: a claim for the message step, a coin count for the proposal step ----------
def _claim_text(claim: str | int) -> str:
    return f"My hand is {claim}." if isinstance(claim, str) else f"My per-coin value is {claim}."


def _own(state: dict[str, Any]) -> str | int:
    return state["my_hand"] if state["values"] == "rps" else state["my_value"]


def _beats(state: dict[str, Any], claim: str | int) -> bool | None:
    """Whether the seat's own hand/value beats a claimed one: True, False, or None (a tie)."""
    if state["values"] == "rps":
        mine, theirs = HANDS.index(state["my_hand"]), HANDS.index(str(claim))
        return None if mine == theirs else theirs == (mine + 2) % 3
    return None if state["my_value"] == claim else state["my_value"] > int(claim)


def _truthful_coins(state: dict[str, Any]) -> int:
    """Upper hand takes all 10, lower takes 0; 5 when the other's hand is unknown (or a tie)."""
    if state["opp_claim"] is None:
        return 5
    wins = _beats(state, state["opp_claim"])
    return 5 if wins is None else 10 if wins else 0


def _lie(state: dict[str, Any]) -> str | int:
    """Claim the upper hand: the hand that beats the other's claim (own hand when writing first)."""
    if state["values"] == "uniform":
        return 20
    claim = state["opp_claim"]
    return HANDS[(HANDS.index(claim) + 1) % 3] if claim in HANDS else state["my_hand"]


def _random_claim(state: dict[str, Any], rng: random.Random) -> str | int:
    return HANDS[rng.randrange(3)] if state["values"] == "rps" else rng.randint(1, 20)


def _tas(message: Callable[..., str | int], coins: Callable[..., int]) -> Decide:
    def decide(info: dict[str, Any], rng: random.Random) -> str:
        if info["kind"] == "message":
            return format_message(_claim_text(message(info["state"], rng)))
        return format_proposal(coins(info["state"], rng))

    return decide


TAS = {
    "always_claim_10": _tas(lambda s, rng: _own(s), lambda s, rng: 10),
    "truthful": _tas(lambda s, rng: _own(s), lambda s, rng: _truthful_coins(s)),
    "liar": _tas(lambda s, rng: _lie(s), lambda s, rng: 10),
    "random": _tas(_random_claim, lambda s, rng: rng.randint(0, 10)),
}

STRATEGIES: dict[str, dict[str, Decide]] = {"ipd": IPD, "split_nocomm": SPLIT, "trust_and_split": TAS}
NAMES: dict[str, tuple[str, ...]] = {game: tuple(table) for game, table in STRATEGIES.items()}


def make(game: str, name: str, seed: int = 0) -> Scripted:
    """The scripted strategy `name` of `game`; EnvConfigError listing the valid names otherwise."""
    check_game(game)
    table = STRATEGIES[game]
    if name in table:
        return Scripted(game, name, table[name], seed)
    if game == "ipd" and name.startswith("random_"):
        try:
            p = float(name.removeprefix("random_"))
        except ValueError:
            p = -1.0
        if 0.0 <= p <= 1.0:
            return Scripted(game, name, _random_ipd(p), seed)
    extra = ", random_<p>" if game == "ipd" else ""
    raise EnvConfigError(f"unknown scripted strategy {name!r} for {game}; valid: {', '.join(table)}{extra}")
