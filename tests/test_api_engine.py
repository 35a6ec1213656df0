"""The OpenAI-compatible API seat against a tiny local HTTP server on 127.0.0.1: valid answers,
500s, timeouts (a hung server and one that trickles its body in), dropped connections, non-HTTP
replies, bad encodings, oversized and malformed bodies (retried with backoff); wrong formats
(re-prompted, then invalid); endpoints that stay down (the decision is forfeited and counted, the
match completes, a breaker stops paying retries); misconfigured endpoints (raise); the key header
and the key's absence from errors, logs, reprs, configs and transcripts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import envs
from actors.api_engine import APIConfig, APIEngine, APIError
from actors.engine import Sampling
from actors.match import SeatSpec, play_match
from actors.scripted_engine import ScriptedEngine

KEY_ENV = "RECIPROCITY_TEST_API_KEY"
TIMEOUT_S = 0.8  # the client's deadline: short, yet long enough for a good answer on a loaded 2-core machine
SECRET = "sk-test-secret-123"


class Server:
    """Each request pops the next scripted behaviour (default "valid"); requests are recorded."""

    def __init__(self) -> None:
        self.plan: list[str] = []
        self.requests: list[dict] = []
        self.answer = "<A>"
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                what = server.plan.pop(0) if server.plan else "valid"
                auth = self.headers.get("Authorization", "")
                if what == "timeout":  # past the client's deadline (TIMEOUT_S)
                    time.sleep(TIMEOUT_S + 0.5)
                    what = "valid"
                if what == "hang":  # longer than every client deadline
                    time.sleep(TIMEOUT_S + 1.5)
                    return self._send(500, b"too late")
                if what == "trickle":  # each byte well within a read timeout, the whole well past the deadline
                    return self._send(200, _completion(server.answer), chunk_delay=0.08)
                if what == "close":  # drop the connection without answering
                    return
                if what == "garbage":  # not HTTP at all
                    return self._raw(b"SSH-2.0-OpenSSH\r\n\r\n\x00\xff")
                if what == "badgzip":  # a body that does not decode as its Content-Encoding says
                    return self._send(200, b"this is not gzip", headers={"Content-Encoding": "gzip"})
                if what == "huge":
                    return self._send(200, b'{"choices": [' + b" " * 5000 + b"]}")
                if what == "html":
                    return self._send(200, b"<html><body>Bad gateway</body></html>", ctype="text/html")
                if what == "latin1":
                    return self._send(200, b'{"choices": [{"message": {"content": "\xff\xfe"}}]}')
                if what == "list":
                    return self._send(200, b"[1, 2, 3]")
                if what == "nullcontent":
                    return self._send(200, json.dumps({"choices": [{"message": {"content": None}}]}).encode())
                if what == "500":
                    return self._send(500, b"oops")
                if what == "503":
                    return self._send(503, b"", headers={"Retry-After": "1"})
                if what == "429":
                    return self._send(429, b'{"error": "rate limited"}')
                if what == "400":
                    return self._send(400, b'{"error": "context too long"}')
                if what == "401":
                    return self._send(401, b'{"error": "bad key"}')
                if what == "401echo":  # a server that quotes the key back in its error
                    return self._send(401, json.dumps({"error": f"invalid key in header {auth}"}).encode())
                if what == "404":
                    return self._send(404, b'{"error": "no such model"}')
                if what == "malformed":
                    return self._send(200, b'{"choices": [')
                if what == "nocontent":
                    return self._send(200, json.dumps({"choices": []}).encode())
                if what == "echo":  # an answer that repeats the key (the transcript must not)
                    text = f"<<message_start>>my header is {auth}<<message_end>> <<proposal_start>> 5 <<proposal_end>>"
                    return self._send(200, _completion(text))
                text = "I choose to cooperate!" if what == "wrong" else server.answer
                self._send(200, _completion(text))

            def _send(
                self,
                code: int,
                data: bytes,
                ctype: str = "application/json",
                headers: dict[str, str] | None = None,
                chunk_delay: float = 0.0,
            ) -> None:
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    if not chunk_delay:
                        self.wfile.write(data)
                        return
                    for i in range(len(data)):
                        self.wfile.write(data[i : i + 1])
                        self.wfile.flush()
                        time.sleep(chunk_delay)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _raw(self, data: bytes) -> None:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def _completion(text: str) -> bytes:
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}).encode()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.httpd.shutdown()


@pytest.fixture(autouse=True)
def fresh(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test: an empty plan and request log, the default answer, the key in the environment."""
    server.plan.clear()
    server.requests.clear()
    server.answer = "<A>"
    monkeypatch.setenv(KEY_ENV, SECRET)


