"""Agent specs: one string names who takes a seat, in `reciprocity evaluate`, `reciprocity play`,
a training run's `opponent` and its periodic evaluation (`evaluation.opponents`). This is the one
parser of that grammar.

Accepted forms (FORMS):
- `scripted:NAME` (or a bare NAME): a strategy of `envs.scripted` (e.g. `tit_for_tat`);
- `adapter:PATH`: a saved PEFT adapter directory (adapter_model.safetensors + adapter_config.json);
- `run:RUN_ID[@VERSION]`: the adapter snapshot a training run logged to MLflow under
  `adapters/v{VERSION}/` (without @VERSION: the highest version logged);
- `base`: the served base model without adapter;
- `api:BASE_URL#MODEL`: a model behind an OpenAI-compatible endpoint; the key is read from the
  environment variable RECIPROCITY_API_KEY, else OPENAI_API_KEY (neither set: no key). Only the
  variable's *name* is kept: the key never enters a spec, a repr or an error;
- `human`: a person at the web app (`reciprocity serve`); evaluate and play refuse it;
- `self`: the adapter a training run is training (its periodic evaluation); evaluate and play refuse it.

Any form may carry a label for tables and plots: `LABEL=SPEC` (e.g. `aa=run:3f2c...`), LABEL made of
letters, digits, `_`, `.` and `-`, starting with a letter.

`parse_agent` turns a spec into an `Agent`: the worker's `PlayerSpec`, plus the `AdapterVersion` to
load on the worker or the `APIConfig` to register in the worker's `api` config; `resolve` parses the
agents of a command (run: specs in the config's MLflow store) and refuses the seats it cannot fill.
Importing this module pulls in neither torch, Ray nor vLLM (`reciprocity play` of two strategies).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from actors.adapters import AdapterError, AdapterVersion
from actors.api_engine import APIConfig
from actors.worker import PlayerSpec
from envs import EnvConfigError, check_game
from envs import scripted as scripted_

if TYPE_CHECKING:
    from reciprocity.config import Config

FORMS = ("scripted:NAME", "adapter:PATH", "run:RUN_ID[@VERSION]", "base", "api:BASE_URL#MODEL", "human",
         "self", "LABEL=any of these")
LABEL = re.compile(r"([A-Za-z][A-Za-z0-9_.-]{0,39})=(.+)")
API_KEY_ENVS = ("RECIPROCITY_API_KEY", "OPENAI_API_KEY")
RUN_ARTIFACTS = "adapters"  # a training run logs version N under adapters/vN/
_VERSION_DIR = re.compile(r"^v(\d+)$")


class AgentSpecError(ValueError):
    """An agent spec that cannot be used (one line; says which forms are accepted)."""


def _forms() -> str:
    return f"accepted forms: {', '.join(FORMS)}"


@dataclass(frozen=True)
class Agent:
    """Who takes a seat. `name` is the short label of tables, plots and metric names."""

    spec: str
    name: str
    kind: str  # scripted | adapter | run | base | api | human | self
    player: PlayerSpec | None  # None for a human seat and for self (the trained adapter, bound by the driver)
    adapter: AdapterVersion | None = field(default=None, repr=False)  # load on the worker first
    api: APIConfig | None = None  # register in the worker config as api[player.policy]

    @property
    def needs_engine(self) -> bool:
        """Whether the seat is played by the served model (base or an adapter)."""
        return self.player is not None and self.player.kind == "llm"


def parse_agent(spec: str, game: str | None = None, tracking_uri: str | None = None) -> Agent:
    """The `Agent` of a spec string. With `game`, scripted names are checked against that game's
    strategies; `tracking_uri` is the MLflow store that `run:` specs are resolved in."""
    if labelled := LABEL.fullmatch(spec):
        label, inner = labelled.groups()
        return replace(parse_agent(inner, game, tracking_uri), spec=spec, name=label)
    kind, sep, rest = spec.partition(":")
    if not sep:
        if spec == "base":
            return Agent(spec, "base", "base", PlayerSpec("llm", "base", -1, adapter=None))
        if spec in ("human", "self"):
            return Agent(spec, spec, spec, None)
        return scripted_agent(spec, spec, game)
    if not rest:
        raise AgentSpecError(f"agent {spec!r}: nothing after {kind + ':'!r}; {_forms()}")
    if kind == "scripted":
        return scripted_agent(spec, rest, game)
    if kind == "adapter":
        return adapter_agent(spec, Path(rest))
    if kind == "run":
        return run_agent(spec, rest, tracking_uri)
    if kind == "api":
        return api_agent(spec, rest)
    raise AgentSpecError(f"unknown agent {spec!r}; {_forms()}")


def spec_kind(spec: str) -> str:
    """The form of a spec (scripted, adapter, run, base, api, human, self; else the unknown prefix),
    read without resolving it (no file, MLflow or strategy look-up)."""
    kind, sep, _ = unlabelled(spec).partition(":")
    if not sep:
        return kind if kind in ("base", "human", "self") else "scripted"
    return kind


def unlabelled(spec: str) -> str:
    """The spec without its `LABEL=` prefix (if any)."""
    return labelled.group(2) if (labelled := LABEL.fullmatch(spec)) else spec


def scripted_agent(spec: str, name: str, game: str | None) -> Agent:
    if not re.fullmatch(r"[A-Za-z0-9_.]+", name):
        raise AgentSpecError(f"unknown agent {spec!r}; {_forms()}")
    if game is not None:
        try:
            scripted_.make(game, name)
        except EnvConfigError as e:
            raise AgentSpecError(f"{e}; {_forms()}") from None
    return Agent(spec, name, "scripted", PlayerSpec("scripted", name))


def _adapter_name(label: str, sha256: str) -> str:
    """A served adapter name that is unique per content: two directories named alike never clash."""
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', label)[:40]}-{sha256[:8]}"


def adapter_agent(spec: str, path: Path) -> Agent:
    try:
        probe = AdapterVersion.from_dir(path, "adapter", 0)
    except AdapterError as e:
        raise AgentSpecError(f"agent {spec!r}: {e} (a PEFT adapter directory is expected)") from None
    label = path.resolve().name or "adapter"
    version = AdapterVersion(_adapter_name(label, probe.sha256), 0, probe.sha256, probe.data, probe.config)
    return Agent(spec, label, "adapter", _llm_player(version), adapter=version)


def _llm_player(version: AdapterVersion) -> PlayerSpec:
    return PlayerSpec("llm", version.name, version.version, adapter=version.key)


def run_agent(spec: str, target: str, tracking_uri: str | None) -> Agent:
    run_id, at, raw_version = target.partition("@")
    if not re.fullmatch(r"[0-9A-Za-z_-]+", run_id) or (at and not raw_version.isdigit()):
        raise AgentSpecError(f"agent {spec!r}: expected run:RUN_ID or run:RUN_ID@VERSION (an integer); {_forms()}")
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        version = int(raw_version) if at else latest_version(MlflowClient(tracking_uri), run_id)
        with tempfile.TemporaryDirectory(prefix="reciprocity-run-") as tmp:
            local = download_artifacts(
                run_id=run_id, artifact_path=f"{RUN_ARTIFACTS}/v{version}", dst_path=tmp, tracking_uri=tracking_uri
            )
            loaded = AdapterVersion.from_dir(_adapter_dir(Path(local)), "run", version)
    except (MlflowException, OSError, AdapterError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AgentSpecError(f"agent {spec!r}: cannot resolve it in MLflow ({first})") from None
    name = f"run-{run_id[:8]}"
    adapter = AdapterVersion(name, version, loaded.sha256, loaded.data, loaded.config)
    return Agent(spec, f"{run_id[:8]}@v{version}", "run", _llm_player(adapter), adapter=adapter)


def latest_version(client: object, run_id: str) -> int:
    """The highest N with an `adapters/vN` artifact directory in the run."""
    entries = client.list_artifacts(run_id, RUN_ARTIFACTS)  # type: ignore[attr-defined]
    versions = [int(m.group(1)) for e in entries if e.is_dir and (m := _VERSION_DIR.match(Path(e.path).name))]
    if not versions:
        raise AgentSpecError(f"run {run_id} has logged no adapter snapshots (no {RUN_ARTIFACTS}/vN artifacts)")
    return max(versions)


def _adapter_dir(root: Path) -> Path:
    """The directory holding adapter_model.safetensors: `root` itself or its single such subdirectory."""
    if (root / "adapter_model.safetensors").is_file():
        return root
    found = sorted(p.parent for p in root.rglob("adapter_model.safetensors"))
    if len(found) != 1:
        raise AdapterError(f"{len(found)} adapter_model.safetensors files in the logged snapshot (expected 1)")
    return found[0]


def api_agent(spec: str, target: str) -> Agent:
    base_url, sep, model = target.rpartition("#")
    if not sep or not model or not re.match(r"https?://[^/\s]+", base_url):
        raise AgentSpecError(f"agent api:...: expected api:BASE_URL#MODEL with an http(s) URL; {_forms()}")
    key_env = next((name for name in API_KEY_ENVS if os.environ.get(name)), None)
    try:  # an evaluation must not score a dead endpoint as bad play: a failed decision raises
        config = APIConfig(base_url=base_url, model=model, api_key_env=key_env, on_failure="raise")
    except ValueError as e:  # e.g. credentials in the URL: the message names no secret, unlike the spec
        raise AgentSpecError(f"agent api:...#{model}: {e}") from None
    return Agent(spec, model, "api", PlayerSpec("api", model), api=config)


def refuse_human(agents: list[Agent], command: str) -> None:
    """Evaluate and play need agents that play unattended: a human seat is the web app's, and `self`
    (the adapter being trained) exists only inside a training run."""
    if any(a.kind == "human" for a in agents):
        raise AgentSpecError(
            f"agent 'human' takes a seat in the web app, not in `reciprocity {command}`: "
            "start it with `reciprocity serve` and play there"
        )
    if any(a.kind == "self" for a in agents):
        raise AgentSpecError(
            f"agent 'self' is the adapter a training run trains (evaluation.opponents), not an agent of "
            f"`reciprocity {command}`: name the adapter (adapter:PATH or run:RUN_ID[@VERSION])"
        )


def resolve(game: str, agents: Sequence[str | Agent], cfg: Config, command: str = "evaluate") -> list[Agent]:
    """Specs -> Agents (run: specs resolved in the config's MLflow store); refuses human and self seats."""
    check_game(game)
    uri = None
    if any(isinstance(a, str) and unlabelled(a).startswith("run:") for a in agents):
        from reciprocity.tracking import tracking_uri

        uri = tracking_uri(cfg)
    out = [a if isinstance(a, Agent) else parse_agent(a, game, uri) for a in agents]
    refuse_human(out, command)
    return out
