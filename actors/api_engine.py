"""API seats: a model behind an OpenAI-compatible chat-completions endpoint takes a seat.

It sees the seat's chat as messages (text, no token ids: nothing to train on) and answers with
text. Transient failures (timeouts, including a response that trickles in past the deadline,
connection and protocol errors, HTTP 408/409/425/429 and 5xx, malformed or oversized bodies, JSON
without a string `choices[0].message.content`) are retried with jittered exponential backoff.

When a decision still fails, `on_failure` decides: "forfeit" (the default) passes an empty answer
on, which the env plays as its invalid default and counts as an invalid decision; the match goes
on and the forfeit is counted (`stats["forfeits"]`, the worker's `api_forfeits`). "raise" fails
the match with `APIError` (for an evaluation that must not score a dead endpoint as bad play).
Errors that say the endpoint itself is misconfigured (HTTP 401, 403, 404, 405) always raise: every
decision would fail the same way. After `breaker_failures` failed decisions in a row the endpoint
is treated as down for `breaker_cooldown_s`: decisions forfeit at once instead of each waiting out
its retries, then one decision tries again.

An answer in the wrong format is re-prompted (the bad answer and a correction are sent back) up to
`max_reprompts` times; after that the last answer is passed on and the env counts the decision
invalid. Only the accepted answer enters the seat's chat.

The API key is read from the environment variable *named* in the config (`api_key_env`); a config
that carries a key itself (in the URL, `extra_body` or `headers`) is refused, and the key is never
put in a log line, an error message, a repr or a transcript (`actors.redact`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from actors.engine import Sampling
from actors.match import TextDecision
from actors.redact import is_secret_name, redact_text, register_secret

log = logging.getLogger(__name__)

REPROMPT = (
    "Your answer is not in the required format. Answer again with only the answer, exactly in the "
    "required format (it must match the regular expression {regex})."
)
RETRY_STATUS = frozenset({408, 409, 425, 429})
FATAL_STATUS = frozenset({401, 403, 404, 405})  # the endpoint or the key is wrong: every request fails
ON_FAILURE = ("forfeit", "raise")


class APIError(RuntimeError):
    """The endpoint failed for good (a non-retryable status, or retries exhausted). `fatal`: the
    endpoint is misconfigured (bad key, wrong URL), so forfeiting decisions would only hide it."""

    def __init__(self, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


@dataclass(frozen=True)
class APIConfig:
    base_url: str  # e.g. "https://api.openai.com/v1" (".../chat/completions" is appended)
    model: str
    api_key_env: str | None = None  # NAME of the environment variable holding the key
    timeout_s: float = 60.0
    max_retries: int = 4  # retries after the first attempt, per request
    backoff_s: float = 0.5  # first backoff; doubles per retry, jittered, capped at backoff_max_s
    backoff_max_s: float = 16.0
    max_reprompts: int = 3
    system: str | None = None  # a system message prepended to the seat's chat
    extra_body: dict[str, Any] = field(default_factory=dict)  # merged into every request body
    headers: dict[str, str] = field(default_factory=dict)  # extra request headers (no secrets)
    on_failure: Literal["forfeit", "raise"] = "forfeit"  # a decision whose retries are exhausted
    breaker_failures: int = 3  # failed decisions in a row after which the endpoint counts as down
    breaker_cooldown_s: float = 30.0  # how long decisions forfeit at once while it is down
    max_response_bytes: int = 4 * 2**20  # a larger body is malformed (retried)

    def __post_init__(self) -> None:
        if self.on_failure not in ON_FAILURE:
            raise ValueError(f"on_failure {self.on_failure!r}: valid: {', '.join(ON_FAILURE)}")
        if self.timeout_s <= 0 or self.max_retries < 0 or self.backoff_s < 0 or self.breaker_failures < 1:
            raise ValueError("API config: timeout_s > 0, max_retries >= 0, backoff_s >= 0, breaker_failures >= 1")
        if redact_text(self.base_url) != self.base_url:
            raise ValueError("API config: base_url carries credentials; put the key in the environment variable "
                             "named by api_key_env")
        for what, d in (("extra_body", self.extra_body), ("headers", self.headers)):
            secret = sorted(k for k in d if is_secret_name(k))
            if secret:
                raise ValueError(f"API config: {what} key(s) {secret} look like secrets; API keys come only from the "
                                 "environment variable named by api_key_env")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> APIConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            hint = " (API keys come only from the environment: set api_key_env)" if any(
                is_secret_name(k) for k in unknown) else ""
            raise ValueError(
                f"unknown API config key(s) {sorted(unknown)}; valid: {sorted(cls.__dataclass_fields__)}{hint}")
        return cls(**d)


class APIEngine:
    """A text engine over an OpenAI-compatible `/chat/completions` endpoint."""

    kind = "text"

    def __init__(self, config: APIConfig | dict[str, Any], name: str | None = None) -> None:
        self.config = config if isinstance(config, APIConfig) else APIConfig.from_dict(config)
        self.name = name or self.config.model
        key = None
        if self.config.api_key_env:
            key = os.environ.get(self.config.api_key_env)
            if not key:
                raise APIError(f"environment variable {self.config.api_key_env} (the API key) is not set", fatal=True)
            register_secret(key)
        self._key = key
        self._headers = {**self.config.headers, **({"Authorization": f"Bearer {key}"} if key else {})}
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stats = {"requests": 0, "retries": 0, "reprompts": 0, "failed_format": 0, "failed_requests": 0,
                      "forfeits": 0, "breaker_skips": 0}
        self._failures_in_row = 0
        self._down_until = 0.0

    def __repr__(self) -> str:
        return f"APIEngine(model={self.config.model!r}, base_url={redact_text(self.config.base_url)!r})"

    def _redact(self, text: str) -> str:
        return redact_text(text, extra=[self._key] if self._key else ())

    def _http(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:  # a client is bound to its event loop
            self._client = httpx.AsyncClient(timeout=self.config.timeout_s, headers=self._headers)
            self._loop = loop
        return self._client

    async def _post(self, url: str, body: dict[str, Any]) -> tuple[int, bytes]:
        """POST with a deadline on the whole exchange (httpx's timeouts are per read: a body that
        trickles in would never time out) and a cap on the body size."""
        async def exchange() -> tuple[int, bytes]:
            async with self._http().stream("POST", url, json=body) as response:
                chunks, size = [], 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > self.config.max_response_bytes:
                        raise _Oversized(size)
                    chunks.append(chunk)
                return response.status_code, b"".join(chunks)

        return await asyncio.wait_for(exchange(), self.config.timeout_s)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def player(self, game: str, seat: int, seed: int) -> APIPlayer:
        return APIPlayer(self)

    async def complete(self, messages: list[dict[str, str]], sampling: Sampling) -> str:
        """One chat completion (with retries); returns the answer's text."""
        body: dict[str, Any] = {
            "model": self.config.model,
            "messages": messages,
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            **self.config.extra_body,
        }
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        url = self.config.base_url.rstrip("/") + "/chat/completions"
        if time.monotonic() < self._down_until:
            self.stats["breaker_skips"] += 1
            raise APIError(f"{self!r}: endpoint marked down after {self._failures_in_row} failed decisions in a row; "
                           f"retrying in {self._down_until - time.monotonic():.0f}s")
        try:
            text = await self._attempts(url, body)
        except APIError as e:
            if not e.fatal:
                self.stats["failed_requests"] += 1
                self._failures_in_row += 1
                if self._failures_in_row >= self.config.breaker_failures:
                    self._down_until = time.monotonic() + self.config.breaker_cooldown_s
            raise
        self._failures_in_row, self._down_until = 0, 0.0
        return text

    async def _attempts(self, url: str, body: dict[str, Any]) -> str:
        last = ""
        for attempt in range(self.config.max_retries + 1):
            if attempt:
                self.stats["retries"] += 1
                delay = min(self.config.backoff_s * 2 ** (attempt - 1), self.config.backoff_max_s)
                await asyncio.sleep(delay * (0.5 + random.random() / 2))
            self.stats["requests"] += 1
            try:
                status, data = await self._post(url, body)
            except (TimeoutError, httpx.TimeoutException):
                last = f"timed out after {self.config.timeout_s}s"
                continue
            except httpx.RequestError as e:  # transport, protocol, decoding, redirect errors
                last = f"request error {type(e).__name__}"
                continue
            except _Oversized as e:
                last = f"response larger than {self.config.max_response_bytes} bytes ({e.args[0]}+)"
                continue
            log.debug("%r attempt %d: HTTP %s", self, attempt, status)
            if status >= 500 or status in RETRY_STATUS:
                last = f"HTTP {status}"
                continue
            if status >= 400:
                excerpt = data[:200].decode("utf-8", "replace")
                raise APIError(self._redact(f"{self!r}: HTTP {status}: {excerpt}"), fatal=status in FATAL_STATUS)
            try:
                content = json.loads(data)["choices"][0]["message"]["content"]
                if not isinstance(content, str):
                    raise TypeError(f"content is {type(content).__name__}")
                return self._redact(content) if self._key and self._key in content else content
            except (ValueError, KeyError, IndexError, TypeError) as e:  # JSONDecodeError, UnicodeDecodeError
                last = f"malformed response ({type(e).__name__}: {str(e)[:80]})"
                continue
        raise APIError(self._redact(f"{self!r}: giving up after {self.config.max_retries + 1} attempts: {last}"))


