"""`reciprocity serve` on Ray Serve with the tiny model and one LoRA adapter (one engine start for
the module): the OpenAI client against /v1 (base, adapter, unknown model -> 404, bad requests ->
400), the API seat of the rollout worker playing a full IPD match against the endpoint, the page
and the game sessions' JSON API on the real engine."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import free_port
from vllm_support import make_adapter

pytestmark = pytest.mark.slow
IPD = "(<A>|<B>)"


@pytest.fixture(scope="module")
def url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import ray
    from ray import serve

    from reciprocity.serve import ServeConfig, check_adapters, start

    alpha = make_adapter(tiny_model_dir, tmp_path_factory.mktemp("serve") / "alpha", seed=1)
    port = free_port()
    config = ServeConfig(str(tiny_model_dir), {"alpha": str(alpha)}, port=port)
    check_adapters(config)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        start(config)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def client(url: str) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_openai_client_base_and_adapter(url: str) -> None:
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["base", "alpha"]
    messages = [{"role": "user", "content": "Answer with <A> or <B>."}]
    for model, key in (("base", None), ("alpha", "alpha@v0")):
        r = c.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0.0)
        assert r.model == model and r.model_extra["adapter"] == key
        assert r.choices[0].message.role == "assistant" and 1 <= r.usage.completion_tokens <= 6
        guided = c.chat.completions.create(
            model=model, messages=messages, max_tokens=8, extra_body={"structured_outputs": {"regex": IPD}}
        )
        assert guided.choices[0].message.content in ("<A>", "<B>") and guided.model == model


def test_unknown_model_is_404_never_the_base_model(url: str) -> None:
    import openai

    with pytest.raises(openai.NotFoundError) as e:
        client(url).chat.completions.create(model="alpha@v0", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404
    error = e.value.body if "code" in e.value.body else e.value.body["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": "base", "messages": []}, "messages"),
        ({"model": "base", "messages": [{"role": "user", "content": "x"}] * 65}, "messages"),
        ({"model": "base", "messages": [{"role": "user", "content": "x" * 16_001}]}, "messages.0"),
        ({"model": "base", "messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
        ({"model": "base", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}, "max_tokens"),
        ({"model": "base", "messages": [{"role": "user", "content": "x"}], "stream": True}, "stream"),
        ({"model": "base", "messages": [{"role": "user", "content": "x"}], "temperature": 9}, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ],
)
def test_bad_requests_are_400(url: str, body: dict, param: str) -> None:
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_malformed_json_and_a_bad_regex_are_400(url: str) -> None:
    r = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", timeout=60)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    body = {"model": "alpha", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4,
            "structured_outputs": {"regex": "(<A>|<B"}}  # fmt: skip
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    body["structured_outputs"] = {"regex": IPD}  # the engine survived the bad one
    assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]["content"]


def no_engine(config: dict) -> object:
    """The rollout worker's engine for a match with no LLM seat (nothing to start)."""
    return object()


def test_api_seat_plays_a_full_ipd_match_against_the_endpoint(url: str, tiny_model_dir: Path) -> None:
    from actors.worker import MatchSpec, PlayerSpec, RolloutWorker

    api = {"base_url": f"{url}/v1", "model": "alpha", "timeout_s": 120,
           "extra_body": {"structured_outputs": {"regex": IPD}}}  # fmt: skip
    worker = RolloutWorker({"model": str(tiny_model_dir), "engine_factory": "test_serve:no_engine",
                            "api": {"served": api}})  # fmt: skip
    seats = (PlayerSpec("api", "served"), PlayerSpec("scripted", "tit_for_tat"))
    (batch,) = asyncio.run(worker.run([MatchSpec("ipd", 0, 0, seed=0, seats=seats)], refs=False))
    served, tft = batch.to_pylist()
    assert served["policy_name"] == "served" and served["n_decisions"] == 10 and served["n_invalid"] == 0
    assert len(served["actions"]) == 10 and set(served["actions"]) <= {"C", "D"}
    assert tft["actions"][1:] == served["actions"][:-1]  # tit-for-tat answered every served move
    assert len(served["rewards"]) == 10 and served["token_ids"] == []


def test_page_and_static_files(url: str) -> None:
    page = httpx.get(f"{url}/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"] and 'src="static/play.js"' in page.text
    js = httpx.get(f"{url}/static/play.js", timeout=30)
    assert js.status_code == 200 and "textContent" in js.text and "innerHTML" not in js.text
    assert httpx.get(f"{url}/static/../serve.py", timeout=30).status_code == 404


def test_game_api_refuses_bad_input(url: str) -> None:
    post = lambda path, body: httpx.post(f"{url}/play/{path}", json=body, timeout=120)  # noqa: E731
    assert post("new", {"game": "chess", "model": "alpha"}).status_code == 400
    assert post("new", {"game": "ipd", "model": "gpt-9"}).status_code == 404
    assert post("new", {"game": "ipd", "model": "alpha", "n_rounds": 99}).status_code == 400
    assert httpx.get(f"{url}/play/{'x' * 20}", timeout=30).status_code == 404
    state = post("new", {"game": "ipd", "model": "alpha", "n_rounds": 1}).json()
    sid = state["session"]
    bad = post(f"{sid}/move", {"text": "I cooperate"})
    assert bad.status_code == 400 and bad.json()["error"]["format"] == "exactly <A> or <B>"
    assert bad.json()["error"]["text"] == "I cooperate"
    assert post(f"{sid}/move", {"text": "x" * 601}).status_code == 400
    assert post(f"{sid}/move", {"text": "<A>\x00"}).status_code == 400
    assert post(f"{sid}/move", {"text": 3}).status_code == 400
    done = post(f"{sid}/move", {"text": "<A>"}).json()
    assert done["done"] and [e["who"] for e in done["log"]] == ["you", "agent", "round"]
    assert done["log"][1]["text"] in ("<A>", "<B>")  # the agent's move, guided as in rollouts
    assert post(f"{sid}/move", {"text": "<A>"}).status_code == 409


@pytest.mark.parametrize("game, moves", [
    ("split_nocomm", {"proposal": "Proposal: 5 hats, 5 books, 5 balls"}),
    ("trust_and_split", {"message": "<<message_start>> I hold rock. <<message_end>>",
                         "proposal": "<<proposal_start>> 5 <<proposal_end>>"}),
])  # fmt: skip
def test_one_round_of_the_other_games(url: str, game: str, moves: dict[str, str]) -> None:
    state = httpx.post(f"{url}/play/new", json={"game": game, "model": "base", "seat": "bob", "n_rounds": 1,
                                                "seed": 2}, timeout=300).json()  # fmt: skip
    assert state["rules"] and state["prompt"] and state["format"]
    while not state["done"]:
        r = httpx.post(f"{url}/play/{state['session']}/move", json={"text": moves[state["kind"]]}, timeout=300)
        assert r.status_code == 200, r.text
        state = r.json()
    assert state["log"][-1]["who"] == "round" and "Round 1:" in state["log"][-1]["text"]
    assert any(e["who"] == "agent" for e in state["log"])
