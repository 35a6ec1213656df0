"""The data path by reference (issue 14), on the real stack (Ray, vLLM, DeepSpeed) with the tiny
model: the driver sees adapter versions as metadata only (AdapterRef: key, version, sha256, size,
store path) and rollouts as summaries without token columns. Every value the driver process gets
from `ray.get` is inspected, and reading an adapter's bytes on the driver fails the test; two
workers sync each version at once; the run dir's adapter store holds each version's bytes once; each
of the two learner ranks resolves only the trajectory batches it is dealt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from support import tiny_overrides

pytestmark = pytest.mark.slow


def _walk(value: Any, seen: list[str]) -> None:
    from actors.adapters import AdapterVersion

    if isinstance(value, AdapterVersion):
        seen.append(f"adapter bytes of {value.key}")
    elif isinstance(value, bytes | bytearray) and len(value) > 4096:
        seen.append(f"{len(value)} raw bytes")
    elif isinstance(value, pa.Table | pa.RecordBatch):
        tokens = [n for n in ("token_ids", "logprobs", "token_round") if n in value.schema.names]
        if tokens:
            seen.append(f"token columns {tokens}")
    elif isinstance(value, dict):
        for v in value.values():
            _walk(v, seen)
    elif isinstance(value, list | tuple):
        for v in value:
            _walk(v, seen)


@pytest.fixture
def ray_local() -> Any:
    """This test's own local Ray, shut down after it (the tests after it start theirs)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_driver_sees_metadata_only(ray_local: Any, tiny_model_dir: Path, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from actors.adapters import AdapterRef
    from reciprocity import checkpoint, train
    from reciprocity.config import load_config

    seen: list[str] = []
    gets = {"n": 0}
    real_get = ray.get

    def get(refs: Any, *args: Any, **kwargs: Any) -> Any:
        out = real_get(refs, *args, **kwargs)
        gets["n"] += 1
        _walk(out, seen)
        return out

    def no_read(self: AdapterRef) -> Any:
        raise AssertionError(f"the driver read the bytes of {self.key}")

    monkeypatch.setattr(ray, "get", get)
    monkeypatch.setattr(AdapterRef, "load", no_read)
    overrides = [*tiny_overrides(tiny_model_dir, tmp_path, "by-ref"), "iterations=3", "rollout.workers=2",
                 "rollout.cpus_per_worker=0.5", "learner.cpus_per_rank=0.5", "learner.ranks=2",
                 "buffer.resident_max=1", "checkpoint.every=1", "checkpoint.keep=2"]
    history = train.run(load_config(Path("configs/smoke.yaml"), overrides))
    assert [h["version"] for h in history] == [1, 2, 3] and gets["n"] > 20
    assert not seen, f"the driver got {sorted(set(seen))}"
    # two learner ranks: rank 0 resolved only the batches it was dealt, not every worker's
    for h in history:
        assert h["learner/batches"] >= 2 and 1 <= h["learner/batches_fetched"] < h["learner/batches"], h

    run_dir = tmp_path / "runs" / "by-ref"
    state, refs = checkpoint.load_pool(checkpoint.latest(run_dir), verify=False)
    assert all(isinstance(r, AdapterRef) for r in refs.values()) and len(state["snapshots"]) == 3
    stored = sorted(p.name for p in checkpoint.adapter_store(run_dir).iterdir())
    kept = checkpoint.referenced_blobs(run_dir)  # v1..v3 snapshots (+ v0 of no checkpoint: collected)
    assert set(stored) == kept | {r.sha256 for r in refs.values()}
    assert not list((run_dir / "checkpoints").glob("*/adapters/*"))  # no bytes inside checkpoints
