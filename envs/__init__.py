"""The games: Iterated Prisoner's Dilemma, Split No-Comm and Trust-and-Split, as PettingZoo
Parallel environments with text observations and text actions (see sysdesign/games.md)."""

from __future__ import annotations

from typing import Any

from envs.base import AGENTS, EnvConfigError, TextGame
from envs.ipd import IPD
from envs.split_nocomm import SplitNoComm
from envs.trust_and_split import TrustAndSplit

GAMES: dict[str, type[TextGame]] = {"ipd": IPD, "split_nocomm": SplitNoComm, "trust_and_split": TrustAndSplit}

__all__ = ["AGENTS", "GAMES", "EnvConfigError", "TextGame", "check_game", "make"]


def check_game(name: str) -> type[TextGame]:
    """The env class of `name`; EnvConfigError listing the valid games otherwise."""
    if name not in GAMES:
        raise EnvConfigError(f"unknown game {name!r}; valid games: {', '.join(GAMES)}")
    return GAMES[name]


def make(name: str, **options: Any) -> TextGame:
    """A fresh env of game `name` with `options` (common: horizon, n_rounds; ipd: wording;
    trust_and_split: values). Call reset(seed=...) before stepping."""
    return check_game(name)(**options)
