"""The Learner: one DeepSpeed rank over a PEFT LoRA model, one optimizer step per iteration.

A plain class (the driver wraps it with ``ray.remote``). Life cycle:

    learners = [Learner(config, rank=r, world_size=W) for r in range(W)]     # cheap
    address = learners[0].master_address()                                   # "host:free_port"
    for l in learners: l.setup(address)          # concurrently on all ranks (rendezvous)
    for it in ...:
        metrics = [l.train_step(batches) for l in learners]                  # concurrently
        version = [l.export() for l in learners][0]                          # rank 0 returns it

With world_size 1, ``setup`` runs by itself on first use (local address, free port).

Per iteration (method spec, section 4.7): every rank reads the whole iteration batch (credits and
N_tok need all rows), takes its share of the trainable rows as length-bucketed micro-batches
(learner.batch), runs forward/backward on each (gradients accumulate; the loss of each micro-batch
is already divided by the iteration's N_tok), then ONE optimizer step with global grad-norm
clipping. DeepSpeed averages gradients over ranks, so each rank's loss is multiplied by
world_size: the update is that of the full-batch loss.

DeepSpeed setup: only the LoRA parameters are given to DeepSpeed; AdamW (``torch_adam`` on CPU),
constant lr, ``gradient_clipping`` 1.0, ``managed_gradient_accumulation: false`` (the caller owns
the boundary: backward() accumulates, step() reduces and updates), ZeRO stage 0-3 from the config,
gloo on CPU and NCCL on GPU. dtype "auto" (default) picks bfloat16 where the device computes it
natively (GPU, CPU with AVX512-BF16/AMX) and float32 elsewhere. With bfloat16 the base weights are
bf16; with ZeRO >= 1 the LoRA weights are bf16 too, with DeepSpeed's fp32 master weights and fp32
gradient accumulation; with ZeRO 0 (which cannot accumulate bf16 gradients in fp32) they stay fp32.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from actors import allocator
from actors.adapters import AdapterRef, AdapterStore, AdapterVersion, Probe
from actors.device import cpu_has_bf16, node_cores
from learner.batch import BatchError, CreditSpec, IterationBatch, MicroBatch, build_iteration, build_rank_iteration
from learner.constrain import Constrainer
from learner.credit import CREDIT_METHODS
from learner.export import (
    adapter_config,
    load_adapter_weights,
    lora_parameters,
    lora_state_dict,
    make_adapter_version,
    probe_logprobs,
    probe_token_ids,
)
from learner.loss import STAT_SUMS, LossCoefs, micro_batch_loss

DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
          "fp32": torch.float32}
LOSS_PARTS = ("loss", "loss_pg", "loss_entropy", "loss_kl")  # already divided by N_tok per micro-batch


@dataclass
class LearnerConfig:
    """What one learner rank needs. The fields a run config sets have no default here: the driver
    builds this straight from the run config (`reciprocity.learner_settings.learner_config`), whose defaults are
    the only ones; the rest are fixed choices of this learner."""

    model_dir: str  # the served base model (HF directory)
    name: str  # adapter name of the exported versions
    lora_r: int
    lora_alpha: float
    lora_target_modules: str | list[str]
    lr: float
    grad_clip: float
    zero_stage: int
    dtype: str  # auto | bfloat16 (bf16) | float32 (fp32): auto = bf16 where the device computes it natively
    micro_batch_tokens: int  # padded tokens (rows x longest row) per forward/backward
    guided_logprob: str  # constrained | full: see learner.batch.build_iteration
    # share of the decoder layers that recompute their activations in the backward pass (0: none,
    # 1: all; `checkpoint_layers`)
    gradient_checkpointing: float
    credit_method: str
    discount: float
    reward_normaliser: float
    aa_beta: float
    aa_gamma: float
    entropy_coef: float
    kl_coef: float
    seed: int
    # torch intra-op threads: a count, "node" (this node's cores shared among the ranks) or None (leave as is)
    num_threads: int | str | None = None
    # glibc's mmap threshold in bytes, fixed for this process (None: glibc's sliding default); see
    # `set_mmap_threshold`
    mmap_threshold: int | None = None
    lora_dropout: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    micro_batch_overhead_tokens: int = 256  # price of one more pass, in tokens (padding vs passes)
    extra_deepspeed: dict[str, Any] = field(default_factory=dict)  # merged into the DeepSpeed config

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0..3, got {self.zero_stage}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.credit_method not in CREDIT_METHODS:
            raise ValueError(f"credit_method must be one of {CREDIT_METHODS}, got {self.credit_method!r}")
        self.adam_betas = (float(self.adam_betas[0]), float(self.adam_betas[1]))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LearnerConfig:
        """From the fields of this class (`dataclasses.asdict` of one); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown learner config key(s) {unknown}; valid: {sorted(known)}")
        return cls(**d)

    @property
    def credit(self) -> CreditSpec:
        return CreditSpec(self.credit_method, self.discount, self.reward_normaliser, self.aa_beta, self.aa_gamma)


