"""The engine interface every seat's policy is served through.

An engine turns a prompt (token ids) into a generation (token ids and their sampling log-probs),
bound to an explicit adapter key per request. Implementations: the vLLM engine (LLM seats), the
scripted engine (envs.scripted strategies) and the OpenAI-compatible HTTP engine (API seats).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from actors.adapters import AdapterVersion


class UnknownAdapterError(KeyError):
    """A request named an adapter version that is not loaded: never fall back to the base model."""


@dataclass(frozen=True)
class Sampling:
    """What one decision asks of the engine."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    regex: str | None = None  # guided decoding when set
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Generation:
    token_ids: list[int]
    logprobs: list[float]  # engine sampling log-probs of token_ids (constrained when guided)
    text: str
    adapter: str | None  # the adapter key that served the request (None = base model)
    finish_reason: str | None = None
    meta: dict = field(default_factory=dict)


class Engine(Protocol):
    async def generate(self, prompt_token_ids: list[int], sampling: Sampling, adapter: str | None) -> Generation:
        """Generate for one request. `adapter` is an adapter key (`AdapterVersion.key`) or None for
        the base model. Raises UnknownAdapterError when the key is not loaded."""
        ...

    async def load_adapter(self, version: AdapterVersion) -> str:
        """Load, validate and probe a version; return its key. Raises AdapterError on rejection,
        leaving what was served before untouched."""
        ...

    async def unload_adapter(self, key: str) -> None:
        """Retire a version once its in-flight requests are done."""
        ...


class NoEngine:
    """The engine of a worker whose seats are all scripted or API (config `engine: None`): an LLM
    seat on it is a bug and raises."""

    async def generate(self, prompt_token_ids: list[int], sampling: Sampling, adapter: str | None) -> Generation:
        raise RuntimeError("this worker has no LLM engine (no base/adapter/run seat was given)")

    async def load_adapter(self, version: AdapterVersion) -> str:
        raise RuntimeError("this worker has no LLM engine: it cannot load adapters")

    async def unload_adapter(self, key: str) -> None:
        return None
