"""Where the rollout's time goes inside vLLM's engine (issue 15, item 3): a smoke training run
(configs/smoke.yaml, 3 iterations, SmolLM2, both seats on LoRA adapters) with py-spy sampling the
engine process (EngineCore, a child of the RolloutWorker actor) for the whole run. Every sample taken
inside `EngineCore.step` (torch.compile frames of the warm-up left out) is put in one category by
its deepest frame outside torch: base-model matmuls, lm_head, LoRA, attention, the native
elementwise ops (RMS norm, SiLU-and-mul, rotary), grammar masks, sampling, scheduling, other.

    python benchmarks/profile_rollout.py [--rate 50] [key.sub=value ...]

Prints ONE JSON object (last line): the share of each category and the 12 heaviest frames. py-spy
comes with ray[default]; attaching to a process needs ptrace rights (root, or
kernel.yama.ptrace_scope=0). About 3 minutes on 2 idle cores. Not a benchmark (`make bench` runs
`bench_*.py` only).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = (  # first match wins, on the deepest frame outside torch
    ("lora", ("grouped_add_lora_linear", "zero_safe_add_lora_logits", "slot_rows", "lora/")),
    ("lm_head", ("weight_packed_linear_cpu",)),
    ("base matmuls", ("onednn_mm", "cpu_unquantized_gemm")),
    ("attention", ("cpu_attention", "cpu_attn", "kv_cache_update", "slot_mapping", "attention")),
    ("norms, activation, rotary", ("layernorm", "rms_norm", "SiluAndMul", "silu", "rotary", "activation")),
    ("grammar masks", ("xgrammar", "grammar_bitmask", "structured_output")),
    ("sampling", ("sample", "Sampler", "topk_topp", "logprobs")),
    ("scheduling and inputs", ("Scheduler", "_prepare_inputs", "_update_states", "attention_metadata",
                               "scheduler", "input_batch")),
)


def category(frame: str) -> str:
    for name, keys in CATEGORIES:
        if any(k in frame for k in keys):
            return name
    return "other"


def engine_process(driver: psutil.Process, timeout: float = 600) -> psutil.Process:
    """vLLM's engine process: the multiprocessing child (`spawn_main`, not the resource tracker) of
    the RolloutWorker actor (Ray starts actors under its raylet, a descendant of the driver)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for proc in driver.children(recursive=True):
            try:
                if "RolloutWorker" not in " ".join(proc.cmdline()):
                    continue
                for kid in proc.children():
                    if "spawn_main" in " ".join(kid.cmdline()):
                        return kid
            except psutil.Error:
                continue
        if not driver.is_running():
            break
        time.sleep(0.5)
    raise RuntimeError("the engine process did not appear")


def profile(raw: Path) -> dict:
    counts: collections.Counter[str] = collections.Counter()
    frames: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        match = re.match(r"(.*) (\d+)$", line)
        if not match:
            continue
        stack, n = match.group(1).split(";"), int(match.group(2))
        names = [re.sub(r" \(.*", "", f) for f in stack]
        if "EngineCore.step" not in names or "CatchErrorsWrapper.__call__" in names:
            continue
        leaf = next((f for f in reversed(stack) if "torch/" not in f), stack[-1])
        counts[category(leaf)] += n
        frames[leaf] += n
    total = sum(counts.values())
    return {
        "samples_in_engine_step": total,
        "share": {k: round(v / total, 3) for k, v in counts.most_common()} if total else {},
        "heaviest_frames": {k: round(v / total, 3) for k, v in frames.most_common(12)} if total else {},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=int, default=50, help="py-spy samples per second")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        sys.exit("py-spy not found (it comes with ray[default])")
    tmp = Path(tempfile.mkdtemp(prefix="profile-rollout-"))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
           "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, "-m", "reciprocity", "train", "--config", "configs/smoke.yaml", f"runs_dir={tmp}",
           f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", "checkpoint.every=0", "run_name=profile",
           *args.overrides]
    with (tmp / "train.log").open("w") as log:
        driver = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        engine = engine_process(psutil.Process(driver.pid))
        raw = tmp / "engine.txt"
        sampler = subprocess.Popen([spy, "record", "--pid", str(engine.pid), "--rate", str(args.rate),
                                    "--format", "raw", "-o", str(raw)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rc = driver.wait()
        sampler.send_signal(signal.SIGINT)
        sampler.wait(timeout=60)
    if rc != 0:
        sys.exit(f"training exited {rc}: {tmp / 'train.log'}")
    rollouts = re.findall(r"rollout: .* in ([\d.]+)s", (tmp / "train.log").read_text())
    out = {"name": "profile_rollout", "overrides": args.overrides, "rate": args.rate,
           "rollout_seconds": [float(s) for s in rollouts], **profile(raw)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