class TargetLogits(torch.nn.Module):
    """Logits only where a target is predicted: decoder -> hidden [B, L, H] -> rows logit_pos -> lm_head.

    Prompt positions never reach the [*, vocab] projection (most tokens of a chat are prompt)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logit_pos: torch.Tensor) -> torch.Tensor:
        base = self.model.get_base_model()
        out = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, logit_pos)
        return base.get_output_embeddings()(h).float()


class Learner:
    def __init__(
        self,
        config: LearnerConfig | dict[str, Any],
        rank: int = 0,
        world_size: int = 1,
        local_rank: int | None = None,
        master: str | None = None,
    ) -> None:
        self.config = config if isinstance(config, LearnerConfig) else LearnerConfig.from_dict(config)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.rank, self.world_size = rank, world_size
        self.local_rank = local_rank
        self.version = 0  # version of the current adapter (0 = the initial zero adapter)
        self.micro_progress = (0, 0)  # micro-batches done, of, in the running (or last) train_step
        self.engine: Any = None
        self._master: str | None = master  # rank 0's "host:port" (ranks > 0), else master_address()
        self._clip_norm: float | None = None

    # ------------------------------------------------------------------ distributed setup

    def master_address(self) -> str:
        """(rank 0) 'host:port' with a free port for the other ranks' rendezvous."""
        host = "127.0.0.1"
        try:
            import ray

            if ray.is_initialized():
                host = ray.util.get_node_ip_address()
        except ImportError:
            pass
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            self._master = f"{host}:{s.getsockname()[1]}"
        return self._master

    def setup(self, master_address: str | None = None, adapter: AdapterVersion | None = None) -> None:
        """Join the process group, load base model + LoRA, build the DeepSpeed engine.

        All ranks must call it concurrently with rank 0's ``master_address()``. ``adapter``
        initialises the LoRA weights (e.g. a published version) before the optimizer is built."""
        if self.engine is not None:
            return
        import deepspeed
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cfg = self.config
        if cfg.mmap_threshold is not None:
            set_mmap_threshold(cfg.mmap_threshold)
        if cfg.num_threads:
            torch.set_num_threads(node_cores(self.world_size) if cfg.num_threads == "node" else int(cfg.num_threads))
        master = master_address or self._master or (self.master_address() if self.world_size == 1 else None)
        if master is None:
            raise RuntimeError("world_size > 1: call setup(rank0.master_address()) on every rank")
        host, port = master.rsplit(":", 1)
        cuda = torch.cuda.is_available()
        local = self.local_rank
        if local is None:  # under Ray each rank sees its own GPU as device 0
            local = self.rank % torch.cuda.device_count() if cuda else 0
        os.environ.update(
            RANK=str(self.rank), LOCAL_RANK=str(local), WORLD_SIZE=str(self.world_size),
            MASTER_ADDR=host, MASTER_PORT=port,
        )
        if cuda:
            torch.cuda.set_device(local)
        self.device = torch.device(f"cuda:{local}" if cuda else "cpu")
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")

        dtype = resolve_dtype(cfg.dtype)
        self.dtype = dtype
        ds_bf16 = dtype == torch.bfloat16 and cfg.zero_stage >= 1
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model_dir)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.tokenizer.eos_token_id)
        model = AutoModelForCausalLM.from_pretrained(cfg.model_dir, dtype=dtype, attn_implementation="sdpa")
        model.config.use_cache = False
        self.checkpointed_layers = checkpoint_layers(model, cfg.gradient_checkpointing)
        torch.manual_seed(cfg.seed)  # same LoRA init on every rank
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            target_modules=cfg.lora_target_modules,
            lora_dropout=cfg.lora_dropout,
            bias="none",
            task_type="CAUSAL_LM",
        )
        self.model = get_peft_model(model, lora, autocast_adapter_dtype=not ds_bf16)
        if adapter is not None:
            adapter.check_sha()
            load_adapter_weights(self.model, adapter.data)
            self.version = adapter.version
        self.model.to(self.device).train()

        ds_config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "managed_gradient_accumulation": False,
            "gradient_clipping": cfg.grad_clip,
            "zero_optimization": {"stage": cfg.zero_stage},
            "bf16": {"enabled": ds_bf16},
            "optimizer": {
                "type": "AdamW",
                "params": {
                    "lr": cfg.lr,
                    "betas": list(cfg.adam_betas),
                    "eps": cfg.adam_eps,
                    "weight_decay": cfg.weight_decay,
                    "torch_adam": not cuda,
                },
            },
            "steps_per_print": 2**62,
            "wall_clock_breakdown": False,
        }
        if ds_bf16:
            ds_config["data_types"] = {"grad_accum_dtype": "fp32"}
        ds_config.update(cfg.extra_deepspeed)
        self.zero3 = cfg.zero_stage == 3
        self.engine, _, _, _ = deepspeed.initialize(
            model=TargetLogits(self.model), model_parameters=lora_parameters(self.model), config=ds_config
        )
        if not (ds_bf16 or cfg.zero_stage):  # plain fp32 path: record the norm DeepSpeed computes
            from deepspeed.runtime.utils import clip_grad_norm_

            def clip_and_record() -> None:
                norm = clip_grad_norm_(self.engine.module.parameters(), max_norm=self.engine.gradient_clipping())
                self._clip_norm = float(norm)

            self.engine.clip_fp32_gradients = clip_and_record
        self.constrainer = Constrainer.from_model_dir(cfg.model_dir, self.tokenizer)
        self.probe_ids = probe_token_ids(self.tokenizer)

    def ready(self) -> bool:
        """Set up (rendezvous included) with the master address given at construction or chosen by
        this rank's ``master_address()``; call on every rank concurrently."""
        self.setup()
        return True

    def _ensure_setup(self) -> None:
        if self.engine is None:
            if self.world_size > 1:
                raise RuntimeError("world_size > 1: call setup(rank0.master_address()) on every rank first")
            self.setup()

    # ------------------------------------------------------------------ training

    def train_step(self, batches: Sequence[Any] | Any, summaries: Sequence[pa.RecordBatch] | None = None
                   ) -> dict[str, float]:
        """One iteration: Arrow tables/record batches (or Ray refs to them) -> one optimizer step.
        With `summaries` (one per batch, `actors.trajectories.summary`) and more than one rank, this
        rank resolves only the batches it is dealt (`learner.batch.build_rank_iteration`).

        Returns metrics (identical on every rank): loss parts, mean |logp - logp_engine|, importance
        weight clip fraction and mean, entropy, KL, grad norm, token counts, padding fraction and
        seconds per phase."""
        self._ensure_setup()
        cfg = self.config
        t0 = time.perf_counter()
        plan = dict(max_tokens=cfg.micro_batch_tokens, overhead_tokens=cfg.micro_batch_overhead_tokens,
                    rank=self.rank, world_size=self.world_size, constrainer=self.constrainer, pad_id=self.pad_id,
                    guided_logprob=cfg.guided_logprob)
        if summaries is not None and self.world_size > 1:
            items = list(batches) if isinstance(batches, list | tuple) else [batches]
            if len(items) != len(summaries):
                raise BatchError(f"{len(items)} batches but {len(summaries)} summaries")
            fetched: list[int] = []

            def fetch(idx: list[int]) -> list[pa.Table | pa.RecordBatch]:
                fetched.extend(idx)
                return _as_tables([items[i] for i in idx])

            it = build_rank_iteration(summaries, fetch, cfg.credit, **plan)
            shard = {"batches": float(len(items)), "batches_fetched": float(len(fetched))}  # this rank's
        else:
            it = build_iteration(_as_tables(batches), cfg.credit, **plan)
            shard = {}
        t1 = time.perf_counter()
        metrics: dict[str, float] = {"version": float(self.version), **shard}
        if it.n_tok == 0:
            metrics.update(skipped=1.0, tokens=0.0, time_to_tensors_s=t1 - t0)
            return metrics

        sums = dict.fromkeys(STAT_SUMS, 0.0)
        staleness = 0
        coefs = LossCoefs(cfg.entropy_coef, cfg.kl_coef)
        self.micro_progress = (0, it.n_micro)
        released = 0.0
        for done, mb in enumerate(it.micro_batches, 1):
            mb = mb.to(self.device)
            loss, stats = micro_batch_loss(mb, it.n_tok, coefs, self._logits, self.model.disable_adapter)
            self.engine.backward(loss * self.world_size)  # DeepSpeed averages over ranks
            for k, v in stats.items():
                sums[k] += v
            if mb.n_targets:
                staleness = max(staleness, self.version - int(mb.token_version.min()))
            self.micro_progress = (done, it.n_micro)
            released += self._give_back()  # the micro-batch's activations, before the next one's
        t2 = time.perf_counter()
        self.engine.step()
        t3 = time.perf_counter()
        self.version += 1

        sums, staleness = self._all_reduce(sums, staleness)
        if it.local_tok is not None:  # this rank's share of the batch figures: summed over ranks
            it = self._all_reduce_batch_figures(it)
        n = max(sums["tokens"], 1.0)
        metrics.update({k: sums[k] for k in LOSS_PARTS})
        metrics.update(
            logp_abs_diff=sums["abs_logp_diff"] / n,
            iw_clip_frac=sums["iw_clipped"] / n,
            iw_mean=sums["iw"] / n,
            entropy=sums["entropy"] / n,
            kl=sums["kl"] / n,
            grad_norm=self._grad_norm(),
            tokens=float(it.n_tok),
            tokens_total=float(it.real_tokens),
            guided_tokens=float(it.n_guided_tokens),
            rows=float(it.n_rows),
            micro_batches=float(it.n_micro),
            padding_frac=it.padding_fraction,
            credit_mean=it.credit_mean,
            credit_abs_mean=it.credit_abs_mean,
            staleness_max=float(staleness),
            constraint_mismatch=float(self.constrainer.n_rejected + self.constrainer.n_after_stop),
            time_to_tensors_s=t1 - t0,
            time_forward_backward_s=t2 - t1,
            time_step_s=t3 - t2,
            tokens_per_s=it.real_tokens / max(t3 - t0, 1e-9),
        )
        released += self._give_back()
        if allocator.loaded() == "jemalloc":
            metrics["time_release_s"] = released
        return metrics

    @staticmethod
    def _give_back() -> float:
        """On jemalloc (purging off: actors/allocator.py) the rank's free pages back to the kernel, so
        that its memory stays one micro-batch's; the seconds it took. Nothing on glibc."""
        t = time.perf_counter()
        return time.perf_counter() - t if allocator.release_free_memory() else 0.0

    def progress(self) -> dict[str, int]:
        """Micro-batches done in the running train_step: the driver calls it while train_step runs
        (the actor's `progress` concurrency group, reciprocity.launcher)."""
        return {"micro_batches_done": self.micro_progress[0], "micro_batches": self.micro_progress[1]}

    def _logits(self, mb: MicroBatch) -> torch.Tensor:
        return self.engine(input_ids=mb.input_ids, attention_mask=mb.attention_mask, logit_pos=mb.logit_pos)

    def _all_reduce(self, sums: dict[str, float], staleness: int) -> tuple[dict[str, float], int]:
        if self.world_size == 1:
            return sums, staleness
        import torch.distributed as dist

        t = torch.tensor([sums[k] for k in STAT_SUMS], dtype=torch.float64)
        s = torch.tensor([staleness], dtype=torch.int64)
        if self.device.type == "cuda":
            t, s = t.to(self.device), s.to(self.device)
        dist.all_reduce(t)
        dist.all_reduce(s, op=dist.ReduceOp.MAX)
        return dict(zip(STAT_SUMS, t.cpu().tolist(), strict=True)), int(s.item())

    def _all_reduce_batch_figures(self, it: IterationBatch) -> IterationBatch:
        """Guided tokens and credit means of the whole iteration from each rank's own rows."""
        import torch.distributed as dist

        local = float(it.local_tok or 0)
        t = torch.tensor([it.n_guided_tokens, it.credit_mean * local, it.credit_abs_mean * local],
                         dtype=torch.float64)
        if self.device.type == "cuda":
            t = t.to(self.device)
        dist.all_reduce(t)
        guided, c_sum, c_abs = t.cpu().tolist()
        n = max(it.n_tok, 1)
        return replace(it, n_guided_tokens=int(guided), credit_mean=c_sum / n, credit_abs_mean=c_abs / n,
                       local_tok=None)

    def _grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            norm, self._clip_norm = self._clip_norm, None
        return float(norm) if norm is not None else math.nan

    # ------------------------------------------------------------------ export and state

    def export(self, version: int | None = None, store: str | None = None) -> AdapterVersion | AdapterRef | None:
        """The current adapter as an AdapterVersion with a probe (rank 0; other ranks return None);
        with `store` (an AdapterStore root every node can read), its bytes are written there once and
        only the AdapterRef is returned: the bytes never travel through the driver.

        ``version`` renumbers the current adapter (the driver's count); default: the learner's own
        (0 before training, +1 per train_step). Under ZeRO-3 call it on every rank (the gather and
        the probe forward are collective); with ZeRO 0-2 rank 0 alone suffices."""
        self._ensure_setup()
        if version is not None:
            self.version = int(version)
        if self.rank != 0 and not self.zero3:
            return None
        state = lora_state_dict(self.model, self.zero3)
        probe = Probe(tuple(self.probe_ids), probe_logprobs(self.model, self.probe_ids))
        if self.rank != 0:
            return None
        config = adapter_config(self.model, Path(self.config.model_dir).resolve())
        exported = make_adapter_version(state, config, name=self.config.name, version=self.version, probe=probe)
        return exported if store is None else AdapterStore(store).put(exported)

    def save_checkpoint(self, path: str | os.PathLike[str]) -> str:
        """Adapter + optimizer state (DeepSpeed checkpoint, LoRA only) + version, written to a temp
        directory then renamed into place. Call on every rank; ``path`` must be shared storage
        when ranks are on several nodes."""
        self._ensure_setup()
        import torch.distributed as dist

        final = Path(path).resolve()
        tmp = final.parent / f".{final.name}.tmp"
        if self.rank == 0:
            final.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        self.engine.save_checkpoint(
            str(tmp), tag="state", client_state={"version": self.version}, save_latest=False,
            exclude_frozen_parameters=True,
        )
        dist.barrier()
        if self.rank == 0:
            old = final.parent / f".{final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return str(final)

    def load_checkpoint(self, path: str | os.PathLike[str]) -> int:
        """Restore adapter, optimizer state and version from :meth:`save_checkpoint`; returns the version."""
        self._ensure_setup()
        _, client = self.engine.load_checkpoint(str(path), tag="state", load_module_strict=False)
        if client is None:
            raise FileNotFoundError(f"no learner checkpoint at {path}")
        self.version = int(client["version"])
        return self.version