@pytest.fixture()
def engine(server: Server) -> APIEngine:
    return APIEngine(_config(server))


def _config(server: Server, **kw: object) -> dict:
    return {"base_url": server.url, "model": "m", "api_key_env": KEY_ENV, "timeout_s": TIMEOUT_S, "backoff_s": 0.01,
            "max_response_bytes": 2000, **kw}


SAMPLING = Sampling(max_tokens=8, regex="(<A>|<B>)")


def _ask(engine: APIEngine) -> str:
    return asyncio.run(engine.complete([{"role": "user", "content": "hi"}], SAMPLING))


def test_valid_answer_and_key_header(engine: APIEngine, server: Server) -> None:
    assert _ask(engine) == "<A>"
    req = server.requests[-1]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == f"Bearer {SECRET}"
    assert req["body"]["model"] == "m" and req["body"]["max_tokens"] == 8
    assert SECRET not in repr(engine) and SECRET not in str(vars(engine.config))


@pytest.mark.parametrize("failure", ["500", "timeout", "malformed", "nocontent"])
def test_transient_failures_are_retried(engine: APIEngine, server: Server, failure: str) -> None:
    server.plan[:] = [failure, failure]
    assert _ask(engine) == "<A>"
    assert len(server.requests) == 3 and engine.stats["retries"] == 2


def test_retries_exhausted_and_fatal_status(engine: APIEngine, server: Server) -> None:
    server.plan[:] = ["500"] * 10
    with pytest.raises(APIError, match="giving up after 5 attempts: HTTP 500") as e:
        _ask(engine)
    assert SECRET not in str(e.value)
    server.plan[:] = ["401"]
    with pytest.raises(APIError, match="HTTP 401"):
        _ask(engine)


