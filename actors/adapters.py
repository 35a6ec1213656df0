"""Adapter versions: the unit the learner publishes and the engines serve, and their references.

A version is immutable: a name, an integer version, the sha256 of its safetensors bytes, the
bytes themselves, the PEFT ``adapter_config.json`` as a dict, and a fidelity probe (token ids and
the learner's log-probs of them) that an engine re-computes after loading to prove it serves
exactly these weights.

An `AdapterRef` is a version by reference (metadata and the store path of its bytes): the learner
writes each version's bytes once into an `AdapterStore` under the run dir, and only refs travel
through the pool, the driver and checkpoints; each rollout worker reads the bytes it lacks itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class AdapterError(ValueError):
    """An adapter version is malformed, corrupted, or does not fit the served base model."""


@dataclass(frozen=True)
class Probe:
    """Fixed token ids and the learner's log-prob of each token given its prefix (len - 1 values)."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]


@dataclass(frozen=True)
class AdapterVersion:
    name: str  # the policy's name, e.g. "learner"
    version: int
    sha256: str
    data: bytes = field(repr=False)  # adapter_model.safetensors
    config: dict[str, Any] = field(repr=False)  # adapter_config.json
    probe: Probe | None = field(default=None, repr=False)
    # the store directory these bytes were read from (set by AdapterRef.load): `write` hard-links
    # its safetensors file instead of writing the bytes again. Not part of the version's identity.
    origin: str | None = field(default=None, repr=False, compare=False)

    @property
    def key(self) -> str:
        """Unique served name of this version (a new name per version: see sysdesign)."""
        return f"{self.name}@v{self.version}"

    def check_sha(self) -> None:
        """Raise AdapterError unless the bytes hash to `sha256`. Hashed once per object: the bytes
        are immutable, and at paper size (161 MB) each hash costs a tenth of a second or more. The
        verdict does not travel with a pickled copy (`__getstate__`): a receiver hashes again."""
        if self.__dict__.get("_sha_checked"):
            return
        got = hashlib.sha256(self.data).hexdigest()
        if got != self.sha256:
            raise AdapterError(
                f"adapter {self.key}: sha256 mismatch (corrupted bytes): {got[:12]} != {self.sha256[:12]}"
            )
        object.__setattr__(self, "_sha_checked", True)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_sha_checked"}

    def write(self, root: str | os.PathLike[str]) -> Path:
        """Write to a fresh directory under ``root`` atomically (temp dir, then rename): a crash
        mid-write leaves only a ``.tmp-*`` directory, never a partial version directory. An
        existing directory is reused only when its bytes match the sha256 (else rewritten)."""
        self.check_sha()
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"{self.name}-v{self.version}-{self.sha256[:12]}"
        if final.exists():
            if self._matches(final):
                return final
            stale = Path(tempfile.mkdtemp(dir=root, prefix=".stale-"))
            os.replace(final, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
        self._write_data(tmp / "adapter_model.safetensors")
        (tmp / "adapter_config.json").write_text(json.dumps(self.config, indent=1))
        try:
            os.replace(tmp, final)
        except OSError:  # another writer of the same version won the race
            shutil.rmtree(tmp, ignore_errors=True)
            if not self._matches(final):
                raise
        return final

    def _write_data(self, dest: Path) -> None:
        """The safetensors bytes at `dest`: a hard link to the store file they were read from when
        that is a store directory named by this sha256, of this size, on the same file system (store
        files are written once, atomically, and never changed), else a fresh copy. Workers on one
        node then share one copy on disk. The engine's fidelity probe still checks what it serves."""
        if self.origin is not None and Path(self.origin).name == self.sha256:
            src = Path(self.origin) / "adapter_model.safetensors"
            try:
                if src.stat().st_size == len(self.data):
                    os.link(src, dest)
                    return
            except OSError:  # another file system, a store that went away, or no hard links
                pass
        dest.write_bytes(self.data)

    def _matches(self, path: Path) -> bool:
        try:
            data = (path / "adapter_model.safetensors").read_bytes()
            json.loads((path / "adapter_config.json").read_text())
        except (OSError, ValueError):
            return False
        return hashlib.sha256(data).hexdigest() == self.sha256

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str], name: str, version: int) -> AdapterVersion:
        path = Path(path)
        try:
            data = (path / "adapter_model.safetensors").read_bytes()
            config = json.loads((path / "adapter_config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise AdapterError(f"cannot read adapter at {path}: {e}") from e
        return cls(name, version, hashlib.sha256(data).hexdigest(), data, config)


@dataclass(frozen=True)
class AdapterRef:
    """An adapter version by reference: what the pool, the driver and checkpoints hold. Its bytes
    live once in an `AdapterStore` directory (`uri`, addressed by sha256) that every node can read;
    a rollout worker fetches them itself (`load`). No bytes here: a few hundred bytes per version."""

    name: str
    version: int
    sha256: str
    size: int  # bytes of adapter_model.safetensors
    uri: str  # the store directory holding adapter_model.safetensors and adapter_config.json
    config: dict[str, Any] = field(repr=False)
    probe: Probe | None = field(default=None, repr=False)

    @property
    def key(self) -> str:
        return f"{self.name}@v{self.version}"

    def load(self) -> AdapterVersion:
        """The version's bytes, read from the store and checked against the sha256 (AdapterError).

        The hash is computed once per node and file: the first reader on a node records the file's
        identity (inode, size, mtime) next to it after a successful check (`.verified-<host>`, under
        a lock), and a later reader of the same unchanged file on that node skips the hash. Eight
        workers on one node loading a 161 MB version then hash it once, not eight times. A file
        rewritten since (a new mtime or inode) is hashed again; the engine's fidelity probe still
        checks what it serves."""
        path = Path(self.uri)
        file = path / "adapter_model.safetensors"
        started = time.time_ns()
        try:
            before = _identity(file)
            data = file.read_bytes()
            read = _identity(file)
        except OSError as e:
            raise AdapterError(f"adapter {self.key}: cannot read its bytes at {path}: {e}") from e
        version = AdapterVersion(self.name, self.version, self.sha256, data, self.config, self.probe, origin=self.uri)
        if read != before or len(data) != read[1]:  # changed while read: check these bytes, record nothing
            version.check_sha()
            return version
        host = socket.gethostname()
        marker = path / f".verified-{host}"
        with _locked(path / f".verify-{host}.lock"):
            try:
                recorded = json.loads(marker.read_text())
            except (OSError, ValueError):
                recorded = None
            if recorded == {"sha256": self.sha256, "file": list(read)}:
                object.__setattr__(version, "_sha_checked", True)
                return version
            try:
                version.check_sha()
            except AdapterError:  # the record described other bytes: gone, whatever the file's stat says later
                with contextlib.suppress(OSError):
                    marker.unlink(missing_ok=True)
                raise
            # Recorded only for a file last written a clock tick or more before this read began: file
            # times come from the kernel's coarse clock, so a rewrite within the tick of the last
            # write could keep its mtime ("racily clean", as git calls it); any later rewrite cannot.
            if read[3] < started - _RACY_NS:
                with contextlib.suppress(OSError):  # a read-only store: every reader hashes
                    tmp = marker.with_name(f"{marker.name}.{os.getpid()}.tmp")
                    tmp.write_text(json.dumps({"sha256": self.sha256, "file": list(read)}))
                    os.replace(tmp, marker)
        return version

    def meta(self) -> dict[str, Any]:
        """JSON form (the store's files aside): what a checkpoint records per adapter."""
        return {"key": self.key, "name": self.name, "version": self.version, "sha256": self.sha256,
                "size": self.size, "config": self.config,
                "probe": None if self.probe is None else
                {"token_ids": list(self.probe.token_ids), "logprobs": list(self.probe.logprobs)}}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], uri: str | os.PathLike[str]) -> AdapterRef:
        probe = meta.get("probe")
        return cls(meta["name"], int(meta["version"]), meta["sha256"], int(meta["size"]), str(uri), meta["config"],
                   Probe(tuple(probe["token_ids"]), tuple(probe["logprobs"])) if probe else None)


