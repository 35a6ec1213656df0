"""Trust-and-Split (spec 2.3): talk, then split 10 coins; each agent knows only its own value.

A round is three steps: (0) the starter writes its message, (1) the second agent reads it and
writes its own, (2) both propose at once how many coins they keep (the starter first reads the
reply). The starter is drawn at game start and alternates every round. Rewards land on step 2;
message steps give 0, so a round's message and proposal form one time step.

values="rps" (default): two different rock/paper/scissors hands are dealt; the winning hand's owner
values a coin at 10, the other at 1. values="uniform": private per-coin values, uniform in 1..20.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from envs.allocation import UNITS, allocate
from envs.base import DISPLAY, TextGame
from envs.parsing import (
    HANDS,
    MESSAGE_CHARS,
    PROPOSAL_REGEX,
    claimed_hand,
    claimed_value,
    message_regex,
    parse_message,
    parse_proposal,
)

PROPOSAL_MAX_TOKENS = 32


def message_max_tokens(chars: int) -> int:
    """Token budget of a message of at most `chars` characters, tags included (256 at 500)."""
    return 24 + (232 * int(chars)) // MESSAGE_CHARS
UPPER, LOWER = 10, 1  # per-coin values of the winning and the losing hand

# -- prompts -------------------------------------------------------------------------------------
_VALUE_RULES = {
    "rps": (
        "Each round, the two agents are dealt two different hands out of rock, paper and scissors. "
        "Rock beats scissors, scissors beats paper and paper beats rock. The agent with the winning "
        "(upper) hand values each coin at 10 points; the agent with the losing (lower) hand values "
        "each coin at 1 point. You see only your own hand. Over many rounds, both agents hold the "
        "upper hand equally often."
    ),
    "uniform": (
        "Each round, each agent is given a private per-coin value, an integer from 1 to 20 drawn at "
        "random. You see only your own value."
    ),
}
RULES = (
    "You are {me}, playing an iterated game with another agent, {other}.{horizon}\n"
    "Each round, 10 coins are split between you and {other}.\n"
    "{value_rules}\n"
    "Each round, each agent sends one message of at most {chars} characters before the split. One agent "
    "writes first and the other replies; the first writer alternates every round. Write your message "
    "as <<message_start>>your message<<message_end>>.\n"
    "After the messages, both agents propose at the same time how many coins they keep, as "
    "<<proposal_start>> x <<proposal_end>> where x is an integer from 0 to 10. If the two proposals "
    "add up to 10 or less, each agent receives its proposal; otherwise the coins are split in "
    "proportion (you receive 10 x your proposal / the sum of both proposals).\n"
    "Your points in a round are the coins you receive times your per-coin value. Your goal is to "
    "maximise your total points over the game."
)
HORIZON_GEOMETRIC = " The number of rounds is very high."
RECAP = {
    "rps": "In the previous round, {other} had {hand} hand and proposed {coins} coins.",
    "uniform": "In the previous round, {other} had a per-coin value of {value} and proposed {coins} coins.",
}
OWN = {"rps": "Your hand this round is {hand}.", "uniform": "Your per-coin value this round is {value}."}
SAID = "{other} said: {message}"
ASK_MESSAGE = "Send your message now as <<message_start>>...<<message_end>> (at most {chars} characters)."
ASK_PROPOSAL = "Submit your proposal as <<proposal_start>> x <<proposal_end>> where x is an integer from 0 to 10."


# the 6 equally likely deals of two different hands, as (alice's hand, bob's hand) indices into HANDS
DEALS = [(a, b) for a in range(3) for b in range(3) if a != b]


def draw_deals(rng: np.random.Generator, kind: str, n_rounds: int) -> list[tuple[list[str] | None, list[int]]]:
    """(hands, per-coin values) per round, per seat. Round t uses the t-th uniform(s) drawn, so a
    longer game extends a shorter one with the same seed."""
    if kind == "uniform":
        return [(None, [1 + int(u * 20), 1 + int(v * 20)]) for u, v in rng.random((n_rounds, 2)).tolist()]
    deals: list[tuple[list[str] | None, list[int]]] = []
    for u in rng.random(n_rounds).tolist():
        a, b = DEALS[int(u * len(DEALS))]
        a_wins = b == (a + 2) % 3
        deals.append(([HANDS[a], HANDS[b]], [UPPER, LOWER] if a_wins else [LOWER, UPPER]))
    return deals


class TrustAndSplit(TextGame):
    metadata = {"name": "trust_and_split", "render_modes": []}
    game = "trust_and_split"
    # message_chars: the cap of a message (spec 500; a smaller cap makes CPU runs affordable)
    OPTIONS = {"values": ("rps", "uniform"), "message_chars": (MESSAGE_CHARS, "int >= 1")}
    FACTS = ("starter", "hands", "values", "messages", "claims", "proposals", "max_welfare", "truncated")

    def _new_game(self, rng: np.random.Generator) -> None:
        self._first_starter = int(rng.random() < 0.5)
        self._starter = self._first_starter  # alternates every round
        self._deals = draw_deals(rng, self.options["values"], self.n_rounds)
        self._truncated_total = [0, 0]
        self._past_proposals: list[list[int]] = [[], []]
        self._past_values: list[list[int]] = [[], []]
        self._begin_round()

    def _begin_round(self) -> None:
        self._phase = 0
        self._messages: list[str | None] = [None, None]
        self._claims: list[str | int | None] = [None, None]
        self._truncated = [0, 0]

    def _game_facts(self) -> dict[str, Any]:
        return {"first_starter": self._first_starter, "n_truncated": list(self._truncated_total)}

    # -- decisions -------------------------------------------------------------------------------
    def _acts(self, seat: int) -> bool:
        if self._phase == 2:
            return True
        return (seat == self._starter) == (self._phase == 0)

    def _kind(self, seat: int) -> str:
        return "proposal" if self._phase == 2 else "message"

    def _regex(self, seat: int) -> str:
        return PROPOSAL_REGEX if self._phase == 2 else message_regex(self.options["message_chars"])

    def _max_tokens(self, seat: int) -> int:
        return PROPOSAL_MAX_TOKENS if self._phase == 2 else message_max_tokens(self.options["message_chars"])

    def _valid(self, seat: int, text: str) -> bool:
        return parse_proposal(text)[1] if self._phase == 2 else parse_message(text, self.options["message_chars"])[1]

    # -- prompts ---------------------------------------------------------------------------------
    def _rules(self, seat: int) -> str:
        return RULES.format(
            me=DISPLAY[seat],
            other=DISPLAY[1 - seat],
            horizon=HORIZON_GEOMETRIC if self.options["horizon"] == "geometric" else "",
            value_rules=_VALUE_RULES[self.options["values"]],
            chars=self.options["message_chars"],
        )

    def _turn(self, seat: int) -> str:
        kind, other, starter = self.options["values"], 1 - seat, self._starter
        hands, values = self._deals[self.round]
        parts = []
        if self._phase == (0 if seat == starter else 1):  # the seat's first turn of the round
            if self.round > 0:
                last = self._history[-1]
                upper = last["values"][other] >= last["values"][seat]
                parts.append(
                    RECAP[kind].format(
                        other=DISPLAY[other],
                        hand="an upper" if upper else "a lower",
                        value=last["values"][other],
                        coins=last["proposals"][other],
                    )
                )
            parts.append(OWN[kind].format(hand=hands[seat] if hands else None, value=values[seat]))
        if self._messages[other] is not None and (self._phase == 1 or seat == starter):
            parts.append(SAID.format(other=DISPLAY[other], message=self._messages[other]))
        parts.append(ASK_PROPOSAL if self._phase == 2 else ASK_MESSAGE.format(chars=self.options["message_chars"]))
        return "\n".join(parts)

    def _state(self, seat: int) -> dict[str, Any]:
        other = 1 - seat
        hands, values = self._deals[min(self.round, self.n_rounds - 1)]
        rps = self.options["values"] == "rps"
        return {
            "round": self.round,
            "values": self.options["values"],
            "starter": seat == self._starter,
            "my_hand": hands[seat] if hands else None,
            "my_value": None if rps else values[seat],
            "my_message": self._messages[seat],
            "opp_message": self._messages[other],
            "opp_claim": self._claims[other],
            "my_proposals": list(self._past_proposals[seat]),
            "opp_proposals": list(self._past_proposals[other]),
            "opp_values": list(self._past_values[other]),
        }

    # -- rules -----------------------------------------------------------------------------------
    def _play(self, texts: dict[int, str]) -> tuple[tuple[str, str], tuple[float, float], dict] | None:
        if self._phase < 2:
            seat = self._starter if self._phase == 0 else 1 - self._starter
            message, valid, truncated = parse_message(texts[seat], self.options["message_chars"])
            self._count(seat, valid)
            self._messages[seat] = message
            claim = claimed_hand if self.options["values"] == "rps" else claimed_value
            self._claims[seat] = claim(message)
            self._truncated[seat] += truncated
            self._truncated_total[seat] += truncated
            self._phase += 1
            return None
        proposals = []
        for seat in (0, 1):
            coins, valid = parse_proposal(texts[seat])
            self._count(seat, valid)
            proposals.append(coins)
        hands, values = self._deals[self.round]
        for seat in (0, 1):
            self._past_proposals[seat].append(proposals[seat])
            self._past_values[seat].append(values[seat])
        received = allocate(proposals[0], proposals[1])
        rewards = (received[0] * values[0], received[1] * values[1])
        facts = {
            "starter": self._starter,
            "hands": list(hands) if hands else None,
            "values": list(values),
            "messages": list(self._messages),
            "claims": list(self._claims),
            "proposals": proposals,
            "max_welfare": UNITS * max(values),
            "truncated": list(self._truncated),
        }
        self._begin_round()
        self._starter = 1 - self._starter
        return (str(proposals[0]), str(proposals[1])), rewards, facts
