"""The match runner: one game between two seats over the envs API, into two seat trajectories.

A seat is a policy bound to an engine (`SeatSpec`). Two kinds of engine take seats:

- token engines (`actors.engine.Engine`: the vLLM engine) see the seat's chat as token ids
  (`actors.chat.Chat`) and return generated ids with their sampling log-probs, bound per request
  to an explicit adapter key (None = the base model);
- text engines (`TextEngine`: scripted strategies, OpenAI-compatible APIs) see chat messages and
  the decision's structured info and return text. They produce no tokens to train on: their
  trajectory has empty token lists but rewards, actions and counts.

Per decision of a token seat (spec 2.1-2.2): up to `free_samples` unguided samples, each checked
(`free_sample_match`: "lenient" asks the game's parser, `env.valid`, which finds an action inside
chatter; "full", the authors' choice, accepts only a whole answer, surrounding whitespace aside,
that matches the decision's regex); if none is valid, one guided sample on the decision's regex. Only the accepted
sample enters the chat and the trajectory. Counts: `n_decisions`; `n_resampled` = decisions whose
free sample(s) were all rejected; `n_invalid` = decisions whose accepted text is still invalid (it is
passed to the env anyway, which plays it as its invalid default). `guided` holds one bool per
decision of a token seat, in decision order (empty for text seats): was the accepted sample guided;
`decision_regex` is aligned with it: the regex the accepted sample was constrained by ("" if free),
so that the learner can account for the constrained sampling distribution.

Sampling seeds: every request of a token seat carries its own seed, `request_seed(seat seed, n)` for
its n-th request (free and guided samples alike); `play_match` gives each seat the seed
`player_seed(env seed, game id, seat)` unless its SeatSpec names one. vLLM then samples each request
from its own generator, so what a game draws does not depend on which other requests share the
engine's batches or on what the engine sampled before: a replayed share, a resumed run and a
repeated run draw the same tokens from the same log-probs (sysdesign/reliability.md).

Rewards: a step's reward is added to the round of the decisions made in that step (a TAS round's
message steps give 0; its proposal step carries the round reward). Canonical actions come from
the round summaries (`infos[agent]["last_round"]`). Both seats of a step decide concurrently.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import numpy as np

from actors.chat import Chat, ChatTemplate
from actors.engine import Engine, Sampling
from actors.trajectories import SeatTrajectory
from envs import AGENTS, TextGame


@dataclass
class TextDecision:
    """What a text seat answered: the accepted text and how many of its answers were rejected."""

    text: str
    n_rejected: int = 0  # answers re-prompted for a format error before this one
    meta: dict[str, Any] = field(default_factory=dict)


class TextPlayer(Protocol):
    async def decide(
        self,
        messages: list[dict[str, str]],
        info: dict[str, Any],
        valid: Callable[[str], bool],
        sampling: Sampling,
    ) -> TextDecision:
        """Answer the pending decision. `messages` is the seat's chat so far (last: the user turn
        of this decision); `info` the env's infos[agent]; `valid` checks a text for the decision;
        `sampling.regex` is the decision's format."""
        ...


@runtime_checkable
class TextEngine(Protocol):
    def player(self, game: str, seat: int, seed: int) -> TextPlayer:
        """A fresh player for one seat of one match (its own state and random stream)."""
        ...


FREE_SAMPLE_MATCH = ("lenient", "full")


def free_sample_ok(env: TextGame, agent: str, text: str, regex: str, match: str) -> bool:
    """Is an unguided sample accepted? "lenient": the game's parser reads a valid action from it;
    "full": it is valid and, stripped, the whole of it matches the decision's regex."""
    if not env.valid(agent, text):
        return False
    return match == "lenient" or re.fullmatch(regex, text.strip(), flags=re.DOTALL) is not None


