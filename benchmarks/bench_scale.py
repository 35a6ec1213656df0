"""The paper-size rehearsal on CPU (issue 14): adapters shaped like Qwen2.5-7B with a rank-32 LoRA on
every linear layer (real safetensors, that model's module names and shapes, random bf16 values,
about 161 MB each), snapshot events through the real `OpponentPool` actor, 1 / 4 / 8 actors of the
real `RolloutWorker` class whose engine stores each version on disk (`DiskEngine`: a 7B adapter
cannot load into SmolLM2) and plays IPD with canned answers, and the real driver code of
`reciprocity.train.Trainer` for publish (`publish`, `_sync_adapters`, `_collect_adapters`), rollout
and gather. The learner is a Ray task that writes each version into the run's adapter store, as
rank 0's `export(version, store)` does.

Prints one JSON object:
- adapter_bytes_deserialized_by_driver_per_iteration: adapter bytes in every value the driver's
  `ray.get` returned, plus any `AdapterRef.load` on the driver (target 0);
- token_column_bytes_to_driver_per_iteration: bytes of token columns in those values (target 0),
  next to token_column_bytes_to_learner_per_iteration (what a learner task fetched from the refs);
- pool_rss_ratio_300_over_28: the pool actor's RSS after N snapshots over after 28 (target <= 1.2);
- checkpoint_bytes_over_unique_snapshot_bytes: checkpoints kept (keep 3: their files plus the store
  directories they refer to) over the bytes of the unique snapshots they refer to (target <= 1.05),
  and the same figure for the format before issue 14 (every checkpoint held its adapters' bytes);
- publish_seconds_8_over_1 (target <= 2) with, per worker count, the publish seconds (the learner's
  export of 161 MB into the store included), without the export (every worker reads, checks and
  stores the version at once) and a no-op sync (the metadata round trip);
- driver_rss_growth_per_iteration_bytes (for the record).

The snapshot events can use a smaller adapter (`--snapshot-layers`, 28 = full size) to fit the
disk: the pool holds references only, so its RSS does not depend on the adapter size; the bytes of
the checkpoint figure scale with it. The JSON says what was used.

Usage: python benchmarks/bench_scale.py [--snapshots 300] [--snapshot-layers 2] [--workers 1 4 8]
       [--publishes 3] [--games 16]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

# Qwen2.5-7B: hidden 3584, intermediate 18944, 28 layers, 28 query heads, 4 key/value heads of 128
HIDDEN, INTER, LAYERS, KV = 3584, 18944, 28, 512
RANK = 32
MODULES = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, KV), "self_attn.v_proj": (HIDDEN, KV),
           "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (HIDDEN, INTER), "mlp.up_proj": (HIDDEN, INTER),
           "mlp.down_proj": (INTER, HIDDEN)}
_TEMPLATE: dict[int, bytes] = {}


def lora_params(layers: int) -> int:
    return layers * sum(RANK * (n_in + n_out) for n_in, n_out in MODULES.values())


def qwen_lora_bytes(layers: int, version: int) -> bytes:
    """Safetensors bytes of a Qwen2.5-7B r32 all-linear LoRA (the first `layers` layers), random
    bf16 values; versions differ in their first tensor's leading bytes (one template per process)."""
    import numpy as np

    if layers not in _TEMPLATE:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset, shapes = 0, []
        for layer in range(layers):
            for module, (n_in, n_out) in MODULES.items():
                for ab, shape in (("lora_A", [RANK, n_in]), ("lora_B", [n_out, RANK])):
                    size = 2 * shape[0] * shape[1]
                    name = f"base_model.model.model.layers.{layer}.{module}.{ab}.weight"
                    header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
                    offset += size
                    shapes.append(size)
        head = json.dumps(header).encode()
        head += b" " * (-len(head) % 8)
        body = (np.random.default_rng(0).standard_normal(offset // 2, dtype=np.float32) * 0.01).view(np.uint32)
        _TEMPLATE[layers] = struct.pack("<Q", len(head)) + head + (body >> 16).astype(np.uint16).tobytes()
    data = bytearray(_TEMPLATE[layers])
    start = 8 + struct.unpack("<Q", data[:8])[0]
    data[start:start + 8:2] = struct.pack("<I", version)  # the low (mantissa) bytes of 4 bf16 values
    data[start + 1:start + 8:2] = b"\x3c\x3c\x3c\x3c"  # their high bytes: small finite values
    return bytes(data)


def export(version: int, layers: int, store: str) -> Any:
    """The learner's side: build version `version` and write it into the store once; return its ref."""
    from actors.adapters import AdapterStore, AdapterVersion, Probe

    data = qwen_lora_bytes(layers, version)
    config = {"r": RANK, "lora_alpha": 2 * RANK, "target_modules": sorted({m.split(".")[-1] for m in MODULES}),
              "base_model_name_or_path": "Qwen/Qwen2.5-7B-Instruct", "peft_type": "LORA"}
    v = AdapterVersion("learner", version, hashlib.sha256(data).hexdigest(), data, config,
                       Probe((1, 2, 3), (-0.5, -0.5)))
    return AdapterStore(store).put(v)


class DiskEngine:
    """A RolloutWorker engine that stores each version on disk (its own directory, as the vLLM engine
    writes one per version) after parsing its safetensors header, instead of loading it into vLLM;
    `generate` answers with canned valid actions and counts the tokens."""

    def __init__(self, config: dict[str, Any]) -> None:
        from actors.chat import ChatTemplate

        self.template = ChatTemplate.from_pretrained(config["model"])
        self.root = Path(config["engine"]["adapter_root"])
        self.paths: dict[str, Path] = {}
        self.probe_error: dict[str, float] = {}

    async def generate(self, prompt_token_ids: list[int], sampling: Any, adapter: str | None) -> Any:
        from actors.engine import Generation, UnknownAdapterError

        if adapter is not None and adapter not in self.paths:
            raise UnknownAdapterError(adapter)
        text = next((t for t in ("C", "D", "A", "B", "1", "0") if sampling.regex and re.fullmatch(sampling.regex, t)),
                    "C")
        ids = self.template.encode(text) + [self.template.tokenizer.eos_token_id]
        return Generation(ids, [-0.25] * len(ids), text, adapter, "stop")

    async def load_adapter(self, version: Any) -> str:
        import asyncio

        from actors.adapter_checks import read_safetensors_header

        read_safetensors_header(version.data, version.key)
        self.paths[version.key] = await asyncio.to_thread(version.write, self.root)
        self.probe_error[version.key] = 0.0
        return version.key

    async def unload_adapter(self, key: str) -> None:
        path = self.paths.pop(key, None)
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)
        self.probe_error.pop(key, None)


def disk_engine(config: dict[str, Any]) -> DiskEngine:
    return DiskEngine(config)


def token_bytes(refs: list[Any]) -> int:
    """The learner's side of a rollout: fetch the batches and count their token-column bytes."""
    import ray

    return sum(b.column(n).nbytes for b in ray.get(refs) for n in ("token_ids", "logprobs", "token_round"))


def pid_rss(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


class Watch:
    """Everything the driver's ray.get returns: adapter bytes and token-column bytes in it."""

    def __init__(self) -> None:
        self.adapter_bytes = self.token_bytes = 0

    def walk(self, value: Any) -> None:
        import pyarrow as pa

        from actors.adapters import AdapterVersion

        if isinstance(value, AdapterVersion):
            self.adapter_bytes += len(value.data)
        elif isinstance(value, pa.Table | pa.RecordBatch):
            self.token_bytes += sum(value.column(n).nbytes for n in ("token_ids", "logprobs", "token_round")
                                    if n in value.schema.names)
        elif isinstance(value, dict):
            for v in value.values():
                self.walk(v)
        elif isinstance(value, list | tuple):
            for v in value:
                self.walk(v)


def driver(run_dir: Path, workers: int, pool: Any, cfg: Any) -> Any:
    """A Trainer with the real publish/sync/rollout/gather code and bench stand-ins for the learner."""
    from actors.adapters import AdapterStore
    from actors.worker import RolloutWorker
    from actors.worker_group import WorkerGroup
    from learner.learner_group import LearnerGroup
    from reciprocity import checkpoint, launcher, progress, train

    t = train.Trainer.__new__(train.Trainer)
    t.cfg, t.run_dir, t.pool, t.view = cfg, run_dir, pool, progress.Silent()
    t.store = AdapterStore(checkpoint.adapter_store(run_dir))
    t.version = t.iteration = 0
    t._previous, t.learners = None, LearnerGroup()  # no ranks: `_export` is the bench's own
    t.workers = WorkerGroup.start(launcher.actor_class(RolloutWorker), [{"num_cpus": 0}] * workers, [{
        "model": str(ROOT / "models" / "smollm2-135m-instruct"), "engine_factory": "bench_scale:disk_engine",
        "engine": {"adapter_root": str(run_dir / "served-adapters" / f"worker-{i}")}, "adapter_source": pool,
        "check_template": False, "concurrency": 64} for i in range(workers)], max_restarts=0)
    t.log_adapter = lambda version: None  # MLflow is not part of this rehearsal
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--snapshots", type=int, default=300)
    ap.add_argument("--snapshot-layers", type=int, default=2, help="layers of the snapshot-event adapters (28: full)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--publishes", type=int, default=3, help="timed publishes per worker count")
    ap.add_argument("--games", type=int, default=16)
    args = ap.parse_args()
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT), os.environ.get("PYTHONPATH", "")])

    import psutil
    import ray

    from actors.adapters import AdapterRef
    from actors.pool import OpponentPool
    from reciprocity import checkpoint, launcher, train
    from reciprocity.config import load_config

    launcher.init_ray(None)
    export_task = ray.remote(num_cpus=0)(export)
    fetch_task = ray.remote(num_cpus=0)(token_bytes)
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    out: dict[str, Any] = {"adapter": "Qwen2.5-7B r32 all-linear, bf16, random values",
                           "adapter_params": lora_params(LAYERS), "adapter_tensor_bytes": 2 * lora_params(LAYERS)}
    watch = Watch()
    real_get = ray.get

    def get(refs: Any, *a: Any, **kw: Any) -> Any:
        value = real_get(refs, *a, **kw)
        watch.walk(value)
        return value

    def no_read(self: AdapterRef) -> Any:
        raise AssertionError(f"the driver read the bytes of {self.key}")

    ray.get, AdapterRef.load = get, no_read  # the driver's view only (the actors are other processes)
    try:
        cfg = load_config(None, ["game.name=ipd", "game.options={n_rounds: 3}",
                                 f"rollout.games_per_iteration={args.games}", "rollout.concurrency=64",
                                 "rollout.seed_group_size=1"])
        # -- publish to 1 / 4 / 8 workers, 161 MB versions; rollout and gather; driver RSS ---------------
        publish: dict[str, Any] = {}
        me = psutil.Process()
        rss_growth: list[float] = []
        iterations = 0
        for n in args.workers:
            run_dir = tmp / f"workers-{n}"
            pool = launcher.actor_class(OpponentPool).options(num_cpus=0).remote(snapshot_every=10**6, max_resident=28,
                                                                                 seed=0)
            t = driver(run_dir, n, pool, cfg)
            exports: list[float] = []

            def timed_export(v: int, _t: Any = t, _e: list[float] = exports) -> Any:
                t0 = time.perf_counter()
                ref = real_get(export_task.remote(v, LAYERS, str(_t.store.root)))
                _e.append(time.perf_counter() - t0)
                return ref

            t._export = timed_export
            ray.get(pool.set_current.remote(t._export(0), 0))
            t._sync_adapters()
            pubs, syncs = [], []
            for _ in range(args.publishes + 1):
                rss0 = me.memory_info().rss
                specs = train.plan_specs(cfg, "bench", t.iteration, pool)
                shares, _ = t._finish_rollout(t._start_rollout(specs))
                t._gather(shares, specs)
                out.setdefault("token_column_bytes_to_learner_per_iteration",
                               real_get(fetch_task.remote([r for r, _ in shares])))
                t0 = time.perf_counter()
                t.publish()
                pubs.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                t._sync_adapters()  # already in sync: the metadata round trip alone
                syncs.append(time.perf_counter() - t0)
                rss_growth.append(me.memory_info().rss - rss0)
                iterations += 1
            loads = [p - e for p, e in zip(pubs, exports[1:], strict=True)]  # exports[0]: version 0
            publish[str(n)] = {"publish_s_median": statistics.median(pubs[1:]), "publish_s": pubs[1:],
                               "export_s_median": statistics.median(exports[2:]),
                               "publish_minus_export_s_median": statistics.median(loads[1:]),
                               "noop_sync_s_median": statistics.median(syncs[1:])}
            for w in t.workers:
                ray.kill(w)
            ray.kill(pool)
            shutil.rmtree(run_dir, ignore_errors=True)
        out["publish"] = publish
        if "1" in publish and "8" in publish:
            out["publish_seconds_8_over_1"] = publish["8"]["publish_s_median"] / publish["1"]["publish_s_median"]
            out["publish_minus_export_seconds_8_over_1"] = (publish["8"]["publish_minus_export_s_median"]
                                                            / publish["1"]["publish_minus_export_s_median"])
        out["adapter_bytes_deserialized_by_driver_per_iteration"] = watch.adapter_bytes / iterations
        out["token_column_bytes_to_driver_per_iteration"] = watch.token_bytes / iterations
        out["driver_rss_growth_per_iteration_bytes"] = statistics.median(rss_growth[1:])

        # -- snapshot events: pool RSS and checkpoints with keep 3 ----------------------------------------
        run_dir = tmp / "snapshots"
        pool = launcher.actor_class(OpponentPool).options(num_cpus=0).remote(snapshot_every=1, max_resident=28, seed=0)
        t = driver(run_dir, 0, pool, cfg)
        pool_pid = int(launcher.node_of(pool)["pid"])
        rss: dict[int, int] = {}
        keep = 3
        t0 = time.perf_counter()
        for v in range(1, args.snapshots + 1):
            ref = real_get(export_task.remote(v, args.snapshot_layers, str(t.store.root)))
            ray.get(pool.set_current.remote(ref, v))
            if v % 10 == 0 or v == args.snapshots:
                ck = checkpoint.begin(run_dir, v)
                checkpoint.save_pool(ck, ray.get(pool.state_dict.remote()), ray.get(pool.adapters.remote()))
                checkpoint.commit(ck, checkpoint.State(v, v, "bench", cfg.fingerprint(), {}), cfg, keep)
                t._previous = None
                t._collect_adapters()
            if v in (28, args.snapshots):
                rss[v] = pid_rss(pool_pid)
        out["snapshot_events"] = args.snapshots
        out["snapshot_event_seconds"] = time.perf_counter() - t0
        out["snapshot_adapter_tensor_bytes"] = 2 * lora_params(args.snapshot_layers)
        out["snapshot_adapter_layers"] = args.snapshot_layers
        out["pool_rss_bytes"] = {str(k): v for k, v in rss.items()}
        out["pool_rss_ratio_300_over_28"] = rss[args.snapshots] / rss[28] if 28 in rss else None
        root = checkpoint.checkpoints_dir(run_dir)
        kept = sorted(p for p in root.glob("it-*"))
        ck_files = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        metas = [json.loads((c / checkpoint.ADAPTERS).read_text()) for c in kept]
        unique = {m["sha256"]: m["size"] for ms in metas for m in ms}
        store_bytes = sum(f.stat().st_size for sha in unique for f in t.store.path(sha).iterdir())
        out["checkpoints_kept"] = len(kept)
        out["unique_adapters_referenced"] = len(unique)  # every snapshot event a distinct version
        out["checkpoint_bytes_on_disk"] = ck_files + store_bytes
        out["unique_snapshot_bytes"] = sum(unique.values())
        out["checkpoint_bytes_over_unique_snapshot_bytes"] = (ck_files + store_bytes) / sum(unique.values())
        out["before_issue_14_checkpoint_bytes_over_unique"] = sum(m["size"] for ms in metas for m in ms) / sum(
            unique.values())
        out["store_bytes_total"] = t.store.nbytes()
        ray.kill(pool)
    finally:
        ray.get = real_get
        shutil.rmtree(tmp, ignore_errors=True)
        ray.shutdown()
    out["machine"] = (f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end; "
                      "workers and the pool on one node")
    print(json.dumps(out))  # one line: `make bench` saves the last line


if __name__ == "__main__":
    main()
