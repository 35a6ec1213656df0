"""OpenAI-compatible chat completions over a token engine: validate, template, generate, answer.

`ChatService.complete(body)` takes the parsed JSON body of `POST /v1/chat/completions` and returns
the response body, or raises `APIRequestError` (an HTTP status and an OpenAI-style error body):
400 for a malformed or over-limit request, 404 for a model that is not served. `model` is `base`
(the base model, explicitly) or an adapter's served name; an unknown name is never answered by the
base model. Messages are rendered with the served tokenizer's chat template into token ids (the
engine takes token ids), exactly as the rollout chats are (`actors.chat`).

Accepted: `model`, `messages` (roles system/user/assistant; content a string or a list of text
parts), `max_tokens` / `max_completion_tokens`, `temperature`, `top_p`, `seed`, `stop`, `n` (1 only),
`stream` (false only) and vLLM's guided-decoding extension `structured_outputs: {"regex": ...}`.
Other OpenAI fields are accepted and ignored. No HTTP, no Ray here: `reciprocity.serve` routes to it.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from actors.chat import ChatTemplate
from actors.engine import Engine, Sampling, UnknownAdapterError

BASE = "base"  # the served name of the base model


@dataclass(frozen=True)
class ChatLimits:
    """Caps of one request (each exceeded cap is a 400)."""

    max_messages: int = 64
    max_message_chars: int = 16_000
    max_total_chars: int = 64_000
    max_tokens: int = 1024  # per request; also bounded by the model's context
    default_max_tokens: int = 256
    max_stop: int = 4
    max_stop_chars: int = 64
    max_regex_chars: int = 1000


class APIRequestError(Exception):
    """An HTTP error with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def unknown_model(name: str, served: list[str]) -> APIRequestError:
    shown = name if len(name) <= 64 else name[:64] + "..."
    return APIRequestError(
        404, f"The model {shown!r} does not exist; served models: {', '.join(served)}", "model", "model_not_found"
    )


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[_Part]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class _Structured(BaseModel):
    model_config = ConfigDict(extra="forbid")
    regex: str | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # other OpenAI fields are accepted and ignored
    model: str = Field(min_length=1, max_length=200)
    messages: list[_Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    structured_outputs: _Structured | None = None


def _client_errors() -> tuple[type[Exception], ...]:
    """What an engine raises for a bad request (vLLM: VLLMClientError, e.g. a grammar error)."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:
        return (ValueError,)
    return (ValueError, VLLMClientError)


def parse_request(body: Any) -> ChatRequest:
    """The body as a ChatRequest; APIRequestError(400) naming the first bad field."""
    if not isinstance(body, dict):
        raise APIRequestError(400, "the request body must be a JSON object")
    try:
        return ChatRequest.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(x) for x in first["loc"]) or None
        raise APIRequestError(400, f"invalid {param or 'body'}: {first['msg']}", param) from None


class ChatService:
    """Chat completions for the served models. `models`: served name -> engine adapter key (None
    for the base model)."""

    def __init__(
        self,
        engine: Engine,
        template: ChatTemplate,
        models: dict[str, str | None],
        max_model_len: int,
        limits: ChatLimits = ChatLimits(),
    ) -> None:
        self.engine, self.template, self.models = engine, template, dict(models)
        self.max_model_len, self.limits = max_model_len, limits
        self.created = int(time.time())

    def list_models(self) -> dict[str, Any]:
        data = [{"id": n, "object": "model", "created": self.created, "owned_by": "reciprocity"} for n in self.models]
        return {"object": "list", "data": data}

    def _check(self, req: ChatRequest) -> tuple[list[dict[str, str]], int, Sampling]:
        lim = self.limits
        if req.model not in self.models:
            raise unknown_model(req.model, list(self.models))
        if req.stream:
            raise APIRequestError(400, "streaming is not supported; send stream=false", "stream")
        if req.n != 1:
            raise APIRequestError(400, "only n=1 is supported", "n")
        if len(req.messages) > lim.max_messages:
            raise APIRequestError(400, f"at most {lim.max_messages} messages per request", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        for i, m in enumerate(messages):
            if len(m["content"]) > lim.max_message_chars:
                raise APIRequestError(400, f"message {i} is over {lim.max_message_chars} characters", f"messages.{i}")
        if sum(len(m["content"]) for m in messages) > lim.max_total_chars:
            raise APIRequestError(400, f"the messages are over {lim.max_total_chars} characters in all", "messages")
        max_tokens = req.max_completion_tokens or req.max_tokens or lim.default_max_tokens
        if max_tokens > lim.max_tokens:
            raise APIRequestError(400, f"max_tokens is capped at {lim.max_tokens}", "max_tokens")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > lim.max_stop or any(not s or len(s) > lim.max_stop_chars for s in stop):
            raise APIRequestError(
                400, f"stop: at most {lim.max_stop} non-empty strings of up to {lim.max_stop_chars} characters", "stop"
            )
        regex = req.structured_outputs.regex if req.structured_outputs else None
        if regex is not None and not 0 < len(regex) <= lim.max_regex_chars:
            raise APIRequestError(400, f"structured_outputs.regex: 1 to {lim.max_regex_chars} characters", "regex")
        sampling = Sampling(
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            regex=regex,
            seed=req.seed,
            stop=tuple(stop),
        )
        return messages, max_tokens, sampling

    async def complete(self, body: Any) -> dict[str, Any]:
        req = parse_request(body)
        messages, max_tokens, sampling = self._check(req)
        try:
            ids = self.template.render_ids(messages, add_generation_prompt=True)
        except Exception as e:  # the template refuses this message order (e.g. two system turns)
            raise APIRequestError(400, f"the chat template cannot render these messages: {e}", "messages") from None
        if len(ids) + max_tokens > self.max_model_len:
            raise APIRequestError(
                400,
                f"{len(ids)} prompt tokens + max_tokens {max_tokens} exceed the context of {self.max_model_len}",
                "messages",
                "context_length_exceeded",
            )
        try:
            gen = await self.engine.generate(ids, sampling, self.models[req.model])
        except UnknownAdapterError:
            raise unknown_model(req.model, list(self.models)) from None
        except _client_errors() as e:  # the engine rejects the request (e.g. a regex its grammar cannot compile)
            raise APIRequestError(400, f"the engine refused the request: {str(e)[:300]}") from None
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": gen.text},
                    "finish_reason": gen.finish_reason or "stop",
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": len(ids),
                "completion_tokens": len(gen.token_ids),
                "total_tokens": len(ids) + len(gen.token_ids),
            },
            "adapter": gen.adapter,  # the engine adapter key that served it (null: the base model)
        }