_RACY_NS = 20_000_000  # 20 ms: two ticks of a 100 Hz kernel clock, the coarsest in use


def _identity(file: Path) -> tuple[int, int, int, int]:
    """What tells this file's bytes apart from a rewrite: device, size, inode and mtime. Not ctime:
    every hard link a worker makes to a store file changes its ctime, never its bytes."""
    st = file.stat()
    return st.st_dev, st.st_size, st.st_ino, st.st_mtime_ns


@contextlib.contextmanager
def _locked(lock: Path) -> Any:
    """An exclusive lock on `lock` (created), or no lock where the store is not writable."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class AdapterStore:
    """Adapter bytes on storage every process can read (the run dir; shared storage on a cluster),
    one directory per sha256: `<root>/<sha256>/adapter_model.safetensors` + `adapter_config.json`.
    Written once (atomically: temp dir, then rename); identical bytes are stored once, whatever
    their keys. `collect` deletes the directories nobody refers to any more."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path(self, sha256: str) -> Path:
        return self.root / sha256

    def put(self, version: AdapterVersion) -> AdapterRef:
        """Store `version`'s bytes (once per sha256) and return its reference."""
        version.check_sha()
        final = self.path(version.sha256)
        if not self._complete(final, len(version.data)):
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".tmp-"))
            (tmp / "adapter_model.safetensors").write_bytes(version.data)
            (tmp / "adapter_config.json").write_text(json.dumps(version.config, indent=1))
            if final.exists():  # a partial directory (a crashed writer before the rename cannot leave one)
                shutil.rmtree(final, ignore_errors=True)
            try:
                os.replace(tmp, final)
            except OSError:  # another writer of the same bytes won the race
                shutil.rmtree(tmp, ignore_errors=True)
                if not self._complete(final, len(version.data)):
                    raise
        return self.ref(version, final)

    @staticmethod
    def ref(version: AdapterVersion, uri: str | os.PathLike[str]) -> AdapterRef:
        return AdapterRef(version.name, version.version, version.sha256, len(version.data), str(uri), version.config,
                          version.probe)

    def adopt(self, ref: AdapterRef) -> AdapterRef:
        """`ref` with its bytes in this store (copied there, and checked, when they live elsewhere)."""
        final = self.path(ref.sha256)
        if not self._complete(final, ref.size):
            self.put(ref.load())
        return dataclasses.replace(ref, uri=str(final))

    def has(self, ref: AdapterRef) -> bool:
        return self._complete(self.path(ref.sha256), ref.size)

    @staticmethod
    def _complete(path: Path, size: int) -> bool:
        f = path / "adapter_model.safetensors"
        return f.is_file() and f.stat().st_size == size and (path / "adapter_config.json").is_file()

    def collect(self, keep: set[str]) -> list[str]:
        """Delete every stored sha256 not in `keep` (and debris of crashed writes); return the deleted."""
        gone = []
        if not self.root.is_dir():
            return gone
        for d in self.root.iterdir():
            if d.name.startswith(".tmp-") or (d.is_dir() and d.name not in keep):
                shutil.rmtree(d, ignore_errors=True)
                gone.append(d.name)
        return gone

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file()) if self.root.is_dir() else 0
