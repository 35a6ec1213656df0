"""Checkpoints: a directory per checkpoint, written to a temp name and renamed into place, so a
crash mid-write leaves the previous checkpoint intact.

Layout of `<run dir>/checkpoints/it-000010/`:
  state.json         iteration, adapter version, MLflow run id, config fingerprint, RNG state
  config.yaml        the full config of the run
  learner/           the learner's checkpoint (adapter + optimizer state), written by rank 0
  pool.json          the opponent pool's state
  adapters/          every adapter version the pool still refers to (safetensors + config)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from reciprocity.config import Config, ConfigError

PREFIX = "it-"


@dataclass
class State:
    iteration: int  # the next iteration to run
    version: int  # the current adapter version
    run_id: str
    fingerprint: str
    rng: dict[str, Any]


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def begin(run_dir: Path, iteration: int) -> Path:
    """A temp directory to fill; hand it to `commit`."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{PREFIX}{iteration:06d}-"))


def commit(tmp: Path, state: State, cfg: Config, keep: int) -> Path:
    """Write state and config into `tmp`, rename it into place, keep the newest `keep`."""
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    (tmp / "state.json").write_text(json.dumps(asdict(state), indent=1))
    final = tmp.parent / f"{PREFIX}{state.iteration:06d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(_complete(tmp.parent))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _complete(root: Path) -> list[Path]:
    return [p for p in root.glob(f"{PREFIX}*") if (p / "state.json").is_file()]


def latest(run_dir: Path) -> Path | None:
    root = checkpoints_dir(run_dir)
    done = sorted(_complete(root)) if root.is_dir() else []
    return done[-1] if done else None


def load(run_dir: Path, cfg: Config) -> tuple[Path, State]:
    """The newest complete checkpoint under `run_dir`, refused unless it matches `cfg`."""
    ckpt = latest(run_dir)
    if ckpt is None:
        raise ConfigError(f"--resume {run_dir}: no complete checkpoint under {checkpoints_dir(run_dir)}")
    state = State(**json.loads((ckpt / "state.json").read_text()))
    if state.fingerprint != cfg.fingerprint():
        saved = Config.model_validate(yaml.safe_load((ckpt / "config.yaml").read_text()))
        diff = _first_difference(saved.flat(), cfg.flat())
        raise ConfigError(f"--resume {run_dir}: the checkpoint was made with another config ({diff})")
    return ckpt, state


def _first_difference(a: dict[str, str], b: dict[str, str]) -> str:
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            return f"{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}"
    return "fingerprint mismatch"


def save_pool(ckpt: Path, state: dict[str, Any], adapters: dict[str, Any]) -> None:
    """The pool's JSON state and every adapter version it refers to (bytes + config + probe)."""
    (ckpt / "pool.json").write_text(json.dumps(state, indent=1))
    root = ckpt / "adapters"
    for key, version in adapters.items():
        d = version.write(root)
        meta = {"key": key, "name": version.name, "version": version.version, "sha256": version.sha256,
                "probe": None if version.probe is None else
                {"token_ids": list(version.probe.token_ids), "logprobs": list(version.probe.logprobs)}}
        (d / "version.json").write_text(json.dumps(meta))


def load_pool(ckpt: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from actors.adapters import AdapterError, AdapterVersion, Probe

    state = json.loads((ckpt / "pool.json").read_text())
    adapters: dict[str, Any] = {}
    for meta_file in sorted((ckpt / "adapters").glob("*/version.json")):
        meta = json.loads(meta_file.read_text())
        v = AdapterVersion.from_dir(meta_file.parent, meta["name"], meta["version"])
        if v.sha256 != meta["sha256"]:
            raise AdapterError(f"checkpoint adapter {meta['key']} is corrupted (sha256 mismatch)")
        probe = meta.get("probe")
        if probe:
            v = AdapterVersion(v.name, v.version, v.sha256, v.data, v.config,
                               Probe(tuple(probe["token_ids"]), tuple(probe["logprobs"])))
        adapters[meta["key"]] = v
    return state, adapters