@dataclass(frozen=True)
class SeatSpec:
    """A seat of one match: who plays (policy name and version), on which engine, how.

    `adapter` is the engine's adapter key (AdapterVersion.key) or None for the base model; it is
    bound to every request of the seat. `max_tokens` None takes the env's per-decision hint.
    `free_samples`: unguided samples before the guided one (0 = always guided). `seed`: the base of
    the seat's per-request sampling seeds (None: `play_match` derives it; a TokenSeat used alone
    with None samples from the engine's shared generator).
    """

    engine: Engine | TextEngine
    policy: str
    version: int = -1
    adapter: str | None = None
    trainable: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None
    free_samples: int = 0
    free_sample_match: str = "lenient"
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.free_sample_match not in FREE_SAMPLE_MATCH:
            raise ValueError(f"free_sample_match must be one of {FREE_SAMPLE_MATCH}, got {self.free_sample_match!r}")

    @property
    def is_text(self) -> bool:
        return isinstance(self.engine, TextEngine)


def player_seed(seed: int, game_id: int, seat: int) -> int:
    """A seat's own random stream (scripted random play): distinct per game even within a group
    that shares the env seed."""
    return int(np.random.SeedSequence([int(seed), int(game_id), int(seat)]).generate_state(1)[0])


def request_seed(seat_seed: int, n: int) -> int:
    """The sampling seed of a seat's n-th engine request (0-based; 31 bits, any engine takes it)."""
    return int(np.random.SeedSequence([int(seat_seed), int(n)]).generate_state(1)[0] >> 1)


class _Seat:
    def __init__(self, spec: SeatSpec, env: TextGame, seat: int, traj: SeatTrajectory) -> None:
        self.spec, self.env, self.seat, self.agent, self.traj = spec, env, seat, AGENTS[seat], traj

    def sampling(self, info: dict[str, Any]) -> Sampling:
        return Sampling(
            max_tokens=int(self.spec.max_tokens or info["max_tokens"]),
            temperature=self.spec.temperature,
            top_p=self.spec.top_p,
        )

    def count(self, text: str, rejected: int) -> None:
        self.traj.n_decisions += 1
        self.traj.n_resampled += int(rejected > 0)
        self.traj.n_invalid += int(not self.env.valid(self.agent, text))


class TokenSeat(_Seat):
    """One token seat's decisions (spec 2.1-2.2): the chat as token ids, free samples, then the guided
    one. `play_match` drives two seats with it; the Serve app's agent seat against a human uses it
    alone (`reciprocity/serve_games.py`), so a served agent is prompted exactly as in rollouts."""

    def __init__(self, spec: SeatSpec, env: TextGame, seat: int, traj: SeatTrajectory, chat: Chat) -> None:
        super().__init__(spec, env, seat, traj)
        self.chat = chat
        self.engine: Engine = spec.engine  # type: ignore[assignment]
        self.requests = 0  # engine requests so far (the index of the next request's seed)

    def _seeded(self, sampling: Sampling) -> Sampling:
        if self.spec.seed is None:
            return sampling
        n, self.requests = self.requests, self.requests + 1
        return replace(sampling, seed=request_seed(self.spec.seed, n))

    async def decide(self, observation: str, info: dict[str, Any]) -> str:
        self.traj.add_prompt(self.chat.add_user(observation))
        free = self.sampling(info)
        gen, rejected = None, 0
        for _ in range(self.spec.free_samples):
            sample = await self.engine.generate(list(self.chat.ids), self._seeded(free), self.spec.adapter)
            if free_sample_ok(self.env, self.agent, sample.text, info["regex"], self.spec.free_sample_match):
                gen = sample
                break
            rejected += 1
        guided = gen is None
        if gen is None:
            guided_sampling = self._seeded(replace(free, regex=info["regex"]))
            gen = await self.engine.generate(list(self.chat.ids), guided_sampling, self.spec.adapter)
        self.count(gen.text, rejected)
        self.traj.guided.append(guided)
        self.traj.decision_regex.append(info["regex"] if guided else "")
        self.traj.add_generated(gen.token_ids, gen.logprobs, int(info["round"]), self.spec.version)
        self.traj.add_prompt(self.chat.add_assistant(gen.token_ids))
        return gen.text


