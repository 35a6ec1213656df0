"""A scripted-only game loop over the public env API (the LLM match runner lives in actors/)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from envs import AGENTS, TextGame, make
from envs import scripted as scripted_
from envs.metrics import GameRecord


def play_game(env: TextGame, seats: Sequence[scripted_.Scripted], seed: int) -> GameRecord:
    """Play one game of `env` with seed `seed`; seats[0] is alice."""
    _, infos = env.reset(seed=seed)
    while env.agents:
        actions = {agent: seats[i].act(infos[agent]) for i, agent in enumerate(AGENTS) if infos[agent]["acts"]}
        _, _, _, _, infos = env.step(actions)
    return GameRecord.from_game_info(env.game_info())


def play_scripted(game: str, names: Sequence[str], games: int, seed: int = 0, **options: Any) -> list[GameRecord]:
    """`games` games of names[0] (alice) against names[1] (bob); game i uses seed `seed + i`, and
    seat s's random stream restarts from seed 2 * (seed + i) + s."""
    env = make(game, **options)
    seats = [scripted_.make(game, name) for name in names]
    records = []
    for i in range(games):
        for s, seat in enumerate(seats):
            seat.reset(seed=2 * (seed + i) + s)
        records.append(play_game(env, seats, seed + i))
    return records
