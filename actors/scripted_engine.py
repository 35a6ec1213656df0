"""Scripted seats: the strategies of `envs.scripted` behind the text-seat interface.

A scripted strategy reads the pending decision's structured `info` (never the prompt) and returns
valid raw text. Each match gets its own player (its own random stream), so concurrent matches of
one engine do not share state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from actors.engine import Sampling
from actors.match import TextDecision
from envs import scripted


class ScriptedPlayer:
    """One seat of one match played by a scripted strategy."""

    def __init__(self, strategy: scripted.Scripted) -> None:
        self.strategy = strategy

    async def decide(
        self,
        messages: list[dict[str, str]],
        info: dict[str, Any],
        valid: Callable[[str], bool],
        sampling: Sampling,
    ) -> TextDecision:
        return TextDecision(text=self.strategy.act(info))


class ScriptedEngine:
    """A text engine for the scripted strategy `name` (e.g. "tit_for_tat"); see envs.scripted.NAMES."""

    kind = "text"

    def __init__(self, name: str) -> None:
        self.name = name

    def player(self, game: str, seat: int, seed: int) -> ScriptedPlayer:
        """A fresh strategy instance for one seat of one match (EnvConfigError if unknown)."""
        return ScriptedPlayer(scripted.make(game, self.name, seed=seed))

    def __repr__(self) -> str:
        return f"ScriptedEngine({self.name!r})"
