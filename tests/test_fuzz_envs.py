"""Bad model output through the games: `env.step` with arbitrary actions, 10,000 fuzzed games of each game.

tests/test_envs_parsing.py fuzzes the parsers themselves (10,000 texts through each). Here whole
games are played with drawn actions: junk text, full unicode, control characters, tags nested in
tags, long strings (repeats, some of 1 MB), valid answers framed by junk, and non-strings (None, numbers,
bytes, NaN, dicts, lists); action dicts may miss an acting agent or name an unknown one. Checked
on every step: nothing raises; observations are strings; rewards are finite and within the game's
bounds; the env's invalid count grows by exactly the decisions that `env.valid` rejected, and the
round summaries record the same invalid counts; `game_info()` is strict JSON. The test also asserts
that valid, invalid, missing, huge, nested and non-string actions were all drawn (not vacuous).

Speed: Hypothesis' own cost per drawn example (~1-2 ms here) dwarfs a game's (~0.1 ms), so one
example is one compact draw (a token-expanded text, a full-unicode text, a list of choices) from
which the actions of a game of every kind are built.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import envs
from actors.engine import Generation, Sampling
from envs.base import AGENTS
from envs.parsing import (
    IPD_LABELS,
    MESSAGE_END,
    MESSAGE_START,
    PROPOSAL_END,
    PROPOSAL_START,
    format_message,
    format_proposal,
    format_split,
)

N = 10_000
FUZZ = settings(max_examples=N, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)

# Control characters \x01..\x1a stand for format tokens and valid answers, so drawn texts nest tags
# in tags and frame valid answers with junk often; "|" splits a text into several actions.
TOKENS = [
    MESSAGE_START, MESSAGE_END, PROPOSAL_START, PROPOSAL_END, "<A>", "<B>", "<Cooperate>", "<Defect>",
    "Proposal:", "proposal :", "hats", "books", "balls", "<<", ">>", " 10 ", " 7 ", "rock", "\u0130",
    format_split((3, 10, 0)), format_proposal(4), format_message("I have rock"), " <A>\n", "\t<B> ",
    "Proposal: 11 hats", "<<message_start>><<proposal_start>> 5 <<proposal_end>><<message_end>>",
]  # fmt: skip
EXPAND = {chr(1 + i): token for i, token in enumerate(TOKENS)}
ODD = "\x00\x1b\x1f\x7f\x85\t\n\r é🙂\u202e\u200b\u2028\ufeff\ufffd\u3000\u017f\u212a\u0301\U0010ffff＜＞："
soup = st.text(st.characters(max_codepoint=0x7F, include_characters=ODD + "".join(EXPAND))).map(
    lambda t: "".join(EXPAND.get(c, c) for c in t)
)
NON_STRING: list[Any] = [None, 0, 7, -1, 2**70, 3.5, float("nan"), float("inf"), b"\xff<A>", b"<B>", True,
                         {"text": "<A>"}, ["<A>"], ("<B>",), object()]
WRAP = [(MESSAGE_START, MESSAGE_END), (PROPOSAL_START, PROPOSAL_END), (MESSAGE_START, PROPOSAL_END), ("<", ">"),
        (MESSAGE_START, "")]
BOUNDS = {"ipd": (0.0, 5.0), "split_nocomm": (0.0, 300.0), "trust_and_split": (0.0, 200.0)}
VALID_ANSWERS = {
    "ipd": [*IPD_LABELS["neutral"], *IPD_LABELS["overt"]],
    "split_nocomm": [format_split((0, 5, 10))],
    "trust_and_split": [format_proposal(10), format_message("deal?")],
}


def action(pool: list[str], choice: int, seen: Counter) -> Any:
    """One action from a choice number: a piece of the drawn texts, as is, nested in tags, repeated
    up to 1 MB, framed around a valid answer of some game, or a non-string."""
    text = pool[choice % len(pool)]
    kind = (choice // len(pool)) % 8
    if kind == 1:
        seen["nested"] += 1
        for depth in range(1 + choice % 4):
            start, end = WRAP[(choice + depth) % len(WRAP)]
            text = start + text + pool[(choice + depth) % len(pool)] + end
    elif kind == 2 and text:
        seen["long"] += 1
        times = 1 + zlib.crc32(text.encode("utf-8", "surrogatepass")) % 500
        if choice % 19 == 0:  # now and then the model never stops: 1 MB
            seen["huge"] += 1
            times = 1_000_000 // len(text) + 1
        text = (text * times)[:1_000_000]
    elif kind == 3:
        game = list(VALID_ANSWERS)[choice % 3]
        answers = VALID_ANSWERS[game]
        text = text + answers[choice % len(answers)] + (pool[-1] if choice % 2 else "")
    elif kind == 4:
        seen["non_string"] += 1
        return NON_STRING[choice % len(NON_STRING)]
    return text


def play(game: str, pool: list[str], choices: list[int], seed: int, seen: Counter) -> None:
    options: dict[str, Any] = {"n_rounds": 1 + seed % 3}
    if game == "ipd":
        options["wording"] = ("neutral", "overt")[seed % 2]
    if game == "trust_and_split":
        options["values"] = ("rps", "uniform")[seed % 2]
    env = envs.make(game, **options)
    observations, infos = env.reset(seed=seed)
    low, high = BOUNDS[game]
    invalid, decisions, k = [0, 0], [0, 0], 0
    summaries: list[dict[str, Any]] = []
    while env.agents:
        step: dict[str, Any] = {}
        expect = [0, 0]
        for seat, agent in enumerate(AGENTS):
            if not infos[agent]["acts"]:
                continue
            choice = choices[k % len(choices)] + k // len(choices)
            k += 1
            if choice % 13 == 12:  # the agent's action is missing: played as ""
                seen["missing"] += 1
                act: Any = None
            else:
                act = action(pool, choice, seen)
                step[agent] = act
            text = act if isinstance(act, str) else ("" if act is None else str(act))
            ok = env.valid(agent, text)
            expect[seat] = int(not ok)
            decisions[seat] += 1
            seen["valid" if ok else "invalid"] += 1
        if choices[0] % 5 == 4:
            step["mallory"] = "<A>"  # not an agent of the game: ignored
        observations, rewards, terminations, truncations, infos = env.step(step)
        for seat, agent in enumerate(AGENTS):
            invalid[seat] += expect[seat]
            assert isinstance(observations[agent], str)
            r = rewards[agent]
            assert isinstance(r, float) and math.isfinite(r) and low <= r <= high, (game, r)
            assert terminations[agent] in (True, False) and truncations[agent] is False
        summary = infos["alice"].get("last_round")
        if summary is not None and summary["round"] == len(summaries):
            assert summary == infos["bob"]["last_round"]
            summaries.append(summary)
        info = env.game_info()
        assert info["n_invalid"] == invalid and info["n_decisions"] == decisions
    info = env.game_info()
    json.dumps(info, allow_nan=False)
    assert info["rounds_played"] == env.n_rounds == len(summaries)
    assert [sum(s["invalid"][seat] for s in summaries) for seat in (0, 1)] == invalid  # recorded per round
    assert env.step({"alice": "<A>"}) == ({}, {}, {}, {}, {})  # stepping a finished game is harmless
    seen[f"games_{game}"] += 1


def test_step_with_arbitrary_actions() -> None:
    """10,000 drawn examples, each played as one game of every kind (10,000 games per game)."""
    seen: Counter = Counter()

    @FUZZ
    @given(soup, st.text(max_size=30), st.lists(st.integers(0, 10_000), min_size=1, max_size=12),
           st.integers(0, 2**32 - 1))
    @example("", "", [0], 0)
    @example("\x01" * 1000, "\U0010ffff" * 30, [1, 2, 3, 4], 7)
    def run(text: str, wide: str, choices: list[int], seed: int) -> None:
        pool = [*text.split("|"), wide]
        for game in envs.GAMES:
            play(game, pool, choices, seed, seen)

    t0 = time.perf_counter()
    run()
    print(f"env.step fuzz: {dict(seen)} in {time.perf_counter() - t0:.1f}s")
    assert all(seen[f"games_{g}"] >= N for g in envs.GAMES)
    for what in ("valid", "invalid", "missing", "nested", "long", "huge", "non_string"):
        assert seen[what] > 100, (what, seen)


# ----------------------------------------------------------------------------- the match runner
class ArbitraryEngine:
    """A token engine whose every generation is drawn: random ids over the whole vocabulary (special
    tokens such as <|im_start|> and <|im_end|> included, with or without a final stop token), or a
    guided answer cut short (as a max_tokens limit cuts a guided sample), or a valid answer."""

    def __init__(self, template: Any, data: st.DataObject, seen: Counter) -> None:
        self.template, self.data, self.seen = template, data, seen
        tok = template.tokenizer
        self.vocab = len(tok)
        self.special = sorted({tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")})
        self.calls = 0

    async def generate(self, prompt_token_ids: list[int], sampling: Sampling, adapter: str | None) -> Generation:
        self.calls += 1
        kind = self.data.draw(st.sampled_from(["ids", "cut", "valid"]))
        if kind == "ids":
            token = st.one_of(st.integers(0, self.vocab - 1), st.sampled_from(self.special))
            ids = self.data.draw(st.lists(token, max_size=24))
        else:
            answer = {"(<A>|<B>)": "<A>", "": "Proposal: 1 hats, 2 books, 3 balls"}.get(sampling.regex or "", "")
            if not answer:
                answer = format_message("ok") if "message" in (sampling.regex or "") else format_proposal(3)
            ids = self.template.encode(answer)
            if kind == "cut":
                ids = ids[: self.data.draw(st.integers(0, max(0, len(ids) - 1)))]
        if self.data.draw(st.booleans()):
            ids = [*ids, self.template.tokenizer.eos_token_id]
        self.seen[kind] += 1
        text = self.template.decode(ids)
        return Generation(ids, [-0.5] * len(ids), text, adapter, "stop")


@pytest.fixture(scope="module")
def template(model_dir: Path) -> Any:
    from actors.chat import ChatTemplate

    return ChatTemplate.from_pretrained(str(model_dir))


def test_match_runner_with_arbitrary_generations(template: Any) -> None:
    """200 drawn examples, each a match of every game between two token seats whose engine returns
    arbitrary token ids: every match completes; the trajectory's invalid count equals the env's;
    token arrays stay aligned and the batch validates."""
    from actors.match import SeatSpec, play_match
    from actors.trajectories import to_batch

    seen: Counter = Counter()

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.data(), st.integers(0, 2), st.integers(0, 2**31 - 1))
    def run(data: st.DataObject, free: int, seed: int) -> None:
        engine = ArbitraryEngine(template, data, seen)
        for game in envs.GAMES:
            seats = (SeatSpec(engine, "a", free_samples=free), SeatSpec(engine, "b", free_samples=free))
            a, b = asyncio.run(play_match(envs.make(game, n_rounds=1 + seed % 2), seats, seed, template=template))
            info = json.loads(a.info_json)
            assert [a.n_invalid, b.n_invalid] == info["n_invalid"] and [a.n_decisions, b.n_decisions] == info[
                "n_decisions"]
            for t in (a, b):
                assert len(t.token_ids) == len(t.logprobs) == len(t.token_round) == len(t.token_version)
                assert len(t.guided) == len(t.decision_regex) == t.n_decisions and t.n_resampled <= t.n_decisions
                assert len(t.rewards) == len(t.actions) == info["rounds_played"]
            to_batch([a, b])
            seen["matches"] += 1
            seen["invalid"] += a.n_invalid + b.n_invalid

    t0 = time.perf_counter()
    run()
    print(f"match fuzz: {dict(seen)} in {time.perf_counter() - t0:.1f}s")
    assert seen["matches"] >= 600 and seen["invalid"] > 0 and min(seen["ids"], seen["cut"], seen["valid"]) > 100
