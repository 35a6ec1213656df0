"""learner.learner + learner.export: the DeepSpeed learner trains the tiny model on CPU, exports
versions that round-trip exactly, checkpoints, and 2 ranks (ZeRO-2) equal 1 rank."""

from __future__ import annotations

import math
import os
import socket
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pytest
import torch
from support import ipd_table, learner_config

from learner.learner import Learner, LearnerConfig

# 1 thread: the CI machine has 2 cores shared with other test processes (OpenMP spin-waits
# under contention make 2-thread runs ~20x slower there).
TINY = dict(lora_r=4, lora_alpha=8, lr=1e-2, micro_batch_tokens=1024, num_threads=1, dtype="float32")


def test_config_rejects_unknown_and_invalid_keys() -> None:
    with pytest.raises(ValueError, match="unknown learner config key"):
        LearnerConfig.from_dict({"model_dir": "x", "lora_rank": 8})
    with pytest.raises(ValueError, match="zero_stage"):
        learner_config("x", zero_stage=4)
    with pytest.raises(ValueError, match="credit_method"):
        learner_config("x", credit_method="selfish")
    with pytest.raises(TypeError, match="missing"):  # no second set of defaults: the run config's are the only ones
        LearnerConfig(model_dir="x")  # type: ignore[call-arg]


def test_config_built_straight_from_the_run_config() -> None:
    from reciprocity.config import Config
    from reciprocity.learner_settings import learner_config as from_run_config

    run = Config.model_validate({
        "model": {"path": "/m"}, "seed": 3, "lora": {"r": 16, "alpha": 32.0},
        "method": {"name": "sum", "reward_normaliser": 7.0, "entropy_coef": 0.01},
        "learner": {"ranks": 2, "cpus_per_rank": 2.0, "zero_stage": 2, "dtype": "bf16", "lr": 1e-4,
                    "micro_batch_tokens": 4096, "guided_logprob": "full", "gradient_checkpointing": True},
    })
    cfg = from_run_config(run)
    assert (cfg.model_dir, cfg.lora_r, cfg.lora_alpha, cfg.credit_method, cfg.zero_stage, cfg.dtype) == (
        "/m", 16, 32.0, "sum", 2, "bf16")
    assert cfg.credit.normaliser == 7.0 and cfg.entropy_coef == 0.01 and cfg.seed == 3
    assert (cfg.lr, cfg.micro_batch_tokens, cfg.guided_logprob, cfg.name) == (1e-4, 4096, "full", "learner")
    assert cfg.gradient_checkpointing == 1.0  # true: every layer
    # auto: every layer for a CPU rank (memory, and on jemalloc speed too), none for a GPU rank
    assert from_run_config(Config()).gradient_checkpointing == 1.0
    assert from_run_config(Config(learner={"gpus_per_rank": 1})).gradient_checkpointing == 0.0
    assert from_run_config(Config(learner={"gradient_checkpointing": False})).gradient_checkpointing == 0.0
    assert from_run_config(Config(learner={"gradient_checkpointing": 0.25})).gradient_checkpointing == 0.25
    assert from_run_config(Config(learner={"gradient_checkpointing": 0})).gradient_checkpointing == 0.0  # 0: none
    for bad in (-0.5, 1.5, "half"):
        with pytest.raises(ValueError, match="gradient_checkpointing"):
            Config.model_validate({"learner": {"gradient_checkpointing": bad}})
    default = from_run_config(Config())  # every default comes from the run config
    assert (default.lora_r, default.lr, default.zero_stage, default.reward_normaliser) == (
        Config().lora.r, Config().learner.lr, Config().learner.zero_stage, Config().method.reward_normaliser)
    assert LearnerConfig.from_dict(asdict(cfg)) == cfg  # what a rank receives as a plain dict
    with pytest.raises(ValueError, match="unknown learner config key"):  # nested run-config sections are not read
        LearnerConfig.from_dict({**asdict(cfg), "learner": {"lr": 1.0}})


