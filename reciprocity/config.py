"""Typed run configuration (pydantic). A YAML file plus `key.sub=value` overrides; anything
malformed fails before a process starts, with one line naming the key and the problem."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator


class ConfigError(ValueError):
    """A malformed config file or override (one line: key and problem)."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        """YAML reads yes/no/on/off/true as booleans and pydantic would take them for 1/0: refuse a
        boolean where a number is expected."""
        if isinstance(v, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            if annotation in (int, float) or (get_origin(annotation) is Literal and bool not in map(
                    type, get_args(annotation))):
                raise ValueError(f"expected a number, got the boolean {str(v).lower()} (YAML reads yes/no/on/off "
                                 "as booleans)")
        return v


class Game(Section):
    name: Literal["ipd", "split_nocomm", "trust_and_split"] = "ipd"
    options: dict[str, Any] = Field(default_factory=dict)


class Model(Section):
    path: str = "models/smollm2-135m-instruct"
    max_model_len: int = Field(2048, ge=256)


class Lora(Section):
    r: Literal[1, 8, 16, 32, 64, 128, 256] = 8
    alpha: float = Field(16.0, gt=0)
    target_modules: str | list[str] = "all-linear"


class Method(Section):
    name: Literal["naive", "sum", "aa"] = "aa"
    beta: float = Field(0.5, ge=0)
    gamma: float = Field(0.9, ge=0, le=1)
    discount: float = Field(0.9, ge=0, le=1)
    reward_normaliser: float = Field(5.0, gt=0)
    entropy_coef: float = Field(0.0, ge=0)
    kl_coef: float = Field(0.0, ge=0)


class Rollout(Section):
    workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, ge=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    games_per_iteration: int = Field(32, ge=2)
    seed_group_size: int = Field(1, ge=1)
    # batch: the whole batch of a seat label is one group (IPD); seed_group: the games sharing a seed;
    # none: every game its own group, i.e. no baseline (the ablation "AA without the group baseline")
    baseline: Literal["batch", "seed_group", "none"] = "batch"
    concurrency: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0, le=2)  # vLLM refuses a temperature above 2 at the first request
    max_tokens: int = Field(0, ge=0)  # 0: the game's own hint per decision
    free_samples: int = Field(0, ge=0)  # 0: always guided (right for SmolLM2)
    # what makes a free sample valid: lenient (the game's parser finds an action) or full (the whole
    # answer matches the decision's format, as in the authors' code)
    free_sample_match: Literal["lenient", "full"] = "lenient"
    max_loras: int = Field(4, ge=1)
    kv_cache_gib: float = Field(2.0, gt=0)
    # the fidelity probe's bound on mean |engine - learner| log-prob, nats: 2-3x the honest bf16 level
    # (0.06-0.10 measured; sysdesign/engine.md). A safety check, not what is trained: not fingerprinted
    probe_tolerance: float = Field(0.2, gt=0)
    # torch threads of an engine. auto: in sync mode the cores of the worker's node shared among the
    # workers (the learner idles while the engine rolls out: Ray's logical CPUs are oversubscribed on
    # purpose, as for learner.threads); in async mode max(1, int(cpus_per_worker)). sysdesign/engine.md
    engine_threads: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    # an engine's KV-cache block, in tokens: the prefix cache's unit. auto: 32 on CPU (the smallest
    # vLLM's CPU attention takes; 1.56x the rollout tokens/s of vLLM's 128 there), vLLM's default on
    # GPU. Speed only (and the rounding of recomputed prefixes): not fingerprinted. sysdesign/engine.md
    block_size: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    # the malloc of a worker and its engine process: jemalloc (Ray's copy, preloaded; actors/allocator.py)
    # or glibc. auto: jemalloc where the worker has no GPU. Memory and speed only: not fingerprinted
    allocator: Literal["auto", "glibc", "jemalloc"] = "auto"

    @model_validator(mode="after")
    def _groups_divide(self) -> Rollout:
        if self.games_per_iteration % self.seed_group_size:
            raise ValueError("games_per_iteration must be a multiple of seed_group_size")
        return self


class Buffer(Section):
    enabled: bool = True
    snapshot_every: int = Field(10, ge=1)
    resident_max: int = Field(28, ge=1)
    p_snapshot: float = Field(0.5, ge=0, le=1)
    # None: keep every snapshot (the paper). N: once there are more than N, the oldest snapshot
    # leaves the buffer (never drawn again; its rating stays) and its bytes are deleted once no
    # kept checkpoint refers to it. actors/pool.py
    max_snapshots: int | None = Field(None, ge=1)


class Learner(Section):
    ranks: int = Field(1, ge=1)
    cpus_per_rank: float = Field(1.0, ge=0)
    gpus_per_rank: float = Field(0.0, ge=0)
    zero_stage: Literal[0, 1, 2, 3] = 0
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # auto/bf16: bf16 where the device computes it natively
    lr: float = Field(1e-4, gt=0)
    micro_batch_tokens: int = Field(8192, ge=64)
    # log-prob of a guided token: under the grammar-constrained distribution the engine sampled from
    # (constrained) or under the full vocabulary (full, as in the authors' code); learner.md
    guided_logprob: Literal["constrained", "full"] = "constrained"
    # activation checkpointing: recompute a layer's activations in the backward pass, less memory for
    # more learner compute, the same gradients. true: every decoder layer; a number in (0, 1]: that
    # share of the layers, spread evenly; false: none. auto: every layer where the rank has no GPU
    # (learner_settings.CPU_CHECKPOINT_SHARE), none on GPU. The smoke learner on jemalloc peaks at 4.0 /
    # 2.9 / 1.8 GiB with half / three quarters / all, at 269 / 300 / 310 tokens/s (sysdesign/benchmarks.md)
    gradient_checkpointing: Literal["auto"] | bool | Annotated[float, Field(gt=0, le=1)] = "auto"
    # glibc's mmap threshold of a rank, in bytes, fixed (learner.set_mmap_threshold): large blocks are
    # mapped and given back whole instead of fragmenting the heap. auto: CPU_MMAP_THRESHOLD where the
    # rank has no GPU, glibc's sliding default on GPU; 0: glibc's default. Only where the rank runs on
    # glibc (allocator below). Memory only, no number changes (sysdesign/benchmarks.md)
    mmap_threshold: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    # the malloc of a rank: jemalloc (Ray's copy, preloaded, with purging off and the free pages given
    # back after every micro-batch; actors/allocator.py) or glibc (with mmap_threshold). auto: jemalloc
    # where the rank has no GPU. An 8-game learner step: 12 s at 3.3 GiB against 34 s at 2.8 GiB with
    # glibc on an EPYC (sysdesign/benchmarks.md). Memory and speed only: not fingerprinted
    allocator: Literal["auto", "glibc", "jemalloc"] = "auto"
    # torch threads of a rank. auto: in sync mode the cores of the rank's node shared among the ranks
    # (rollout and learning never overlap, so the learner may use the engine's core too: Ray's logical
    # CPUs are oversubscribed on purpose); in async mode int(cpus_per_rank). sysdesign/learner.md
    threads: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    grad_clip: float = Field(1.0, gt=0)


class Evaluation(Section):
    every: int = Field(0, ge=0)  # 0: never during training
    opponents: list[str] = Field(default_factory=lambda: ["scripted:always_defect", "scripted:always_cooperate"])
    games: int = Field(32, ge=1)


class Tracking(Section):
    uri: str | None = None  # None: sqlite:///<abs runs dir>/mlflow.db
    experiment: str = "reciprocity"
    system_metrics: bool = True


class Checkpoint(Section):
    every: int = Field(5, ge=0)  # 0: only at the end
    keep: int = Field(3, ge=1)


class Config(Section):
    run_name: str = "run"
    seed: int = 0
    iterations: int = Field(10, ge=1)
    mode: Literal["sync", "async"] = "sync"
    # exploiter training: one frozen opponent in every game (an agent spec: adapter:PATH, run:ID[@N],
    # api:URL#MODEL, scripted:NAME or base); None: self-play and the agent buffer
    opponent: str | None = None
    max_staleness: int = Field(1, ge=0)
    runs_dir: str = "runs"
    game: Game = Field(default_factory=Game)
    model: Model = Field(default_factory=Model)
    lora: Lora = Field(default_factory=Lora)
    method: Method = Field(default_factory=Method)
    rollout: Rollout = Field(default_factory=Rollout)
    buffer: Buffer = Field(default_factory=Buffer)
    learner: Learner = Field(default_factory=Learner)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    tracking: Tracking = Field(default_factory=Tracking)
    checkpoint: Checkpoint = Field(default_factory=Checkpoint)

    @field_validator("run_name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or not all(c.isalnum() or c in "-_." for c in v):
            raise ValueError("run_name may only hold letters, digits, '-', '_' and '.'")
        return v

    def fingerprint(self) -> str:
        """What a checkpoint must match to be resumed: everything but bookkeeping fields. `runs_dir`
        is where the run lives, not what it is (a run resumes from another working directory);
        learner.threads, rollout.engine_threads and rollout.block_size only set speed (and the float
        rounding of a matmul's reduction, as another machine would); learner.gradient_checkpointing,
        learner.mmap_threshold and the allocators only memory and speed; rollout.probe_tolerance is
        a safety check on what is served."""
        speed_and_memory = {"threads", "gradient_checkpointing", "mmap_threshold", "allocator"}
        d = self.model_dump(exclude={"iterations": True, "tracking": True, "checkpoint": True, "evaluation": True,
                                     "runs_dir": True, "learner": speed_and_memory,
                                     "rollout": {"engine_threads", "block_size", "probe_tolerance", "allocator"}})
        if d["buffer"]["max_snapshots"] is None:  # the default: runs checkpointed before it existed resume
            del d["buffer"]["max_snapshots"]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def flat(self, redact: bool = True) -> dict[str, str]:
        """Flattened `a.b.c -> value` view (MLflow params). Secrets are redacted (`actors.redact`):
        a secret-named key's value, credentials in URLs, known keys from the environment."""
        from actors.redact import MASK, is_secret_name, redact_text

        out: dict[str, str] = {}

        def walk(prefix: str, obj: Any) -> None:
            if isinstance(obj, dict):
                for k, v in obj.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                value = json.dumps(obj) if isinstance(obj, list) else str(obj)
                if redact:
                    leaf = prefix.rsplit(".", 1)[-1]
                    value = MASK if is_secret_name(leaf) and obj not in (None, "") else redact_text(value)
                out[prefix] = value

        walk("", self.model_dump())
        return out


def _one_line(e: ValidationError) -> str:
    err = e.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (+{len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return f"{key}: {msg}{more}"


def apply_override(data: dict[str, Any], override: str) -> None:
    """`a.b=value` sets data['a']['b'] to the YAML-parsed value."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key.sub=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r}: empty key")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: value is not valid YAML: {e}") from None
    node = data
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {p} is not a section")
        node = child
    node[parts[-1]] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last one
    silently: `beta: 0.5` ... `beta: 5` would train with 5)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden below it
                continue
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: SafeLoader reports it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_options(items: list[str]) -> dict[str, Any]:
    """Game options of the command line: `["wording=overt", "n_rounds=5"]` -> {"wording": "overt",
    "n_rounds": 5} (ints as ints); EnvConfigError for an item that is not KEY=VALUE."""
    from envs import EnvConfigError

    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise EnvConfigError(f"bad option {item!r}; expected KEY=VALUE")
        options[key] = int(value) if value.lstrip("-").isdigit() else value
    return options


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}): not a YAML config") from None
        try:
            data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}:{where} malformed YAML: {getattr(e, 'problem', e)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    for o in overrides:
        apply_override(data, o)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{path or 'config'}: {_one_line(e)}") from None
