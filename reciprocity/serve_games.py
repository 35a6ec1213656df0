"""Games between a human and a served agent: the sessions behind the Serve app's web page.

A session is one game of `envs.make(game)` (PettingZoo Parallel API) with the human in one seat and
the agent (the base model or an adapter) in the other. The agent seat is `actors.match.TokenSeat`:
the same token-in-token-out chat, sampling and guided decoding on the decision's regex as in
rollouts. The human's move is checked with `env.valid` first: a move that does not parse is refused
(`GameError`, 400) with the expected format and is not played. Steps where only the agent acts (a
Trust-and-Split message it writes first) are played at once; in a simultaneous step the agent
decides after the human submitted, from its own observation, which never holds the human's move.

Sessions live in memory, keyed by an unguessable id, at most `max_sessions` (the least recently
used one is dropped first) and each for at most `ttl_s` of idleness. Every text in a session's
state is plain text: the page renders it with `textContent`, never as HTML (model text is
untrusted).
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import envs
from actors.chat import ChatTemplate
from actors.engine import Engine
from actors.match import SeatSpec, TokenSeat
from actors.trajectories import SeatTrajectory
from envs import AGENTS, TextGame
from envs.allocation import UNITS
from envs.parsing import HANDS, MESSAGE_CHARS, SPLIT_ITEMS, format_message, format_proposal, format_split

GAMES = ("ipd", "split_nocomm", "trust_and_split")
SEATS = AGENTS
MAX_MOVE_CHARS = MESSAGE_CHARS + 100  # a Trust-and-Split message plus its tags and some slack
MAX_ROUNDS = 30
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # control characters other than tab and newline


class GameError(Exception):
    """A refused request: an HTTP status, a message and extra fields for the page."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, **self.extra}}


def expected_format(game: str, info: dict[str, Any]) -> str:
    """The answer format of a pending decision, for a human."""
    kind = info["kind"]
    if game == "ipd":
        labels = info["state"]["labels"]
        return f"exactly {labels['C']} or {labels['D']}"
    if kind == "message":
        return f"<<message_start>> your message <<message_end>> (no < or > inside, up to {MESSAGE_CHARS} characters)"
    if game == "trust_and_split":
        return "<<proposal_start>> x <<proposal_end>>, x the coins you keep, an integer from 0 to 10"
    return "Proposal: x hats, y books, z balls, each an integer from 0 to 10"


def controls(game: str, info: dict[str, Any]) -> dict[str, Any]:
    """How the page asks for a pending decision: the form's fields and a `template` whose `{field}`s
    the page fills in to compose exactly the text a model must write (the typed answer stays too).
    ipd: one button per action; split_nocomm: a number per item; trust_and_split: a message box
    (a claim picker helps write it) or the coins kept."""
    kind, state = info["kind"], info.get("state", {})
    if game == "ipd":
        labels = state["labels"]
        return {"type": "choice", "choices": [{"answer": labels[a], "meaning": meaning}
                                              for a, meaning in (("C", "cooperate"), ("D", "defect"))]}
    if kind == "message":
        rps = state.get("values", "rps") == "rps"
        return {"type": "message", "max_chars": MESSAGE_CHARS, "template": format_message("{message}"),
                "claims": [f"My hand is {h}." for h in HANDS] if rps
                else [f"My per-coin value is {v}." for v in range(1, 21)]}
    if game == "trust_and_split":
        return {"type": "numbers", "template": format_proposal("{coins}"),  # type: ignore[arg-type]: a placeholder
                "fields": [{"name": "coins", "label": "coins you keep", "min": 0, "max": UNITS}]}
    values = state.get("my_values", [None] * len(SPLIT_ITEMS))
    return {"type": "numbers", "template": format_split([f"{{{item}}}" for item in SPLIT_ITEMS]),  # type: ignore[arg-type]
            "fields": [{"name": item, "label": f"{item} you claim" + ("" if v is None else f" (worth {v} each to you)"),
                        "min": 0, "max": UNITS} for item, v in zip(SPLIT_ITEMS, values, strict=True)]}


def _describe(game: str, action: str) -> str:
    if game == "ipd":
        return {"C": "cooperated", "D": "defected"}.get(action, action)
    if game == "split_nocomm":
        hats, books, balls = action.split(",")
        return f"proposed {hats} hats, {books} books, {balls} balls"
    return f"kept {action} coins"