class _Oversized(Exception):
    """A response body beyond `max_response_bytes`."""


class APIPlayer:
    """One seat of one match played by an API model."""

    def __init__(self, engine: APIEngine) -> None:
        self.engine = engine

    async def decide(
        self,
        messages: list[dict[str, str]],
        info: dict[str, Any],
        valid: Callable[[str], bool],
        sampling: Sampling,
    ) -> TextDecision:
        config = self.engine.config
        chat = ([{"role": "system", "content": config.system}] if config.system else []) + list(messages)
        rejected = 0
        try:
            text = await self.engine.complete(chat, sampling)
            while not valid(text) and rejected < config.max_reprompts:
                rejected += 1
                self.engine.stats["reprompts"] += 1
                chat += [
                    {"role": "assistant", "content": text},
                    {"role": "user", "content": REPROMPT.format(regex=sampling.regex or "")},
                ]
                text = await self.engine.complete(chat, sampling)
        except APIError as e:
            if e.fatal or config.on_failure == "raise":
                raise
            self.engine.stats["forfeits"] += 1
            log.warning("API seat forfeits a decision (played as invalid): %s", e)
            return TextDecision(text="", n_rejected=rejected, meta={"forfeit": True, "error": str(e)})
        if not valid(text):
            self.engine.stats["failed_format"] += 1
        return TextDecision(text=text, n_rejected=rejected)
