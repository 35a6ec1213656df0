"""`reciprocity play`: two agents play each other in both seat orders; prints each seat's mean
return per game and per round, cooperation figures (IPD), efficiency (Split, TAS) and welfare, as a
table or as one JSON object (format in sysdesign/games.md).

Agents are any spec of reciprocity/agents.py (parsed there). Two scripted strategies take the fast
path (envs.loop, no torch, Ray or vLLM import); any other seat is played by a rollout worker through
reciprocity/evaluate.py (`play_agents`), with the model and sampling of `--config`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from envs import EnvConfigError
from envs.loop import play_scripted
from envs.metrics import summarize
from reciprocity.config import Config, ConfigError, load_config, parse_options

EXIT_USAGE = 2


def run(
    game: str, agents: tuple[str, str], games: int, seed: int, options: dict[str, Any], cfg: Config | None = None
) -> dict[str, Any]:
    """The JSON object of `reciprocity play --json`: one entry per seat order."""
    from reciprocity.agents import resolve

    seats = resolve(game, agents, cfg or Config(), command="play")
    orders = [tuple(agents), (agents[1], agents[0])]
    if all(a.kind == "scripted" and a.player is not None for a in seats):
        first, second = (a.player.policy for a in seats)  # type: ignore[union-attr]
        figures = [summarize(game, play_scripted(game, pair, games, seed, **options))
                   for pair in ((first, second), (second, first))]
    else:
        import asyncio

        from reciprocity.evaluate import play_agents, stdout_to_stderr

        with stdout_to_stderr():  # vLLM's logs must not mix with the JSON on stdout
            figures = asyncio.run(play_agents(game, seats, games, cfg=cfg, seed=seed, options=options))
    result: dict[str, Any] = {"game": game, "games": games, "seed": seed}
    if options:
        result["options"] = options
    result["pairs"] = [{"agents": list(order), **f} for order, f in zip(orders, figures, strict=True)]
    return result


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


PER_SEAT = {
    "return/game": "return_per_game",
    "return/round": "return_per_round",
    "coop": "cooperation_rate",
    "P(C|opp C)": "p_coop_given_opp_coop",
    "P(C|opp D)": "p_coop_given_opp_defect",
    "invalid": "invalid_rate",
}
SHARED = {"efficiency": "efficiency", "welfare/round": "welfare_per_round"}
IPD_ONLY = ("coop", "P(C|opp C)", "P(C|opp D)")


def print_table(result: dict[str, Any]) -> None:
    """One row per seat of each seat order; columns that do not apply to the game are left out."""
    from rich.console import Console
    from rich.table import Table

    ipd = result["game"] == "ipd"
    per_seat = {k: v for k, v in PER_SEAT.items() if ipd or k not in IPD_ONLY}
    shared = {k: v for k, v in SHARED.items() if not (ipd and k == "efficiency")}
    table = Table(title=f"{result['game']}: {result['games']} games per seat order, seed {result['seed']}")
    for column in ["order", "seat", "agent", *per_seat, *shared]:
        table.add_column(column, justify="left" if column in ("order", "seat", "agent") else "right")
    for i, pair in enumerate(result["pairs"], 1):
        for seat, agent in enumerate(("alice", "bob")):
            cells = [pair[key][seat] for key in per_seat.values()]
            cells += [pair[key] if seat == 0 else None for key in shared.values()]
            table.add_row(str(i) if seat == 0 else "", agent, pair["agents"][seat], *map(_fmt, cells))
    console = Console()
    if not console.is_terminal:  # a pipe: do not squeeze the table to 80 columns
        console = Console(width=160)
    console.print(table)


def main(
    game: str,
    agents: tuple[str, str],
    games: int,
    seed: int,
    options: list[str],
    as_json: bool,
    config: Path | None = None,
) -> int:
    try:
        cfg = load_config(config) if config else None
        result = run(game, agents, games, seed, parse_options(options), cfg)
    except (EnvConfigError, ConfigError, ValueError) as e:
        from reciprocity.agents import AgentSpecError

        if not isinstance(e, EnvConfigError | ConfigError | AgentSpecError):
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if as_json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0