def _points(x: float) -> float:
    return round(float(x), 2)


@dataclass(frozen=True)
class AgentSampling:
    """How the agent seat samples: as the rollout's `SamplingSpec` (0 free samples = always guided)."""

    temperature: float = 1.0
    top_p: float = 1.0
    free_samples: int = 0


class GameSession:
    def __init__(
        self, sid: str, env: TextGame, model: str, adapter: str | None, human: int, agent_seat: TokenSeat
    ) -> None:
        self.sid, self.env, self.model, self.adapter = sid, env, model, adapter
        self.human, self.agent = human, 1 - human
        self.seat = agent_seat
        self.lock = asyncio.Lock()
        self.touched = time.monotonic()
        self.log: list[dict[str, str]] = []
        self.score = [0.0, 0.0]
        self.points: list[list[float]] = []  # [you, agent] per finished round (the page's score chart)
        self.rules = ""
        self.observations: dict[str, str] = {}
        self.infos: dict[str, dict[str, Any]] = {}

    @property
    def done(self) -> bool:
        return not self.env.agents

    async def start(self, seed: int) -> None:
        self.observations, self.infos = self.env.reset(seed=seed)
        await self._advance()

    async def move(self, text: Any) -> None:
        """Play the human's move (GameError 400 when it is malformed or does not parse)."""
        if self.done:
            raise GameError(409, "the game is over; start a new one")
        text = _check_text(text)
        human = AGENTS[self.human]
        if not self.env.valid(human, text):
            fmt = expected_format(self.env.game, self.infos[human])
            raise GameError(400, f"your move does not parse; expected {fmt}", text=text, format=fmt)
        self.log.append({"who": "you", "text": text})
        actions = {human: text}
        if self.infos[AGENTS[self.agent]]["acts"]:
            actions[AGENTS[self.agent]] = await self._agent_decides()
        self._step(actions)
        await self._advance()

    async def _agent_decides(self) -> str:
        agent = AGENTS[self.agent]
        text = await self.seat.decide(self.observations[agent], self.infos[agent])
        self.log.append({"who": "agent", "text": text})
        return text

    async def _advance(self) -> None:
        """Play the steps where only the agent acts; then show the human its next turn."""
        human = AGENTS[self.human]
        while not self.done and not self.infos[human]["acts"]:
            self._step({AGENTS[self.agent]: await self._agent_decides()})
        if not self.done:
            turn = self.observations[human]
            if not self.rules:
                self.rules = turn
            else:
                self.log.append({"who": "game", "text": turn})

    def _step(self, actions: dict[str, str]) -> None:
        self.observations, rewards, _, _, self.infos = self.env.step(actions)
        for seat, agent in enumerate(AGENTS):
            self.score[seat] += float(rewards.get(agent, 0.0))
        summary = self.infos.get(AGENTS[self.human], {}).get("last_round")
        if summary is not None:
            you, them = summary["actions"][self.human], summary["actions"][self.agent]
            r_you, r_them = summary["rewards"][self.human], summary["rewards"][self.agent]
            invalid = " (the agent's answer was invalid)" if summary["invalid"][self.agent] else ""
            text = (
                f"Round {summary['round'] + 1}: you {_describe(self.env.game, you)}, the agent "
                f"{_describe(self.env.game, them)}{invalid}. Points: you {_points(r_you)}, the agent {_points(r_them)}."
            )
            self.log.append({"who": "round", "text": text})
            self.points.append([_points(r_you), _points(r_them)])

    def state(self) -> dict[str, Any]:
        human = AGENTS[self.human]
        info = self.infos.get(human, {})
        acting = not self.done and bool(info.get("acts"))
        return {
            "session": self.sid,
            "game": self.env.game,
            "model": self.model,
            "seat": human,
            "round": min(self.env.round + 1, self.env.n_rounds),
            "n_rounds": self.env.n_rounds,
            "done": self.done,
            "score": {"you": _points(self.score[self.human]), "agent": _points(self.score[self.agent])},
            "rules": self.rules,
            "prompt": self.observations.get(human, "") if acting else "",
            "kind": info.get("kind", "") if acting else "",
            "format": expected_format(self.env.game, info) if acting else "",
            "controls": controls(self.env.game, info) if acting else None,
            "points": [list(p) for p in self.points],
            "log": list(self.log),
        }


