"""What the three games share: options, the horizon, text spaces, and the PettingZoo step loop.

A game is a sequence of rounds; a round is one or more steps (IPD and Split: one step in which both
agents decide; Trust-and-Split: starter's message, second agent's message, both proposals). A game
module subclasses `TextGame` and fills in the hooks at the bottom of the class: who acts, the
user-turn text, the structured state, and how a step's texts are parsed and scored.
"""

from __future__ import annotations

import secrets
import string
from typing import Any

import numpy as np
from gymnasium.spaces import Text
from pettingzoo import ParallelEnv

AGENTS: tuple[str, str] = ("alice", "bob")
DISPLAY = ("Alice", "Bob")  # how the seats are named inside prompts

DEFAULT_ROUNDS = 10
CONTINUE_PROB = 0.85  # geometric horizon: probability of playing one more round
GEOMETRIC_CAP = 30
MAX_TEXT_CHARS = 100_000  # bound of the Text spaces (actions longer than this are still accepted)
COMMON_OPTIONS: dict[str, tuple[Any, ...]] = {
    "horizon": ("fixed", "geometric"),
    "n_rounds": (None, "int >= 1"),  # fixed: the length (default 10); geometric: the cap (default 30)
    "length_seed": (None, "int >= 0"),  # geometric: seed of the length draw (default: the game's seed)
}


class EnvConfigError(ValueError):
    """An unknown game, option or option value; the message is one line and lists the valid ones."""


def resolve_options(game: str, given: dict[str, Any], extra: dict[str, tuple[Any, ...]]) -> dict[str, Any]:
    """Check `given` against the common and the game's options; fill in defaults (first listed value)."""
    valid = {**COMMON_OPTIONS, **extra}
    for key in given:
        if key not in valid:
            raise EnvConfigError(f"unknown option {key!r} for {game}; valid options: {', '.join(valid)}")
    options = {key: given.get(key, values[0]) for key, values in valid.items()}
    for key, values in valid.items():
        low = _int_low(values)
        n = options[key]
        if low is not None:  # an integer option: (default, "int >= low")
            if n is not None and (isinstance(n, bool) or not isinstance(n, int | np.integer) or n < low):
                raise EnvConfigError(f"invalid value {n!r} for option {key!r} of {game}; valid: an int >= {low}")
        elif n not in values:
            allowed = ", ".join(map(str, values))
            raise EnvConfigError(f"invalid value {n!r} for option {key!r} of {game}; valid: {allowed}")
    return options


def _int_low(values: tuple[Any, ...]) -> int | None:
    """The lower bound of an integer option declared as (default, "int >= N"); None otherwise."""
    last = values[-1]
    if isinstance(last, str) and last.startswith("int >= "):
        return int(last.removeprefix("int >= "))
    return None


def draw_n_rounds(seed: int, horizon: str, n_rounds: int | None) -> int:
    """Game length: `n_rounds` (default 10), or geometric (continue w.p. 0.85, cap `n_rounds` or 30).

    The geometric draw uses its own stream of the seed so that the values of round t do not
    depend on the horizon option. Give every game of an iteration the same seed here (the
    `length_seed` option) to draw one length per iteration, as the predecessor paper does.
    """
    if horizon == "fixed":
        return int(n_rounds or DEFAULT_ROUNDS)
    cap = int(n_rounds or GEOMETRIC_CAP)
    rng = np.random.default_rng([seed, 1])
    n = 1
    while n < cap and rng.random() < CONTINUE_PROB:
        n += 1
    return n


