"""The learner ranks' config from the run config: one mapping, shared by the driver and the benchmarks.

Kept apart from `reciprocity.train` so that a process without Ray (a benchmark on a GPU box, a
notebook) can build exactly the learner the driver would build."""

from __future__ import annotations

from pathlib import Path

from learner.learner import LearnerConfig
from reciprocity.config import Config

LEARNER_NAME = "learner"


def learner_config(cfg: Config) -> LearnerConfig:
    """The learner ranks' config, straight from the run config (whose defaults are the only ones)."""
    lora, method, learner = cfg.lora, cfg.method, cfg.learner
    return LearnerConfig(
        model_dir=str(Path(cfg.model.path).absolute()), name=LEARNER_NAME, seed=cfg.seed,
        lora_r=lora.r, lora_alpha=lora.alpha, lora_target_modules=lora.target_modules,
        credit_method=method.name, discount=method.discount, reward_normaliser=method.reward_normaliser,
        aa_beta=method.beta, aa_gamma=method.gamma, entropy_coef=method.entropy_coef, kl_coef=method.kl_coef,
        lr=learner.lr, grad_clip=learner.grad_clip, zero_stage=learner.zero_stage, dtype=learner.dtype,
        micro_batch_tokens=learner.micro_batch_tokens, guided_logprob=learner.guided_logprob,
        gradient_checkpointing=checkpoint_share(cfg),
        num_threads=learner_threads(cfg),
        mmap_threshold=learner_mmap_threshold(cfg),
    )


# share of a CPU rank's decoder layers that recompute their activations: every layer. On jemalloc
# (the CPU default) the smoke iteration's learner took 22.3 s at 1.8 GiB with every layer, 23.1 s at
# 2.9 GiB with three quarters, 25.8 s at 4.0 GiB with half (session 16, EPYC without AMX): holding
# activations costs more than recomputing them. On glibc half was 1.21x faster than all (session 10,
# 3.9 GB); sysdesign/benchmarks.md
CPU_CHECKPOINT_SHARE = 1.0


def checkpoint_share(cfg: Config) -> float:
    """The share of decoder layers a rank checkpoints: 0 none, 1 all (learner.gradient_checkpointing)."""
    share = cfg.learner.gradient_checkpointing
    if share == "auto":
        return CPU_CHECKPOINT_SHARE if cfg.learner.gpus_per_rank == 0 else 0.0
    return float(share)


CPU_MMAP_THRESHOLD = 128 * 1024  # glibc's initial threshold, fixed: sysdesign/benchmarks.md


def learner_mmap_threshold(cfg: Config) -> int | None:
    """A rank's fixed glibc mmap threshold: auto = CPU_MMAP_THRESHOLD on a CPU rank, else none."""
    value = cfg.learner.mmap_threshold
    if value == "auto":
        return CPU_MMAP_THRESHOLD if cfg.learner.gpus_per_rank == 0 else None
    return value or None


def learner_threads(cfg: Config) -> int | str:
    """A rank's torch threads: the explicit count; in sync mode "node" (the node's cores shared among
    the ranks: the engine idles while the learner learns); in async mode the CPUs Ray gives the rank,
    because there the engine rolls out beside the learner (oversubscribed threads cost ~20x)."""
    threads = cfg.learner.threads
    if threads != "auto":
        return threads
    return "node" if cfg.mode == "sync" else max(1, int(cfg.learner.cpus_per_rank))
