"""Checkpoints: a directory per checkpoint, written to a temp name and renamed into place, so a
crash mid-write leaves the previous checkpoint intact (tests/test_atomic_writes.py kills writers
with SIGKILL at random moments). Files are fsynced before the rename, so the rename never
publishes a directory whose data is still only in the page cache. A directory counts as a
checkpoint only once its state.json parses; debris of a crashed write (`.tmp-*`, `.old-*`) is
removed by the next `begin`.

Layout of `<run dir>/checkpoints/it-000010/`:
  state.json         iteration, adapter version, MLflow run id, config fingerprint, RNG state
  config.yaml        the full config of the run
  learner/           the learner's checkpoint (adapter + optimizer state), written by rank 0
  pool.json          the opponent pool's state
  adapters.json      every adapter version the pool still refers to: metadata and sha256; the bytes
                     are in the run's adapter store `<run dir>/adapters/<sha256>/`, once for all
                     the checkpoints kept (the driver deletes a version's bytes once neither the
                     pool nor a kept checkpoint refers to it). Checkpoints written before this
                     (an `adapters/` folder with the bytes in each checkpoint) still load.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from reciprocity.config import Config, ConfigError

PREFIX = "it-"
ADAPTERS = "adapters.json"
log = logging.getLogger(__name__)


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
    """A temp directory to fill; hand it to `commit`. Removes the debris of crashed writes."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for debris in [*root.glob(f".tmp-{PREFIX}*"), *root.glob(f".old-{PREFIX}*")]:
        shutil.rmtree(debris, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{PREFIX}{iteration:06d}-"))


def commit(tmp: Path, state: State, cfg: Config, keep: int) -> Path:
    """Write state and config into `tmp`, fsync it, rename it into place, keep the newest `keep`.
    A checkpoint of the same iteration is first renamed away (never deleted in place: a crash
    half-way through deleting it would leave a directory that still looks complete)."""
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    (tmp / "state.json").write_text(json.dumps(asdict(state), indent=1))
    _fsync_tree(tmp)
    root = tmp.parent
    final = root / f"{PREFIX}{state.iteration:06d}"
    old = None
    if final.exists():
        old = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    for stale in sorted(_complete(root))[:-keep]:
        gone = root / f".old-{stale.name}-{os.getpid()}"
        os.replace(stale, gone)  # out of sight first, then delete
        shutil.rmtree(gone, ignore_errors=True)
    return final


def _fsync_tree(path: Path) -> None:
    for d, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(d))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _read_state(ckpt: Path) -> State | None:
    """The checkpoint's state, or None when state.json is missing or does not parse."""
    try:
        data = json.loads((ckpt / "state.json").read_text())
        names = {f.name for f in fields(State)}
        if not isinstance(data, dict) or set(data) != names:
            raise ValueError(f"fields {sorted(data) if isinstance(data, dict) else type(data).__name__}")
        return State(**data)
    except (OSError, ValueError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        if (ckpt / "state.json").exists():
            log.warning("checkpoint %s is unreadable (%s); skipping it", ckpt, e)
        return None


def _complete(root: Path) -> list[Path]:
    return [p for p in root.glob(f"{PREFIX}*") if (p / "state.json").is_file()]


def latest(run_dir: Path) -> Path | None:
    """The newest checkpoint whose state.json parses (a damaged newer one is skipped, with a warning)."""
    root = checkpoints_dir(run_dir)
    for ckpt in sorted(_complete(root), reverse=True) if root.is_dir() else []:
        if _read_state(ckpt) is not None:
            return ckpt
    return None


def load(run_dir: Path, cfg: Config) -> tuple[Path, State]:
    """The newest complete checkpoint under `run_dir`, refused unless it matches `cfg`."""
    ckpt = latest(run_dir)
    if ckpt is None:
        raise ConfigError(f"--resume {run_dir}: no complete checkpoint under {checkpoints_dir(run_dir)}")
    state = _read_state(ckpt)
    assert state is not None
    if state.fingerprint != cfg.fingerprint():
        # the stored fingerprint may be of an older definition (one that hashed a field now known to
        # be bookkeeping, e.g. runs_dir or learner.threads): the checkpoint's own config decides
        try:
            saved = Config.model_validate(yaml.safe_load((ckpt / "config.yaml").read_text()))
        except (OSError, ValueError, yaml.YAMLError):  # pydantic's ValidationError is a ValueError
            saved = None
        if saved is None or saved.fingerprint() != cfg.fingerprint():
            diff = (_first_difference(saved.flat(), cfg.flat()) if saved is not None
                    else f"fingerprint {state.fingerprint}, now {cfg.fingerprint()}")
            raise ConfigError(f"--resume {run_dir}: the checkpoint was made with another config ({diff})")
    return ckpt, state


def _first_difference(a: dict[str, str], b: dict[str, str]) -> str:
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            return f"{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}"
    return "fingerprint mismatch"


def adapter_store(run_dir: Path) -> Path:
    """The run's adapter store (actors.adapters.AdapterStore): one directory per sha256, shared by
    the live pool and every kept checkpoint."""
    return Path(run_dir) / "adapters"


def save_pool(ckpt: Path, state: dict[str, Any], adapters: dict[str, Any]) -> None:
    """The pool's JSON state and the adapter versions it refers to, by sha256: `adapters.json`
    lists each version's metadata; the bytes live once in the run's adapter store (AdapterRefs are
    already there; AdapterVersions given with their bytes are put there first), so keeping k
    checkpoints costs the unique versions' bytes once, not k times."""
    from actors.adapters import AdapterStore, AdapterVersion

    store = AdapterStore(adapter_store(ckpt.parents[1]))
    metas = []
    for key, version in adapters.items():
        ref = store.put(version) if isinstance(version, AdapterVersion) else store.adopt(version)
        metas.append({**ref.meta(), "key": key})
    (ckpt / "pool.json").write_text(json.dumps(state, indent=1))
    (ckpt / ADAPTERS).write_text(json.dumps(metas, indent=1))


def load_pool(ckpt: Path, verify: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pool's state and {key: AdapterRef}. `verify`: check each version's bytes against its
    sha256 (reads them all); else only that they are there with the recorded size (the worker that
    loads a version checks its sha256 anyway). Checkpoints written before the adapter store
    (`adapters/<dir>/` with the bytes and a version.json) are read too: their refs point there."""
    from actors.adapters import AdapterError, AdapterRef, AdapterStore, Probe

    state = json.loads((ckpt / "pool.json").read_text())
    adapters: dict[str, Any] = {}
    if (ckpt / ADAPTERS).is_file():
        store = AdapterStore(adapter_store(ckpt.parents[1]))
        for meta in json.loads((ckpt / ADAPTERS).read_text()):
            ref = AdapterRef.from_meta(meta, store.path(meta["sha256"]))
            if not store.has(ref):
                raise AdapterError(f"checkpoint adapter {meta['key']}: its bytes are missing from {store.root}")
            adapters[meta["key"]] = ref
    else:  # the format before the adapter store: bytes inside each checkpoint
        for meta_file in sorted((ckpt / "adapters").glob("*/version.json")):
            meta = json.loads(meta_file.read_text())
            d = meta_file.parent
            try:
                config = json.loads((d / "adapter_config.json").read_text())
                size = (d / "adapter_model.safetensors").stat().st_size
            except (OSError, ValueError) as e:
                raise AdapterError(f"cannot read checkpoint adapter at {d}: {e}") from e
            probe = meta.get("probe")
            adapters[meta["key"]] = AdapterRef(meta["name"], int(meta["version"]), meta["sha256"], size, str(d),
                                               config, Probe(tuple(probe["token_ids"]), tuple(probe["logprobs"]))
                                               if probe else None)
    if verify:
        for key, ref in adapters.items():
            try:
                ref.load()
            except AdapterError as e:
                raise AdapterError(f"checkpoint adapter {key} is corrupted: {e}") from None
    return state, adapters


def referenced_blobs(run_dir: Path) -> set[str]:
    """The sha256 of every adapter a complete checkpoint of the run refers to (kept from collection)."""
    out: set[str] = set()
    root = checkpoints_dir(run_dir)
    for ckpt in _complete(root) if root.is_dir() else []:
        with contextlib.suppress(OSError, ValueError):
            out |= {m["sha256"] for m in json.loads((ckpt / ADAPTERS).read_text())}
    return out