class TextGame(ParallelEnv):
    """A two-seat text game under the PettingZoo Parallel API (see sysdesign/contracts.md)."""

    metadata: dict[str, Any] = {"name": "text_game", "render_modes": []}
    game = ""
    OPTIONS: dict[str, tuple[Any, ...]] = {}  # game-specific options -> valid values, default first
    FACTS: tuple[str, ...] = ()  # keys of a round summary that game_info() lists per round

    def __init__(self, **options: Any) -> None:
        self.options = resolve_options(self.game, options, self.OPTIONS)
        self.possible_agents = list(AGENTS)
        self.agents: list[str] = []
        charset = string.printable
        self._obs_space = Text(MAX_TEXT_CHARS, min_length=0, charset=charset)
        self._act_space = Text(MAX_TEXT_CHARS, min_length=0, charset=charset)
        self.game_seed = 0
        self.n_rounds = 0
        self.round = 0

    # -- PettingZoo API ------------------------------------------------------------------------
    def observation_space(self, agent: str) -> Text:
        return self._obs_space

    def action_space(self, agent: str) -> Text:
        return self._act_space

    def reset(
        self, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
        """Start a game. All randomness comes from `seed` (a fresh one when None). `options` is
        ignored: a game's options are fixed by `envs.make`."""
        self.game_seed = int(seed) if seed is not None else secrets.randbits(32)
        length_seed = self.options["length_seed"]
        self.n_rounds = draw_n_rounds(
            self.game_seed if length_seed is None else length_seed, self.options["horizon"], self.options["n_rounds"]
        )
        self.round = 0
        self.agents = list(AGENTS)
        self._actions: list[list[str]] = [[], []]
        self._rewards: list[list[float]] = [[], []]
        self._invalid = [0, 0]
        self._decisions = [0, 0]
        self._round_invalid = [0, 0]
        self._history: list[dict[str, Any]] = []
        self._greeted = [False, False]
        self._new_game(np.random.default_rng(self.game_seed))
        acting = (self._acts(0), self._acts(1))
        return self._observations(acting), self._infos(acting, None)

    def step(self, actions: dict[str, Any]) -> tuple[dict, dict, dict, dict, dict]:
        """Apply the acting agents' raw texts; any value is accepted (non-strings are str()-ed)."""
        live = list(self.agents)
        if not live:
            return {}, {}, {}, {}, {}
        actions = actions or {}
        texts: dict[int, str] = {}
        for seat, agent in enumerate(AGENTS):
            if self._acts(seat):
                text = actions.get(agent, "")
                texts[seat] = text if isinstance(text, str) else ("" if text is None else str(text))
        result = self._play(texts)
        rewards = {agent: 0.0 for agent in live}
        summary = None
        if result is not None:
            summary = self._end_round(*result)
            rewards = {agent: summary["rewards"][seat] for seat, agent in enumerate(AGENTS)}
        done = self.round >= self.n_rounds
        acting = (False, False) if done else (self._acts(0), self._acts(1))
        observations = self._observations(acting)
        infos = self._infos(acting, summary)
        terminations = {agent: done for agent in live}
        truncations = {agent: False for agent in live}
        if done:
            self.agents = []
        return observations, rewards, terminations, truncations, infos

    # -- the project's additions to the API --------------------------------------------------
    def valid(self, agent: str, text: str) -> bool:
        """Whether `text` is a valid output for `agent`'s pending decision (False if none)."""
        seat = AGENTS.index(agent)
        return bool(self.agents) and self._acts(seat) and self._valid(seat, text)

    def game_info(self) -> dict[str, Any]:
        """JSON-serialisable facts of the whole game so far; per-round facts are lists over rounds."""
        info: dict[str, Any] = {
            "game": self.game,
            "seed": self.game_seed,
            "options": dict(self.options),
            "n_rounds": self.n_rounds,
            "rounds_played": len(self._history),
            "actions": [list(a) for a in self._actions],
            "rewards": [list(r) for r in self._rewards],
            "n_invalid": list(self._invalid),
            "n_decisions": list(self._decisions),
        }
        for key in self.FACTS:
            info[key] = [summary[key] for summary in self._history]
        info.update(self._game_facts())
        return info

    def render(self) -> None:
        return None

    def close(self) -> None:
        return None

    # -- bookkeeping for subclasses -----------------------------------------------------------
    def _count(self, seat: int, valid: bool) -> None:
        """Record one decision of `seat` and whether its text was valid."""
        self._decisions[seat] += 1
        if not valid:
            self._invalid[seat] += 1
            self._round_invalid[seat] += 1

    def _end_round(self, actions: tuple[str, str], rewards: tuple[float, float], facts: dict) -> dict:
        summary = {
            "round": self.round,
            "actions": list(actions),
            "rewards": [float(rewards[0]), float(rewards[1])],
            "invalid": list(self._round_invalid),
            **facts,
        }
        for seat in (0, 1):
            self._actions[seat].append(actions[seat])
            self._rewards[seat].append(summary["rewards"][seat])
        self._history.append(summary)
        self._round_invalid = [0, 0]
        self.round += 1
        return summary

    def _observations(self, acting: tuple[bool, bool]) -> dict[str, str]:
        out = {}
        for seat, agent in enumerate(AGENTS):
            if not acting[seat]:
                out[agent] = ""
                continue
            turn = self._turn(seat)
            if not self._greeted[seat]:
                self._greeted[seat] = True
                turn = self._rules(seat) + ("\n\n" + turn if turn else "")
            out[agent] = turn
        return out

    def _infos(self, acting: tuple[bool, bool], summary: dict | None) -> dict[str, dict[str, Any]]:
        infos = {}
        for seat, agent in enumerate(AGENTS):
            acts = acting[seat]
            info: dict[str, Any] = {
                "acts": acts,
                "round": self.round,
                "kind": self._kind(seat),
                "regex": self._regex(seat) if acts else "",
                "max_tokens": self._max_tokens(seat) if acts else 0,
                "state": self._state(seat),
            }
            if summary is not None:
                info["last_round"] = summary
            infos[agent] = info
        return infos

    # -- hooks --------------------------------------------------------------------------------
    def _new_game(self, rng: np.random.Generator) -> None:
        """Draw everything random for rounds 0..n_rounds-1 from `rng`, in round order."""

    def _game_facts(self) -> dict[str, Any]:
        """Whole-game facts for game_info() beyond the per-round FACTS."""
        return {}

    def _acts(self, seat: int) -> bool:
        """Whether `seat` decides in the next step (the game is not over)."""
        return True

    def _kind(self, seat: int) -> str:
        raise NotImplementedError

    def _regex(self, seat: int) -> str:
        raise NotImplementedError

    def _max_tokens(self, seat: int) -> int:
        raise NotImplementedError

    def _rules(self, seat: int) -> str:
        """The rules text that opens the seat's chat (its first user turn)."""
        raise NotImplementedError

    def _turn(self, seat: int) -> str:
        """The user-turn text of the seat's pending decision (without the rules)."""
        raise NotImplementedError

    def _state(self, seat: int) -> dict[str, Any]:
        raise NotImplementedError

    def _valid(self, seat: int, text: str) -> bool:
        raise NotImplementedError

    def _play(self, texts: dict[int, str]) -> tuple[tuple[str, str], tuple[float, float], dict] | None:
        """Parse and apply the acting seats' texts. Return (canonical actions, rewards, facts)
        when the step ends the round, else None."""
        raise NotImplementedError