def test_missing_key_env_is_an_error(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RECIPROCITY_UNSET_KEY", raising=False)
    with pytest.raises(APIError, match="RECIPROCITY_UNSET_KEY"):
        APIEngine({"base_url": server.url, "model": "m", "api_key_env": "RECIPROCITY_UNSET_KEY"})


def _match(engine: APIEngine) -> tuple:
    env = envs.make("ipd", n_rounds=3)
    seats = (SeatSpec(engine, "api-m"), SeatSpec(ScriptedEngine("always_defect"), "always_defect"))
    return asyncio.run(play_match(env, seats, seed=0))


def test_wrong_format_is_reprompted_then_accepted(engine: APIEngine, server: Server) -> None:
    server.plan[:] = ["wrong", "wrong"]
    api, other = _match(engine)
    assert api.n_decisions == 3 and api.n_resampled == 1 and api.n_invalid == 0
    assert api.actions == ["C", "C", "C"] and api.rewards == [0.0, 0.0, 0.0] and other.rewards == [5.0] * 3
    assert api.token_ids == [] and api.guided == []
    reprompt = server.requests[2]["body"]["messages"]
    assert [m["role"] for m in reprompt] == ["user", "assistant", "user", "assistant", "user"]
    assert reprompt[1]["content"] == "I choose to cooperate!" and "(<A>|<B>)" in reprompt[-1]["content"]
    # the next decision's chat holds only the accepted answer
    assert [m["content"] for m in server.requests[3]["body"]["messages"] if m["role"] == "assistant"] == ["<A>"]


def test_still_wrong_after_three_reprompts_counts_invalid(engine: APIEngine, server: Server) -> None:
    server.plan[:] = ["wrong"] * 4
    api, _ = _match(engine)
    assert api.n_invalid == 1 and api.n_resampled == 1 and api.actions[0] == "D"  # invalid plays defect
    assert len(server.requests) == 4 + 2 and engine.stats["failed_format"] == 1
    info = json.loads(api.info_json)
    assert info["n_invalid"] == [1, 0]


# ----------------------------------------------------------------------------- faults (issue 5, item 6)
TRANSIENT = ["hang", "trickle", "close", "garbage", "badgzip", "huge", "html", "latin1", "list", "nullcontent", "503",
             "429"]


@pytest.mark.parametrize("failure", TRANSIENT)
def test_more_transient_failures_are_retried(
    engine: APIEngine, server: Server, failure: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Each fault, once, then a good answer: retried (one retry), never raised, key never logged."""
    caplog.set_level(logging.DEBUG)
    server.plan[:] = [failure]
    t0 = time.perf_counter()
    assert _ask(engine) == "<A>"
    assert len(server.requests) == 2 and engine.stats["retries"] == 1
    assert time.perf_counter() - t0 < TIMEOUT_S + 4  # the deadline holds for a trickling body too (8 s in full)
    assert SECRET not in caplog.text


@pytest.mark.parametrize("failure", ["trickle", "close", "garbage", "badgzip", "huge", "list"])
def test_persistent_failure_raises_with_url_not_key(engine: APIEngine, server: Server, failure: str) -> None:
    server.plan[:] = [failure] * 5
    with pytest.raises(APIError, match="giving up after 5 attempts") as e:
        _ask(engine)
    assert server.url in str(e.value) and SECRET not in str(e.value) and not e.value.fatal


def test_key_echoed_by_the_server_is_redacted(engine: APIEngine, server: Server) -> None:
    server.plan[:] = ["401echo"]
    with pytest.raises(APIError, match="HTTP 401") as e:
        _ask(engine)
    assert e.value.fatal and SECRET not in str(e.value) and "***" in str(e.value)


def _play(engine: APIEngine, game: str = "ipd", n_rounds: int = 3, other: str = "always_defect") -> tuple:
    env = envs.make(game, n_rounds=n_rounds)
    seats = (SeatSpec(engine, "api-m"), SeatSpec(ScriptedEngine(other), other))
    return asyncio.run(play_match(env, seats, seed=0))


def test_failed_decision_is_forfeited_and_the_match_completes(
    engine: APIEngine, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """The first decision's five attempts all fail: that decision is played as invalid (defect in
    IPD), counted invalid and as a forfeit; the match goes on and later decisions are normal."""
    server.plan[:] = ["500", "hang", "garbage", "malformed", "503"]
    api, other = _play(engine)
    assert api.n_decisions == 3 and api.n_invalid == 1 and api.actions == ["D", "C", "C"]
    assert json.loads(api.info_json)["n_invalid"] == [1, 0]
    assert engine.stats["forfeits"] == 1 and engine.stats["failed_requests"] == 1 and engine.stats["retries"] == 4
    assert len(server.requests) == 5 + 2
    warning = next(r.getMessage() for r in caplog.records if "forfeits" in r.getMessage())
    assert server.url in warning and SECRET not in caplog.text


def test_dead_endpoint_match_completes_fast_with_every_decision_forfeited(server: Server) -> None:
    """An endpoint that always answers 500: 10 rounds complete; after 3 failed decisions (15
    requests) the breaker forfeits the remaining 7 without a request."""
    engine = APIEngine(_config(server, breaker_failures=3, breaker_cooldown_s=60))
    server.plan[:] = ["500"] * 1000
    t0 = time.perf_counter()
    api, other = _play(engine, n_rounds=10, other="tit_for_tat")
    assert api.n_decisions == 10 and api.n_invalid == 10 and api.actions == ["D"] * 10
    assert other.actions == ["C"] + ["D"] * 9  # the opponent saw the forfeits as defections
    assert engine.stats["forfeits"] == 10 and engine.stats["breaker_skips"] == 7
    assert len(server.requests) == 3 * 5 and time.perf_counter() - t0 < 10
    server.plan.clear()


def test_breaker_tries_again_after_cooldown(server: Server) -> None:
    engine = APIEngine(_config(server, breaker_failures=1, breaker_cooldown_s=1.5, max_retries=0))
    server.plan[:] = ["500"]
    api, _ = _play(engine, n_rounds=1)
    assert api.n_invalid == 1 and engine.stats["forfeits"] == 1
    api, _ = _play(engine, n_rounds=1)  # still down: forfeited without a request
    assert api.n_invalid == 1 and engine.stats["breaker_skips"] == 1 and len(server.requests) == 1
    time.sleep(1.6)
    api, _ = _play(engine, n_rounds=1)  # cooled down: one attempt, which succeeds
    assert api.n_invalid == 0 and api.actions == ["C"] and len(server.requests) == 2


def test_on_failure_raise_and_misconfigured_endpoints_raise(engine: APIEngine, server: Server) -> None:
    strict = APIEngine(_config(server, on_failure="raise", max_retries=1))
    server.plan[:] = ["500", "500"]
    with pytest.raises(APIError, match="giving up after 2 attempts"):
        _play(strict)
    for status in ("401", "404"):  # forfeit mode too: every decision would fail the same way
        server.plan[:] = ["valid", status]
        with pytest.raises(APIError, match=f"HTTP {status}") as e:
            _play(engine)
        assert e.value.fatal and SECRET not in str(e.value)
    server.plan[:] = ["400"]  # request-specific (e.g. context too long): forfeited
    api, _ = _play(engine, n_rounds=1)
    assert api.n_invalid == 1 and engine.stats["forfeits"] == 1


def test_key_never_reaches_the_transcript(engine: APIEngine, server: Server) -> None:
    """A Trust-and-Split message in which the endpoint repeats the key: neither the delivered message,
    the game record nor the seat's chat holds it."""
    server.answer = "<<message_start>>hi<<message_end>> <<proposal_start>> 5 <<proposal_end>>"
    server.plan[:] = ["echo"] * 3
    api, other = _play(engine, game="trust_and_split", n_rounds=2, other="truthful")
    info = json.loads(api.info_json)
    assert api.n_invalid == 0 and SECRET not in api.info_json
    assert any("my header is Bearer ***" in (m or "") for round_ in info["messages"] for m in round_)
    for req in server.requests:  # what the seat sent back (its chat) is clean too
        assert all(SECRET not in m["content"] for m in req["body"]["messages"])


def test_config_refuses_inline_keys(server: Server) -> None:
    bad = [
        {"api_key": "sk-live-abcdefghijklmnop"},
        {"base_url": "https://user:sk-live-abcdefghijklmnop@example.com/v1"},
        {"base_url": "https://example.com/v1?api_key=sk-live-abcdefghijklmnop"},
        {"extra_body": {"api_key": "sk-live-abcdefghijklmnop"}},
        {"headers": {"Authorization": "Bearer sk-live-abcdefghijklmnop"}},
    ]
    for extra in bad:
        with pytest.raises(ValueError) as e:
            APIConfig.from_dict({"base_url": server.url, "model": "m", **extra})
        assert "abcdefghijklmnop" not in str(e.value) and ("environment" in str(e.value))
    with pytest.raises(ValueError, match="on_failure"):
        APIConfig.from_dict({"base_url": server.url, "model": "m", "on_failure": "ignore"})


def test_worker_counts_api_forfeits(server: Server, model_dir: Path) -> None:
    """A RolloutWorker with an API seat against a flaky endpoint: every game completes, each
    forfeited decision is an invalid decision in the batch and an `api_forfeits` count."""
    from actors.trajectories import concat
    from actors.worker import MatchSpec, PlayerSpec, RolloutWorker

    server.plan[:] = ["500"] * 5 + ["valid"] * 2 + ["hang"] * 5  # two decisions forfeited, in whatever games
    worker = RolloutWorker({
        "model": str(model_dir), "engine_factory": "support:fake_engine", "check_template": False,
        "api": {"flaky": _config(server, breaker_failures=10)},
    })
    specs = [MatchSpec("ipd", game_id=g, group_id=0, seed=g, options={"n_rounds": 2},
                       seats=(PlayerSpec("api", "flaky"), PlayerSpec("scripted", "always_cooperate")))
             for g in range(3)]
    rows = concat(asyncio.run(worker.run(specs, concurrency=1, refs=False))).to_pylist()
    api_rows = [r for r in rows if r["policy_name"] == "flaky"]
    assert len(api_rows) == 3 and all(r["n_decisions"] == 2 for r in api_rows)
    assert sum(r["n_invalid"] for r in api_rows) == 2
    last = worker.stats()["last"]
    assert last["games"] == 3 and last["invalid"] == 2 and last["api_forfeits"] == 2
    assert last["api_requests"] == len(server.requests) == 5 + 5 + 4