class _TextSeat(_Seat):
    def __init__(self, spec: SeatSpec, env: TextGame, seat: int, traj: SeatTrajectory, seed: int) -> None:
        super().__init__(spec, env, seat, traj)
        self.player = spec.engine.player(env.game, seat, seed)  # type: ignore[union-attr]
        self.messages: list[dict[str, str]] = []

    async def decide(self, observation: str, info: dict[str, Any]) -> str:
        self.messages.append({"role": "user", "content": observation})
        sampling = replace(self.sampling(info), regex=info["regex"])
        decision = await self.player.decide(
            list(self.messages), info, lambda text: self.env.valid(self.agent, text), sampling
        )
        self.messages.append({"role": "assistant", "content": decision.text})
        self.count(decision.text, decision.n_rejected)
        return decision.text


async def play_match(
    env: TextGame,
    seats: tuple[SeatSpec, SeatSpec],
    seed: int,
    *,
    template: ChatTemplate | None = None,
    run: str = "",
    iteration: int = 0,
    game_id: int = 0,
    group_id: int = 0,
) -> tuple[SeatTrajectory, SeatTrajectory]:
    """Play one game of `env` (seats[0] = alice) with env seed `seed`; return both trajectories.

    `template` renders token seats' chats (required when a seat is a token seat).
    """
    trajs = tuple(
        SeatTrajectory(
            run=run,
            iteration=iteration,
            game_id=game_id,
            group_id=group_id,
            env=env.game,
            seed=seed,
            seat=s,
            policy_name=seats[s].policy,
            policy_version=seats[s].version,
            opponent_name=seats[1 - s].policy,
            opponent_version=seats[1 - s].version,
            trainable=seats[s].trainable,
            temperature=seats[s].temperature,
        )
        for s in (0, 1)
    )
    players: list[TokenSeat | _TextSeat] = []
    for s, spec in enumerate(seats):
        if spec.is_text:
            players.append(_TextSeat(spec, env, s, trajs[s], player_seed(seed, game_id, s)))
        else:
            if template is None:
                raise ValueError(f"seat {s} ({spec.policy}) is a token seat: play_match needs a chat template")
            if spec.seed is None:
                spec = replace(spec, seed=player_seed(seed, game_id, s))
            players.append(TokenSeat(spec, env, s, trajs[s], template.new_chat()))

    observations, infos = env.reset(seed=seed)
    rewards: list[list[float]] = [[], []]
    actions: list[list[str]] = [[], []]
    while env.agents:
        acting = [s for s, agent in enumerate(AGENTS) if infos[agent]["acts"]]
        rounds = [int(infos[agent]["round"]) for agent in AGENTS]
        texts = await asyncio.gather(*(players[s].decide(observations[AGENTS[s]], infos[AGENTS[s]]) for s in acting))
        step_actions = {AGENTS[s]: text for s, text in zip(acting, texts, strict=True)}
        observations, step_rewards, _, _, infos = env.step(step_actions)
        for s, agent in enumerate(AGENTS):
            r = rounds[s]
            while len(rewards[s]) <= r:
                rewards[s].append(0.0)
            rewards[s][r] += float(step_rewards.get(agent, 0.0))
            summary = infos.get(agent, {}).get("last_round")
            if summary is not None and summary["round"] == len(actions[s]):
                actions[s].append(str(summary["actions"][s]))
    info_json = json.dumps(env.game_info())
    for s, traj in enumerate(trajs):
        traj.rewards = rewards[s][: len(actions[s])]
        traj.actions = actions[s]
        traj.info_json = info_json
    return trajs[0], trajs[1]
