"""`reciprocity play`: two agents play each other in both seat orders; prints each seat's mean
return per game and per round, cooperation figures (IPD), efficiency (Split, TAS) and welfare, as a
table or as one JSON object (format in sysdesign/games.md).

Agents are any spec of reciprocity/agents.py. Two scripted strategies (`NAME` or `scripted:NAME`)
take the fast path (envs.loop, no torch, Ray or vLLM import); any other seat is played by a rollout
worker through reciprocity/evaluate.py (`play_agents`), with the model and sampling of `--config`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from envs import EnvConfigError, check_game
from envs import scripted as scripted_
from envs.loop import play_scripted
from envs.metrics import summarize
from reciprocity.config import Config, ConfigError, load_config

EXIT_USAGE = 2


def parse_options(items: list[str]) -> dict[str, Any]:
    """`["wording=overt", "n_rounds=5"]` -> {"wording": "overt", "n_rounds": 5} (ints as ints)."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise EnvConfigError(f"bad option {item!r}; expected KEY=VALUE")
        options[key] = int(value) if value.lstrip("-").isdigit() else value
    return options


def scripted_name(spec: str) -> str | None:
    """The strategy of a scripted spec (`NAME` or `scripted:NAME`); None for any other agent form."""
    name = spec.removeprefix("scripted:")
    return None if ":" in name or name in ("base", "human") else name


def run(
    game: str, agents: tuple[str, str], games: int, seed: int, options: dict[str, Any], cfg: Config | None = None
) -> dict[str, Any]:
    """The JSON object of `reciprocity play --json`: one entry per seat order."""
    check_game(game)
    first, second = scripted_name(agents[0]), scripted_name(agents[1])
    orders = [tuple(agents), (agents[1], agents[0])]
    if first is not None and second is not None:
        for name in (first, second):
            scripted_.make(game, name)
        figures = [summarize(game, play_scripted(game, pair, games, seed, **options))
                   for pair in ((first, second), (second, first))]
    else:
        import asyncio

        from reciprocity.evaluate import play_agents, stdout_to_stderr

        with stdout_to_stderr():  # vLLM's logs must not mix with the JSON on stdout
            figures = asyncio.run(play_agents(game, agents, games, cfg=cfg, seed=seed, options=options))
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
        agents_module = sys.modules.get("reciprocity.agents")  # imported only for a non-scripted seat
        if not isinstance(e, EnvConfigError | ConfigError) and not (
            agents_module is not None and isinstance(e, agents_module.AgentSpecError)
        ):
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if as_json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0