def _check_text(text: Any) -> str:
    if not isinstance(text, str):
        raise GameError(400, "the move must be a string")
    if len(text) > MAX_MOVE_CHARS:
        raise GameError(400, f"the move is over {MAX_MOVE_CHARS} characters")
    if _CONTROL.search(text):
        raise GameError(400, "the move holds control characters")
    if not text.strip():
        raise GameError(400, "the move is empty")
    return text


def _int(body: dict[str, Any], key: str, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise GameError(400, f"{key} must be an integer from {low} to {high}")
    return value


class GameSessions:
    """The games in progress. `models`: served name -> engine adapter key (None = base model)."""

    def __init__(
        self,
        engine: Engine,
        template: ChatTemplate,
        models: dict[str, str | None],
        max_sessions: int = 64,
        ttl_s: float = 3600.0,
        sampling: AgentSampling = AgentSampling(),
    ) -> None:
        self.engine, self.template, self.models = engine, template, dict(models)
        self.max_sessions, self.ttl_s, self.sampling = max_sessions, ttl_s, sampling
        self.sessions: OrderedDict[str, GameSession] = OrderedDict()

    def options(self) -> dict[str, Any]:
        return {"games": list(GAMES), "models": list(self.models), "seats": list(SEATS), "max_rounds": MAX_ROUNDS,
                "max_move_chars": MAX_MOVE_CHARS}

    async def new(self, body: Any) -> dict[str, Any]:
        """Start a game: {"game", "model", "seat" (the human's; default alice), "seed", "n_rounds"}."""
        if not isinstance(body, dict):
            raise GameError(400, "the request body must be a JSON object")
        game, model, seat = body.get("game"), body.get("model"), body.get("seat", "alice")
        if game not in GAMES:
            raise GameError(400, f"unknown game; valid: {', '.join(GAMES)}")
        if not isinstance(model, str) or model not in self.models:
            raise GameError(404, f"unknown model; served: {', '.join(self.models)}")
        if seat not in SEATS:
            raise GameError(400, f"unknown seat; valid: {', '.join(SEATS)}")
        seed = _int(body, "seed", 0, 2**31 - 1)
        n_rounds = _int(body, "n_rounds", 1, MAX_ROUNDS)
        env = envs.make(game, **({"n_rounds": n_rounds} if n_rounds else {}))
        human = SEATS.index(seat)
        seat_ = self._seat(env, human, model)
        session = GameSession(secrets.token_urlsafe(18), env, model, self.models[model], human, seat_)
        self._admit(session)
        async with session.lock:
            await session.start(secrets.randbits(31) if seed is None else seed)
            return session.state()

    def _seat(self, env: TextGame, human: int, model: str) -> TokenSeat:
        spec = SeatSpec(
            engine=self.engine,
            policy=model,
            adapter=self.models[model],
            temperature=self.sampling.temperature,
            top_p=self.sampling.top_p,
            free_samples=self.sampling.free_samples,
        )
        seat = 1 - human
        traj = SeatTrajectory(
            run="serve", iteration=0, game_id=0, group_id=0, env=env.game, seed=0, seat=seat,
            policy_name=model, policy_version=-1, opponent_name="human", opponent_version=-1, trainable=False,
            temperature=spec.temperature,
        )  # fmt: skip
        return TokenSeat(spec, env, seat, traj, self.template.new_chat())

    def _admit(self, session: GameSession) -> None:
        now = time.monotonic()
        for sid in [s for s, x in self.sessions.items() if now - x.touched > self.ttl_s]:
            del self.sessions[sid]
        while len(self.sessions) >= self.max_sessions:
            self.sessions.popitem(last=False)  # the least recently used
        self.sessions[session.sid] = session

    def _get(self, sid: str) -> GameSession:
        session = self.sessions.get(sid) if SESSION_ID.fullmatch(sid or "") else None
        if session is None or time.monotonic() - session.touched > self.ttl_s:
            raise GameError(404, "unknown or expired game session")
        session.touched = time.monotonic()
        self.sessions.move_to_end(sid)
        return session

    def state(self, sid: str) -> dict[str, Any]:
        return self._get(sid).state()

    async def move(self, sid: str, body: Any) -> dict[str, Any]:
        """Play the human's move: {"text": ...}."""
        session = self._get(sid)
        if not isinstance(body, dict):
            raise GameError(400, "the request body must be a JSON object")
        async with session.lock:
            await session.move(body.get("text"))
            return session.state()
