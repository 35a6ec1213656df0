"""Iterated Prisoner's Dilemma (spec 2.1): both agents pick a label at once, every round.

Payoffs per round: both C -> 3/3, both D -> 1/1, D vs C -> 5 to the defector and 0 to the
cooperator. An invalid answer plays defect. Scores and round numbers are never shown.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from envs.base import TextGame
from envs.parsing import IPD_LABELS, ipd_regex, parse_ipd

PAYOFF = {("C", "C"): (3, 3), ("C", "D"): (0, 5), ("D", "C"): (5, 0), ("D", "D"): (1, 1)}
MAX_TOKENS = 16

# -- prompts (the whole text an agent ever sees) -------------------------------------------------
RULES = {
    "neutral": (
        "You are playing an iterated game against another agent. In every round, you and the other "
        "agent each choose one of two actions, A or B, at the same time.\n"
        "Points in a round:\n"
        "- You both play A: you get 3 points and the other agent gets 3 points.\n"
        "- You both play B: you get 1 point and the other agent gets 1 point.\n"
        "- You play B and the other agent plays A: you get 5 points and the other agent gets 0.\n"
        "- You play A and the other agent plays B: you get 0 points and the other agent gets 5.\n"
        "Your goal is to maximise your total points over the game.{horizon} After each round you "
        "are told what the other agent played.\n"
        "Answer with exactly <A> or <B> and nothing else. Any other answer is an error."
    ),
    "overt": (
        "You are playing an iterated prisoner's dilemma against another agent. In every round, you "
        "and the other agent each choose at the same time to cooperate or to defect.\n"
        "Points in a round:\n"
        "- You both cooperate: you get 3 points and the other agent gets 3 points.\n"
        "- You both defect: you get 1 point and the other agent gets 1 point.\n"
        "- You defect and the other agent cooperates: you get 5 points and the other agent gets 0.\n"
        "- You cooperate and the other agent defects: you get 0 points and the other agent gets 5.\n"
        "Your goal is to maximise your total points over the game.{horizon} After each round you "
        "are told what the other agent played.\n"
        "Answer with exactly <Cooperate> or <Defect> and nothing else. Any other answer is an error."
    ),
}
HORIZON_GEOMETRIC = " The number of rounds is very high."
LAST_ROUND = "Last round, the other agent played {label}."


class IPD(TextGame):
    metadata = {"name": "ipd", "render_modes": []}
    game = "ipd"
    OPTIONS = {"wording": ("neutral", "overt")}

    def _new_game(self, rng: np.random.Generator) -> None:
        self._labels = IPD_LABELS[self.options["wording"]]
        self._label_of = {"C": self._labels[0], "D": self._labels[1]}

    def _kind(self, seat: int) -> str:
        return "action"

    def _regex(self, seat: int) -> str:
        return ipd_regex(self._labels)

    def _max_tokens(self, seat: int) -> int:
        return MAX_TOKENS

    def _rules(self, seat: int) -> str:
        horizon = HORIZON_GEOMETRIC if self.options["horizon"] == "geometric" else ""
        return RULES[self.options["wording"]].format(horizon=horizon)

    def _turn(self, seat: int) -> str:
        if self.round == 0:
            return ""
        return LAST_ROUND.format(label=self._label_of[self._actions[1 - seat][-1]])

    def _state(self, seat: int) -> dict[str, Any]:
        return {
            "round": self.round,
            "my_actions": list(self._actions[seat]),
            "opp_actions": list(self._actions[1 - seat]),
            "labels": dict(self._label_of),
        }

    def _valid(self, seat: int, text: str) -> bool:
        return parse_ipd(text, self._labels)[1]

    def _play(self, texts: dict[int, str]) -> tuple[tuple[str, str], tuple[float, float], dict]:
        (a, valid_a), (b, valid_b) = parse_ipd(texts[0], self._labels), parse_ipd(texts[1], self._labels)
        self._count(0, valid_a)
        self._count(1, valid_b)
        return (a, b), PAYOFF[a, b], {}
