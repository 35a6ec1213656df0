"""Split No-Comm (spec 2.2): split 10 hats, 10 books and 10 balls, no communication.

Each round both agents' per-unit values (1 or 10 per item, public) are redrawn; both propose at
once how many units of each item they keep; each item is allocated in proportion to the claims.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from envs.allocation import UNITS, allocate
from envs.base import TextGame
from envs.parsing import SPLIT_REGEX, format_split, parse_split

MAX_TOKENS = 48

# -- prompts -------------------------------------------------------------------------------------
RULES = (
    "You are playing an iterated negotiation game against another agent.{horizon}\n"
    "Each round, 10 hats, 10 books and 10 balls are split between you and the other agent. Each "
    "agent values one unit of each item at either 1 or 10 points; the values are drawn anew every "
    "round, and both agents see both agents' values.\n"
    "Each round, you and the other agent propose at the same time how many units of each item you "
    "keep (an integer from 0 to 10 per item). For each item, if the two proposals add up to 10 or "
    "less, each agent receives what it proposed; otherwise the 10 units are split in proportion to "
    "the proposals (you receive 10 x your proposal / the sum of both proposals).\n"
    "Your points in a round are the units you receive times your value per unit, summed over the "
    "items. Your goal is to maximise your total points over the game.\n"
    "Answer in the format: Proposal: x hats, y books, z balls"
)
HORIZON_GEOMETRIC = " The number of rounds is very high."
LAST_ROUND = (
    "Last round, you proposed {mine} and received {my_points:.1f} points; the other agent proposed "
    "{theirs} and received {their_points:.1f} points."
)
VALUES = (
    "This round, your values per unit are: hats {a[0]}, books {a[1]}, balls {a[2]}. The other "
    "agent's values per unit are: hats {b[0]}, books {b[1]}, balls {b[2]}."
)
ASK = "Submit your proposal as: Proposal: x hats, y books, z balls"


def _accepted(code: int) -> tuple[list[int], list[int]] | None:
    """Six fair bits -> both agents' per-unit values (bit set -> 10, else 1), if the rejection rule
    keeps them: equal totals, and the two vectors differ somewhere."""
    values = [10 if code >> i & 1 else 1 for i in range(6)]
    a, b = values[:3], values[3:]
    return (a, b) if sum(a) == sum(b) and a != b else None


PATTERNS = {code: pair for code in range(64) if (pair := _accepted(code)) is not None}  # the 12 patterns
BATCH = 16  # candidates drawn at once; a batch is all rejected with probability (52/64)**16 < 0.04


def draw_values(rng: np.random.Generator, n_rounds: int) -> list[tuple[list[int], list[int]]]:
    """Per round, per-unit values of (hats, books, balls) for both agents: i.i.d. 1 or 10, resampled
    until the totals are equal and the vectors differ somewhere (12 equally likely patterns).
    Candidates (six fair bits each) are drawn in batches, round after round, from one stream."""
    out = []
    for _ in range(n_rounds):
        code = None
        while code is None:
            code = next((c for u in rng.random(BATCH).tolist() if (c := int(u * 64)) in PATTERNS), None)
        a, b = PATTERNS[code]
        out.append((list(a), list(b)))
    return out


def max_welfare(values_a: list[int], values_b: list[int]) -> int:
    """Welfare of the best split: every unit to the agent that values it more."""
    return sum(UNITS * max(va, vb) for va, vb in zip(values_a, values_b, strict=True))


class SplitNoComm(TextGame):
    metadata = {"name": "split_nocomm", "render_modes": []}
    game = "split_nocomm"
    FACTS = ("values", "proposals", "max_welfare")

    def _new_game(self, rng: np.random.Generator) -> None:
        self._values = draw_values(rng, self.n_rounds)
        self._past_proposals: list[list[tuple[int, int, int]]] = [[], []]

    def _kind(self, seat: int) -> str:
        return "proposal"

    def _regex(self, seat: int) -> str:
        return SPLIT_REGEX

    def _max_tokens(self, seat: int) -> int:
        return MAX_TOKENS

    def _rules(self, seat: int) -> str:
        return RULES.format(horizon=HORIZON_GEOMETRIC if self.options["horizon"] == "geometric" else "")

    def _turn(self, seat: int) -> str:
        values = self._values[self.round]
        parts = []
        if self.round > 0:
            last = self._history[-1]
            parts.append(
                LAST_ROUND.format(
                    mine=_units(last["proposals"][seat]),
                    my_points=last["rewards"][seat],
                    theirs=_units(last["proposals"][1 - seat]),
                    their_points=last["rewards"][1 - seat],
                )
            )
        parts.append(VALUES.format(a=values[seat], b=values[1 - seat]))
        parts.append(ASK)
        return "\n".join(parts)

    def _state(self, seat: int) -> dict[str, Any]:
        values = self._values[min(self.round, self.n_rounds - 1)]
        return {
            "round": self.round,
            "my_values": list(values[seat]),
            "opp_values": list(values[1 - seat]),
            "my_proposals": [list(p) for p in self._past_proposals[seat]],
            "opp_proposals": [list(p) for p in self._past_proposals[1 - seat]],
        }

    def _valid(self, seat: int, text: str) -> bool:
        return parse_split(text)[1]

    def _play(self, texts: dict[int, str]) -> tuple[tuple[str, str], tuple[float, float], dict]:
        values = self._values[self.round]
        proposals = []
        for seat in (0, 1):
            units, valid = parse_split(texts[seat])
            self._count(seat, valid)
            proposals.append(list(units))
            self._past_proposals[seat].append(units)
        rewards = [0.0, 0.0]
        for item, (claim_a, claim_b) in enumerate(zip(*proposals, strict=True)):
            got_a, got_b = allocate(claim_a, claim_b)
            rewards[0] += got_a * values[0][item]
            rewards[1] += got_b * values[1][item]
        actions = tuple(",".join(map(str, p)) for p in proposals)
        facts = {
            "values": [list(values[0]), list(values[1])],
            "proposals": proposals,
            "max_welfare": max_welfare(*values),
        }
        return (actions[0], actions[1]), (rewards[0], rewards[1]), facts


def _units(units: list[int]) -> str:
    """`3 hats, 0 books, 10 balls`: a proposal as the prompt shows it."""
    return format_split(units).removeprefix("Proposal: ")