def checkpoint_layers(model: torch.nn.Module, share: float) -> int:
    """Keep activation checkpointing (recompute in the backward pass) on for `share` of the model's
    decoder layers, spread evenly (layer i of n when floor((i + 1) * share) > floor(i * share)), and
    turn it off for the rest, which keep their activations. Returns how many layers recompute.
    Checkpointing changes what is kept, never a number (sysdesign/benchmarks.md): each layer saved
    costs memory proportional to the micro-batch's tokens and buys back its share of one forward.
    A share of 0 leaves the model as it is."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if not share:
        return 0
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    recomputed = 0
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = math.floor((i + 1) * share) > math.floor(i * share)
        recomputed += layer.gradient_checkpointing
    return recomputed


def set_mmap_threshold(nbytes: int) -> bool:
    """Fix glibc's mmap threshold of this process at `nbytes` (mallopt M_MMAP_THRESHOLD); False where
    the C library has no mallopt (not glibc). By default the threshold slides up to 32 MB as large
    blocks are freed, after which activations and gradients of up to 32 MB come from the heap, where
    freed blocks fragment it and are not given back: a CPU learner's RSS then climbs far above what
    it holds (the smoke config: 4.2 GB peak against 1.7 GB with the threshold fixed;
    sysdesign/benchmarks.md). Blocks at or above a fixed threshold are mapped and unmapped whole.
    Allocation only: no number changes. False, and nothing set, in a process on jemalloc
    (`actors.allocator`): glibc's threshold means nothing there."""
    import ctypes
    import ctypes.util

    if allocator.loaded() == "jemalloc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold = -3
    return bool(mallopt(m_mmap_threshold, int(nbytes)))


