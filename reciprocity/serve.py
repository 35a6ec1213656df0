"""`reciprocity serve`: a Ray Serve app with one engine, OpenAI-compatible chat and a play page.

One deployment replica holds one `actors.vllm_engine.VLLMEngine` with every adapter loaded under its
own key: vLLM already multiplexes LoRA adapters per batch (mixed adapters in one step), so a single
replica serves the base model and all adapters concurrently (see sysdesign/serve.md).

Routes:
- `GET /v1/models`, `POST /v1/chat/completions`: OpenAI-compatible (`reciprocity.serve_chat`);
  `model` is `base` or an adapter's name; an unknown name is a 404, never the base model.
- `GET /`: the play page (`reciprocity/web/`); `GET /play/options`, `POST /play/new`,
  `GET /play/{session}`, `POST /play/{session}/move`: games against an agent
  (`reciprocity.serve_games`).

Every error is JSON: `{"error": {"message", ...}}`. Bodies are capped at `MAX_BODY_BYTES`.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from actors.adapters import AdapterError, AdapterVersion
from reciprocity.serve_chat import BASE, APIRequestError, ChatLimits, ChatService
from reciprocity.serve_games import AgentSampling, GameError, GameSessions

log = logging.getLogger(__name__)

ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_BODY_BYTES = 1 << 20
STATIC = {"play.js": "text/javascript", "play.css": "text/css"}
# The page loads only its own script and style; no inline script, no framing.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class ServeError(ValueError):
    """A configuration the app refuses to start with (one line)."""


@dataclass(frozen=True)
class ServeConfig:
    """`model`: the served base model directory. `adapters`: served name -> PEFT adapter directory
    (read by the replica: the path must exist on its node). `engine`: VLLMEngine keyword arguments
    (max_lora_rank defaults to the smallest allowed rank >= every adapter's r). `engine_factory`:
    optional "module:callable" (config -> engine), a test seam."""

    model: str
    adapters: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8000
    engine: dict[str, Any] = field(default_factory=dict)
    engine_factory: str | None = None
    system: str | None = None
    max_sessions: int = 64
    session_ttl_s: float = 3600.0
    agent: AgentSampling = AgentSampling()
    limits: ChatLimits = ChatLimits()
    num_cpus: float = 1.0
    num_gpus: float = 0.0


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """`NAME=PATH` pairs -> {name: absolute path}; ServeError for a bad name, a duplicate or `base`."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise ServeError(f"--adapter {spec!r}: expected NAME=PATH")
        if not ADAPTER_NAME.fullmatch(name) or name == BASE:
            raise ServeError(f"--adapter {name!r}: a name is 1-64 of A-Z a-z 0-9 . _ - (not {BASE!r})")
        if name in out:
            raise ServeError(f"--adapter {name!r} given twice")
        out[name] = str(Path(path).expanduser().resolve())
    return out


def read_adapters(config: ServeConfig) -> dict[str, AdapterVersion]:
    """Every adapter as version 0 of its name (AdapterError when unreadable)."""
    return {name: AdapterVersion.from_dir(path, name, 0) for name, path in config.adapters.items()}


def engine_kwargs(config: ServeConfig, versions: dict[str, AdapterVersion]) -> dict[str, Any]:
    from actors.vllm_engine import lora_rank_for

    try:
        rank = lora_rank_for(int(v.config.get("r", 8)) for v in versions.values())
    except ValueError as e:
        raise ServeError(str(e)) from None
    # threads: the replica's CPUs (Ray gives its process OMP_NUM_THREADS=1 otherwise); replicas
    # serve side by side, so each computes on its own share
    kwargs: dict[str, Any] = {"max_loras": max(1, min(len(versions), 4)), "max_lora_rank": rank,
                              "threads": max(1, int(config.num_cpus))}
    return {**kwargs, **config.engine}


def check_adapters(config: ServeConfig) -> None:
    """Refuse bad adapters before any engine starts (the engine checks them again when loading)."""
    from actors.adapter_checks import BaseModel, check_adapter

    base = BaseModel.from_dir(Path(config.model))
    try:
        versions = read_adapters(config)
        rank = engine_kwargs(config, versions)["max_lora_rank"]
        for version in versions.values():
            check_adapter(version, base, rank)
    except AdapterError as e:
        raise ServeError(str(e)) from None


def make_engine(config: ServeConfig, versions: dict[str, AdapterVersion]) -> Any:
    if config.engine_factory:
        module, _, name = config.engine_factory.partition(":")
        return getattr(importlib.import_module(module), name)(config)
    from actors.vllm_engine import VLLMEngine

    return VLLMEngine(config.model, **engine_kwargs(config, versions))


def _static(name: str) -> bytes:
    return resources.files("reciprocity.web").joinpath(name).read_bytes()


def _error(status: int, body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store"})


async def _json(request: Request) -> Any:
    size = request.headers.get("content-length")
    if size is not None and (not size.isdigit() or int(size) > MAX_BODY_BYTES):
        raise APIRequestError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise APIRequestError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIRequestError(400, "the request body is not valid JSON") from None


async def _answer(call: Callable[[], Awaitable[dict[str, Any]]]) -> JSONResponse:
    """Run a handler; its refusals and unexpected failures become JSON errors."""
    try:
        return JSONResponse(await call(), headers={"Cache-Control": "no-store"})
    except (APIRequestError, GameError) as e:
        return _error(e.status, e.body())
    except Exception:
        log.exception("request failed")
        return _error(500, APIRequestError(500, "internal error; see the server log").body())


api = FastAPI(title="reciprocity serve", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(api)
class ReciprocityServer:
    """The one replica: engine, adapters, chat service and game sessions."""

    async def __init__(self, config: ServeConfig) -> None:
        from actors.chat import ChatTemplate, check_template

        t0 = time.perf_counter()
        self.template = ChatTemplate.from_pretrained(config.model, system=config.system)
        check_template(self.template)  # the same guard as the rollout workers
        versions = read_adapters(config)
        self.engine = make_engine(config, versions)
        if hasattr(self.engine, "start"):
            await self.engine.start()
        models: dict[str, str | None] = {BASE: None}
        for name, version in versions.items():
            models[name] = await self.engine.load_adapter(version)
        max_len = int(getattr(self.engine, "max_model_len", 2048))
        self.chat = ChatService(self.engine, self.template, models, max_len, config.limits)
        self.games = GameSessions(
            self.engine, self.template, models, config.max_sessions, config.session_ttl_s, config.agent
        )
        self.page = _static("index.html")
        self.files = {name: _static(name) for name in STATIC}
        log.info("serving %s in %.1fs", sorted(models), time.perf_counter() - t0)

    def __del__(self) -> None:
        stop = getattr(getattr(self, "engine", None), "shutdown", None)
        if stop is not None:
            stop()

    @api.get("/v1/models")
    async def models(self) -> JSONResponse:
        return await _answer(self._list_models)

    async def _list_models(self) -> dict[str, Any]:
        return self.chat.list_models()

    @api.post("/v1/chat/completions")
    async def completions(self, request: Request) -> JSONResponse:
        return await _answer(lambda: self._complete(request))

    async def _complete(self, request: Request) -> dict[str, Any]:
        return await self.chat.complete(await _json(request))

    @api.get("/")
    async def page(self) -> Response:
        return Response(self.page, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    @api.get("/static/{name}")
    async def static(self, name: str) -> Response:
        if name not in STATIC:
            return _error(404, {"error": {"message": "not found"}})
        return Response(self.files[name], media_type=STATIC[name], headers=PAGE_HEADERS)

    @api.get("/play/options")
    async def play_options(self) -> JSONResponse:
        return await _answer(self._options)

    async def _options(self) -> dict[str, Any]:
        return self.games.options()

    @api.post("/play/new")
    async def play_new(self, request: Request) -> JSONResponse:
        return await _answer(lambda: self._new(request))

    async def _new(self, request: Request) -> dict[str, Any]:
        return await self.games.new(await _json(request))

    @api.get("/play/{sid}")
    async def play_state(self, sid: str) -> JSONResponse:
        return await _answer(lambda: self._state(sid))

    async def _state(self, sid: str) -> dict[str, Any]:
        return self.games.state(sid)

    @api.post("/play/{sid}/move")
    async def play_move(self, sid: str, request: Request) -> JSONResponse:
        return await _answer(lambda: self._move(sid, request))

    async def _move(self, sid: str, request: Request) -> dict[str, Any]:
        return await self.games.move(sid, await _json(request))


def app(config: ServeConfig) -> Any:
    """The Serve application (bind only; `serve.run` deploys it)."""
    options = {"num_cpus": config.num_cpus}
    if config.num_gpus:
        options["num_gpus"] = config.num_gpus
    return ReciprocityServer.options(ray_actor_options=options).bind(config)


def start(config: ServeConfig, name: str = "reciprocity") -> Any:
    """Deploy on the connected Ray (HTTP on config.host:port, one proxy on the head node); returns
    the ingress handle once the replica is ready (the engine started, the adapters loaded)."""
    serve.start(proxy_location="HeadOnly", http_options={"host": config.host, "port": config.port})
    return serve.run(app(config), name=name, route_prefix="/", blocking=False)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(config: ServeConfig, address: str | None = None, out: Any = None) -> int:
    """`reciprocity serve`: check, deploy, print the URL (on `out`, default stdout: the real console
    while the process's own fds go to the log file, reciprocity.quiet), serve until interrupted."""
    from reciprocity.launcher import init_ray

    check_adapters(config)  # fail fast, before Ray and a tens-of-seconds engine start
    init_ray(address)
    signal.signal(signal.SIGTERM, _interrupt)  # after Ray's own handler: `kill` stops it as cleanly as Ctrl-C
    try:
        start(config)
        url = f"http://{config.host}:{config.port}"
        print(f"serving {', '.join([BASE, *config.adapters])}: play at {url}/ ; OpenAI API at {url}/v1",
              file=out or sys.stdout, flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()  # the local Ray's processes go with the driver
