"""The Serve app's pure parts on a token test double (no Ray, no vLLM): chat request checks, game
sessions in all three games and both seats, the session bound and expiry, adapter names."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from support import FakeEngine

from actors.chat import ChatTemplate
from reciprocity.serve import ServeConfig, ServeError, engine_kwargs, parse_adapters
from reciprocity.serve_chat import APIRequestError, ChatService
from reciprocity.serve_games import GameError, GameSessions

MODELS = {"base": None, "alpha": "alpha@v0"}
MOVES = {
    ("ipd", "action"): "<A>",
    ("split_nocomm", "proposal"): "Proposal: 5 hats, 5 books, 5 balls",
    ("trust_and_split", "message"): "<<message_start>> I hold rock. <<message_end>>",
    ("trust_and_split", "proposal"): "<<proposal_start>> 5 <<proposal_end>>",
}


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> FakeEngine:
    engine = FakeEngine(ChatTemplate.from_pretrained(str(model_dir)))
    engine.loaded.add("alpha@v0")
    return engine


def sessions(engine: FakeEngine, **kw: Any) -> GameSessions:
    return GameSessions(engine, engine.template, MODELS, **kw)


def test_chat_checks_and_answer(engine: FakeEngine) -> None:
    chat = ChatService(engine, engine.template, MODELS, max_model_len=64)
    user = [{"role": "user", "content": [{"type": "text", "text": "Pick one."}]}]
    out = asyncio.run(chat.complete({"model": "alpha", "messages": user, "max_tokens": 8,
                                     "structured_outputs": {"regex": "(<A>|<B>)"}}))  # fmt: skip
    assert out["model"] == "alpha" and out["adapter"] == "alpha@v0" and out["choices"][0]["message"]["content"] in (
        "<A>", "<B>")  # fmt: skip
    assert engine.calls[-1][1].regex == "(<A>|<B>)" and engine.calls[-1][2] == "alpha@v0"
    cases = [
        ({"model": "alpha@v0", "messages": user}, 404, "model"),
        ({"model": "base", "messages": user, "n": 2}, 400, "n"),
        ({"model": "base", "messages": user, "stop": ["x"] * 5}, 400, "stop"),
        ({"model": "base", "messages": user, "structured_outputs": {"regex": ""}}, 400, "regex"),
        ({"model": "base", "messages": [{"role": "user", "content": "word " * 100}]}, 400, "messages"),
    ]
    for body, status, param in cases:
        with pytest.raises(APIRequestError) as e:
            asyncio.run(chat.complete(body))
        assert (e.value.status, e.value.param) == (status, param), body
    assert e.value.code == "context_length_exceeded"


def play(games: GameSessions, game: str, seat: str, n_rounds: int = 2) -> dict[str, Any]:
    state = asyncio.run(games.new({"game": game, "model": "alpha", "seat": seat, "n_rounds": n_rounds, "seed": 1}))
    assert state["rules"] and state["format"] and state["prompt"]
    while not state["done"]:
        state = asyncio.run(games.move(state["session"], {"text": MOVES[game, state["kind"]]}))
    return state


@pytest.mark.parametrize("game", ["ipd", "split_nocomm", "trust_and_split"])
@pytest.mark.parametrize("seat", ["alice", "bob"])
def test_a_game_in_each_seat(engine: FakeEngine, game: str, seat: str) -> None:
    state = play(sessions(engine), game, seat)
    rounds = [e for e in state["log"] if e["who"] == "round"]
    assert [r["text"][:8] for r in rounds] == ["Round 1:", "Round 2:"] and state["round"] == state["n_rounds"] == 2
    assert sum(e["who"] == "you" for e in state["log"]) == (4 if game == "trust_and_split" else 2)
    assert sum(e["who"] == "agent" for e in state["log"]) == (4 if game == "trust_and_split" else 2)
    assert state["prompt"] == state["format"] == "" and state["seat"] == seat


def test_moves_are_checked_before_they_are_played(engine: FakeEngine) -> None:
    games = sessions(engine)
    sid = asyncio.run(games.new({"game": "ipd", "model": "base", "n_rounds": 1}))["session"]
    for text, status in (("cooperate", 400), ("", 400), ("\x1b[31m<A>", 400), (None, 400), ("<A>" * 300, 400)):
        with pytest.raises(GameError) as e:
            asyncio.run(games.move(sid, {"text": text}))
        assert e.value.status == status
    assert e.value.message.startswith("the move is over")
    assert games.state(sid)["log"] == []  # nothing was played
    with pytest.raises(GameError) as e:
        asyncio.run(games.move(sid, {"text": "cooperate"}))
    assert e.value.extra == {"text": "cooperate", "format": "exactly <A> or <B>"}
    for body, status in (({"game": "ipd", "model": "alpha", "seat": "carol"}, 400),
                         ({"game": "ipd", "model": "alpha", "seed": -1}, 400),
                         ({"game": "ipd", "model": "alpha", "n_rounds": True}, 400),
                         ({"game": "ipd", "model": None}, 404), ([], 400)):  # fmt: skip
        with pytest.raises(GameError) as e:
            asyncio.run(games.new(body))
        assert e.value.status == status, body


def test_sessions_are_bounded_and_expire(engine: FakeEngine) -> None:
    games = sessions(engine, max_sessions=2, ttl_s=3600)
    first, second, third = (asyncio.run(games.new({"game": "ipd", "model": "base"}))["session"] for _ in range(3))
    assert list(games.sessions) == [second, third]
    with pytest.raises(GameError, match="unknown or expired"):
        games.state(first)
    games.state(second)  # touched: now the most recently used
    fourth = asyncio.run(games.new({"game": "ipd", "model": "base"}))["session"]
    assert list(games.sessions) == [second, fourth]
    games.ttl_s = 0.0
    with pytest.raises(GameError, match="unknown or expired"):
        games.state(second)
    with pytest.raises(GameError):
        games.state("../../etc/passwd")


def test_adapter_names_and_ranks(tmp_path: Path) -> None:
    assert parse_adapters(["a.b-1=x"]) == {"a.b-1": str(Path("x").resolve())}
    for bad in (["base=x"], ["a=x", "a=y"], ["<script>=x"], ["noequals"], ["a="], ["-a=x"]):
        with pytest.raises(ServeError):
            parse_adapters(bad)

    class V:
        def __init__(self, r: int) -> None:
            self.config = {"r": r}

    config = ServeConfig("m")
    assert engine_kwargs(config, {})["max_lora_rank"] == 8
    assert engine_kwargs(config, {"a": V(4), "b": V(12)}) == {"max_loras": 2, "max_lora_rank": 16,  # type: ignore[dict-item]
                                                              "threads": 1}
    # a replica's engine computes on the CPUs Ray gives it (Ray's OMP_NUM_THREADS=1 otherwise)
    assert engine_kwargs(ServeConfig("m", num_cpus=3.0), {})["threads"] == 3
    assert engine_kwargs(ServeConfig("m", num_cpus=0.5), {})["threads"] == 1
    assert engine_kwargs(ServeConfig("m", engine={"threads": 2}), {})["threads"] == 2  # explicit wins
    with pytest.raises(ServeError):
        engine_kwargs(config, {"a": V(1024)})  # type: ignore[dict-item]
