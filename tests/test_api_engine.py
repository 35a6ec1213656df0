"""The OpenAI-compatible API seat against a tiny local HTTP server: valid answers, 500s, timeouts,
malformed JSON, wrong formats (re-prompted, then invalid), non-retryable errors, the key header."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import envs
from actors.api_engine import APIEngine, APIError
from actors.engine import Sampling
from actors.match import SeatSpec, play_match
from actors.scripted_engine import ScriptedEngine

KEY_ENV = "RECIPROCITY_TEST_API_KEY"
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
                if what == "timeout":
                    time.sleep(0.6)
                    what = "valid"
                if what == "500":
                    return self._send(500, b"oops")
                if what == "401":
                    return self._send(401, b'{"error": "bad key"}')
                if what == "malformed":
                    return self._send(200, b'{"choices": [')
                if what == "nocontent":
                    return self._send(200, json.dumps({"choices": []}).encode())
                text = "I choose to cooperate!" if what == "wrong" else server.answer
                payload = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
                self._send(200, json.dumps(payload).encode())

            def _send(self, code: int, data: bytes) -> None:
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.httpd.shutdown()


@pytest.fixture()
def engine(server: Server, monkeypatch: pytest.MonkeyPatch) -> APIEngine:
    server.plan.clear()
    server.requests.clear()
    server.answer = "<A>"
    monkeypatch.setenv(KEY_ENV, SECRET)
    config = {"base_url": server.url, "model": "m", "api_key_env": KEY_ENV, "timeout_s": 0.3, "backoff_s": 0.01}
    return APIEngine(config)


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
