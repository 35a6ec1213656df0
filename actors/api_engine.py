"""API seats: a model behind an OpenAI-compatible chat-completions endpoint takes a seat.

It sees the seat's chat as messages (text, no token ids: nothing to train on) and answers with
text. Transport failures (timeouts, connection errors, HTTP 429 and 5xx, malformed JSON) are
retried with exponential backoff; other HTTP errors (401, 404, ...) fail at once. An answer in the
wrong format is re-prompted (the bad answer and a correction are sent back) up to `max_reprompts`
times; after that the last answer is passed on and the env counts the decision invalid. Only the
accepted answer enters the seat's chat.

The API key is read from the environment variable *named* in the config (`api_key_env`); the key
itself is never put in a config, a log line, an error message or a repr.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from actors.engine import Sampling
from actors.match import TextDecision

log = logging.getLogger(__name__)

REPROMPT = (
    "Your answer is not in the required format. Answer again with only the answer, exactly in the "
    "required format (it must match the regular expression {regex})."
)
RETRY_STATUS = frozenset({408, 409, 425, 429})


class APIError(RuntimeError):
    """The endpoint failed for good (a non-retryable status, or retries exhausted)."""


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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> APIConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown API config key(s) {sorted(unknown)}; valid: {sorted(cls.__dataclass_fields__)}")
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
                raise APIError(f"environment variable {self.config.api_key_env} (the API key) is not set")
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stats = {"requests": 0, "retries": 0, "reprompts": 0, "failed_format": 0}

    def __repr__(self) -> str:
        return f"APIEngine(model={self.config.model!r}, base_url={self.config.base_url!r})"

    def _http(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:  # a client is bound to its event loop
            self._client = httpx.AsyncClient(timeout=self.config.timeout_s, headers=self._headers)
            self._loop = loop
        return self._client

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
        last = ""
        for attempt in range(self.config.max_retries + 1):
            if attempt:
                self.stats["retries"] += 1
                delay = min(self.config.backoff_s * 2 ** (attempt - 1), self.config.backoff_max_s)
                await asyncio.sleep(delay * (0.5 + random.random() / 2))
            self.stats["requests"] += 1
            try:
                response = await self._http().post(url, json=body)
            except httpx.TimeoutException:
                last = f"timed out after {self.config.timeout_s}s"
                continue
            except httpx.TransportError as e:
                last = f"transport error {type(e).__name__}"
                continue
            log.debug("%r attempt %d: HTTP %s", self, attempt, response.status_code)
            if response.status_code >= 500 or response.status_code in RETRY_STATUS:
                last = f"HTTP {response.status_code}"
                continue
            if response.status_code >= 400:
                raise APIError(f"{self!r}: HTTP {response.status_code}: {response.text[:200]}")
            try:
                content = response.json()["choices"][0]["message"]["content"]
                if not isinstance(content, str):
                    raise TypeError(f"content is {type(content).__name__}")
                return content
            except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
                last = f"malformed response ({type(e).__name__}: {str(e)[:80]})"
                continue
        raise APIError(f"{self!r}: giving up after {self.config.max_retries + 1} attempts: {last}")


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
        text = await self.engine.complete(chat, sampling)
        rejected = 0
        while not valid(text) and rejected < config.max_reprompts:
            rejected += 1
            self.engine.stats["reprompts"] += 1
            chat += [
                {"role": "assistant", "content": text},
                {"role": "user", "content": REPROMPT.format(regex=sampling.regex or "")},
            ]
            text = await self.engine.complete(chat, sampling)
        if not valid(text):
            self.engine.stats["failed_format"] += 1
        return TextDecision(text=text, n_rejected=rejected)
