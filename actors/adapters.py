"""Adapter versions: the unit the learner publishes and the engines serve.

A version is immutable: a name, an integer version, the sha256 of its safetensors bytes, the
bytes themselves, the PEFT ``adapter_config.json`` as a dict, and a fidelity probe (token ids and
the learner's log-probs of them) that an engine re-computes after loading to prove it serves
exactly these weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
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

    @property
    def key(self) -> str:
        """Unique served name of this version (a new name per version: see sysdesign)."""
        return f"{self.name}@v{self.version}"

    def check_sha(self) -> None:
        got = hashlib.sha256(self.data).hexdigest()
        if got != self.sha256:
            raise AdapterError(
                f"adapter {self.key}: sha256 mismatch (corrupted bytes): {got[:12]} != {self.sha256[:12]}"
            )

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
        (tmp / "adapter_model.safetensors").write_bytes(self.data)
        (tmp / "adapter_config.json").write_text(json.dumps(self.config, indent=1))
        try:
            os.replace(tmp, final)
        except OSError:  # another writer of the same version won the race
            shutil.rmtree(tmp, ignore_errors=True)
            if not self._matches(final):
                raise
        return final

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