def resolve_dtype(name: str) -> torch.dtype:
    """float32/fp32 -> float32. auto, bfloat16/bf16 -> bfloat16 where supported: a GPU with bf16 or a
    CPU with native bf16 (AVX512-BF16/AMX); else float32, since on an AVX2-only CPU bf16 matmuls
    are emulated (measured ~1 GFLOP/s vs ~70 fp32 per core)."""
    if DTYPES[name] == torch.float32:
        return torch.float32
    supported = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else cpu_has_bf16()
    if not supported and name != "auto":
        warnings.warn("bf16 requested but this device has no native bf16: training in float32", stacklevel=2)
    return torch.bfloat16 if supported else torch.float32


def _as_tables(batches: Sequence[Any] | Any) -> list[pa.Table | pa.RecordBatch]:
    """Tables / record batches, or Ray object refs to them (resolved here: refs nested in a list
    are not resolved by Ray when passed to an actor method)."""
    items = list(batches) if isinstance(batches, list | tuple) else [batches]
    refs = [i for i, b in enumerate(items) if not isinstance(b, pa.Table | pa.RecordBatch)]
    if refs:
        import ray

        values = ray.get([items[i] for i in refs])
        for i, v in zip(refs, values, strict=True):
            items[i] = v
    for b in items:
        if not isinstance(b, pa.Table | pa.RecordBatch):
            raise BatchError(f"train_step takes Arrow tables/record batches (or refs to them), got {type(b).__name__}")
    return items


__all__ = ["Learner", "LearnerConfig", "IterationBatch"]