def test_learner_threads_take_the_node_in_sync_mode_and_the_ray_cpus_in_async_mode() -> None:
    from actors.device import node_cores
    from reciprocity.config import Config
    from reciprocity.learner_settings import learner_config as from_run_config

    def threads(mode: str, **learner: object) -> object:
        run = Config.model_validate({"mode": mode, "learner": {"cpus_per_rank": 1.0, **learner}})
        return from_run_config(run).num_threads

    assert threads("sync") == "node"  # the engine idles while the learner learns: all the cores
    assert threads("async") == 1  # the engine rolls out beside it: only the CPUs Ray gives the rank
    assert threads("async", cpus_per_rank=3.0) == 3
    assert threads("sync", threads=1) == 1 and threads("async", threads=2) == 2  # an explicit count wins
    with pytest.raises(ValueError, match="threads"):
        Config.model_validate({"learner": {"threads": 0}})
    cores = len(os.sched_getaffinity(0))
    assert node_cores(1) == cores and node_cores(2) == max(1, cores // 2) and node_cores(10**6) == 1


def test_a_cpu_rank_fixes_the_mmap_threshold_and_large_blocks_then_leave_the_heap() -> None:
    """auto: a CPU rank fixes glibc's mmap threshold (a GPU rank and 0 keep glibc's sliding one).
    Fixed, a 1 MB block freed after a 20 MB one is still mapped on its own (mallinfo2's hblkhd grows
    by it): with the sliding default the 20 MB free raises the threshold and the block comes from
    the heap, where freed blocks fragment it."""
    import subprocess
    import sys
    from pathlib import Path

    from reciprocity.config import Config
    from reciprocity.learner_settings import CPU_MMAP_THRESHOLD
    from reciprocity.learner_settings import learner_config as from_run_config

    def threshold(**learner: object) -> object:
        return from_run_config(Config.model_validate({"learner": learner})).mmap_threshold

    assert threshold() == CPU_MMAP_THRESHOLD and threshold(gpus_per_rank=1) is None
    assert threshold(mmap_threshold=0) is None and threshold(mmap_threshold=1 << 20) == 1 << 20
    with pytest.raises(ValueError, match="mmap_threshold"):
        Config.model_validate({"learner": {"mmap_threshold": -1}})
    probe = """
import ctypes, sys
from learner.learner import set_mmap_threshold
class M(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6"); libc.mallinfo2.restype = M
libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = [ctypes.c_void_p]
fixed = sys.argv[1] == "fixed" and set_mmap_threshold(131072)
libc.free(libc.malloc(20 << 20))  # a large block, mapped and freed: the sliding threshold rises to 20 MB
before = libc.mallinfo2().hblkhd
block = libc.malloc(1 << 20)
print(int(fixed), libc.mallinfo2().hblkhd - before)
"""
    root = Path(__file__).resolve().parents[1]
    out = {mode: subprocess.run([sys.executable, "-c", probe, mode], check=True, capture_output=True, text=True,
                                cwd=root).stdout.split() for mode in ("fixed", "default")}
    assert out["fixed"][0] == "1" and int(out["fixed"][1]) >= 1 << 20  # mapped on its own
    assert int(out["default"][1]) == 0  # from the heap


def test_a_share_of_the_layers_recomputes_its_activations_and_the_gradients_stay_the_same() -> None:
    """`checkpoint_layers`: the chosen layers (spread evenly) run their forward again in the backward
    pass, the others do not, and every gradient is bitwise the same whatever the share."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from learner.learner import checkpoint_layers

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    ids = torch.randint(0, 64, (2, 12))
    state = LlamaForCausalLM(config).state_dict()

    def run(share: float) -> tuple[int, list[int], list[torch.Tensor]]:
        model = LlamaForCausalLM(config)
        model.load_state_dict(state)
        model.train()
        recomputed = checkpoint_layers(model, share)
        calls = [0] * len(model.model.layers)
        for i, layer in enumerate(model.model.layers):
            layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        model(input_ids=ids, labels=ids).loss.backward()
        return recomputed, calls, [p.grad.clone() for p in model.parameters()]

    none, half, quarter, every = run(0.0), run(0.5), run(0.25), run(1.0)
    assert none[:2] == (0, [1, 1, 1, 1])
    assert half[:2] == (2, [1, 2, 1, 2])  # layers 1 and 3 run again in the backward pass
    assert quarter[:2] == (1, [1, 1, 1, 2])
    assert every[:2] == (4, [2, 2, 2, 2])
    for other in (half, quarter, every):
        assert all(torch.equal(a, b) for a, b in zip(none[2], other[2], strict=True))


def _lora_state(learner: Learner) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(learner.model).items()}


@pytest.mark.slow
def test_learner_trains_exports_and_checkpoints(tiny_model_dir, tokenizer, tmp_path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from learner.export import load_adapter_weights, probe_logprobs

    table = ipd_table(tokenizer, n_games=6, seed=0, group_size=2)  # guided: constraints exercised
    cfg = learner_config(tiny_model_dir, zero_stage=1, entropy_coef=0.01, kl_coef=0.01,
                         credit_method="aa", reward_normaliser=5.0, **TINY)
    learner = Learner(cfg)
    v0 = learner.export()
    before = _lora_state(learner)
    metrics = learner.train_step([table.slice(0, 5), table.slice(5)])  # several batches of one iteration
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert metrics["tokens"] == metrics["guided_tokens"] > 0 and metrics["constraint_mismatch"] == 0
    assert metrics["grad_norm"] > 0 and metrics["micro_batches"] >= 2
    assert metrics["logp_abs_diff"] < 20 and 0 < metrics["iw_mean"] <= 2
    after = _lora_state(learner)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the adapter changed

    v1 = learner.export()
    assert (v0.version, v1.version) == (0, 1) and v0.sha256 != v1.sha256
    v1.check_sha()
    assert v1.config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    assert v1.config["r"] == 4 and "q_proj" in v1.config["target_modules"]
    assert len(v1.probe.logprobs) == len(v1.probe.token_ids) - 1

    # export round-trip: a fresh PEFT model loaded from the bytes has exactly the learner's weights
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    fresh = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    load_adapter_weights(fresh, v1.data)
    from peft import get_peft_model_state_dict

    loaded = get_peft_model_state_dict(fresh)
    assert loaded.keys() == after.keys() and all(torch.equal(loaded[k], after[k]) for k in after)
    assert probe_logprobs(fresh, list(v1.probe.token_ids)) == v1.probe.logprobs
    assert (v1.write(tmp_path / "adapters") / "adapter_model.safetensors").read_bytes() == v1.data

    # checkpoint: adapter + optimizer state + version restore the exact same continuation
    path = learner.save_checkpoint(tmp_path / "ckpt")
    m_a = learner.train_step([table])
    state_a = _lora_state(learner)
    assert learner.load_checkpoint(path) == 1
    m_b = learner.train_step([table])
    assert m_b["loss"] == pytest.approx(m_a["loss"], rel=1e-6)
    assert all(torch.equal(state_a[k], v) for k, v in _lora_state(learner).items())


@pytest.mark.slow
def test_zero3_trains_and_exports_gathered_weights(tiny_model_dir, tokenizer) -> None:
    from safetensors.torch import load

    table = ipd_table(tokenizer, n_games=2, seed=2, guided=False)
    learner = Learner(learner_config(tiny_model_dir, zero_stage=3, kl_coef=0.01, reward_normaliser=1.0, **TINY))
    metrics = learner.train_step([table])
    assert math.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    weights = load(learner.export().data)
    for name, w in weights.items():  # full tensors, not ZeRO-3's empty partitions
        assert w.numel() > 0 and (w.shape[0] == 4 if "lora_A" in name else w.shape[1] == 4), name
    assert any(float(w.abs().max()) > 0 for n, w in weights.items() if "lora_B" in n)  # B moved off 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, config: dict, table: pa.Table, steps: int, out,
               group_rows: int = 0) -> None:
    learner = Learner(config, rank=rank, world_size=world_size)
    learner.setup(f"127.0.0.1:{port}")
    if group_rows:  # as the rollout returns them: a batch per group, each with its summary
        from actors.trajectories import summary

        batches = [table.slice(i, group_rows) for i in range(0, table.num_rows, group_rows)]
        metrics = [learner.train_step(batches, [summary(b) for b in batches]) for _ in range(steps)]
    else:
        metrics = [learner.train_step([table]) for _ in range(steps)]
    version = learner.export()
    if rank == 0:
        out.put((version.data, metrics))


def _run(world_size: int, config: dict, table: pa.Table, steps: int, group_rows: int = 0) -> tuple[bytes, list[dict]]:
    ctx = torch.multiprocessing.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, config, table, steps, out, group_rows))
             for r in range(world_size)]
    for p in procs:
        p.start()
    result = out.get(timeout=240)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return result


@pytest.mark.slow
def test_two_ranks_zero2_equal_one_rank(tiny_model_dir, tokenizer) -> None:
    """Same global batch, 2 steps: ZeRO-2 over 2 gloo ranks vs 1 rank. Tolerance: the updates differ
    only by the order of fp32 gradient sums, so |delta_2 - delta_1| <= 1e-3 * |delta_1|_max + 1e-6."""
    from safetensors.torch import load

    table = ipd_table(tokenizer, n_games=6, seed=1, group_size=3)
    # 600 tokens: 3 micro-batches of 4 rows, so rank 1 runs one real pass and one empty (dummy) pass
    config = asdict(learner_config(tiny_model_dir, zero_stage=2, credit_method="sum", reward_normaliser=5.0,
                                   **{**TINY, "micro_batch_tokens": 600}))
    one, m1 = _run(1, config, table, steps=2)
    two, m2 = _run(2, config, table, steps=2)
    assert (m1[0]["micro_batches"], m2[0]["micro_batches"]) == (3, 2)  # split, with one dummy pass
    for a, b in zip(m1, m2, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["tokens"] == a["tokens"]
    w1, w2 = load(one), load(two)
    assert w1.keys() == w2.keys()
    scale = max(float(v.abs().max()) for v in w1.values())
    worst = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    print(f"2-rank vs 1-rank: max |w2 - w1| = {worst:.3g}, max |w1| = {scale:.3g}")
    assert worst <= 1e-3 * scale + 1e-6, (worst, scale)
    assert np.isfinite(scale) and scale > 0

    # each rank resolving only its own batches (one group of 3 games each) gives the same update
    sharded, m3 = _run(2, config, table, steps=2, group_rows=6)
    for a, c in zip(m1, m3, strict=True):
        assert c["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
        assert c["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert (c["tokens"], c["guided_tokens"], c["rows"]) == (a["tokens"], a["guided_tokens"], a["rows"])
        assert c["credit_mean"] == pytest.approx(a["credit_mean"], rel=1e-6, abs=1e-9)
    w3 = load(sharded)
    worst = max(float((w1[k] - w3[k]).abs().max()) for k in w1)
    assert worst <= 1e-3 * scale + 1e-6, (worst, scale)
