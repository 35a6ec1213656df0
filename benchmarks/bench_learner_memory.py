"""The learner's peak memory at the smoke config, and what bounding it costs in tokens/s.

Usage: python benchmarks/bench_learner_memory.py [--games 16] [--steps 2] [--threads 2]

Each setting runs in a fresh child process (peak RSS is a per-process high-water mark): the real
`Learner` (DeepSpeed, PEFT, configs/smoke.yaml's learner settings: SmolLM2, LoRA r 8, AA credit,
entropy 0.01, 4096-token micro-batches), `--games` IPD-like games of 2..10 rounds with both seats
trainable (bench_learner's batch: more rows than the smoke run's one trained seat, so an upper
bound), one warm-up step and `--steps` timed steps. A setting is activation checkpointing on/off
times the micro-batch token budget.

Per setting: peak RSS of the child (getrusage ru_maxrss), learner tokens/s (median step), and the
steps' loss and gradient norm, so that one can see the settings compute the same update (they
only change what is kept for the backward pass, and how rows are grouped into passes).
Prints ONE JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
SETTINGS = [  # (gradient_checkpointing, micro_batch_tokens)
    (False, 4096), (True, 4096), (False, 2048), (True, 2048), (True, 8192),
]


def child(args: argparse.Namespace) -> dict:
    import dataclasses

    import torch
    from bench_learner import MODEL, make_table
    from transformers import AutoTokenizer

    from learner.learner import Learner
    from reciprocity.config import load_config
    from reciprocity.train import learner_config

    torch.set_num_threads(args.threads)
    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    lc = dataclasses.replace(learner_config(cfg), model_dir=str(MODEL), num_threads=args.threads,
                             gradient_checkpointing=args.checkpointing, micro_batch_tokens=args.micro_batch_tokens)
    tok = AutoTokenizer.from_pretrained(str(MODEL))
    table = make_table(tok, args.games)
    learner = Learner(lc)
    learner.setup()
    rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    steps, seconds = [], []
    for i in range(args.steps + 1):
        t = time.perf_counter()
        m = learner.train_step([table])
        if i:  # the first is a warm-up
            seconds.append(time.perf_counter() - t)
        steps.append({k: m[k] for k in ("loss", "grad_norm") if k in m})
    tokens = int(sum(len(r) for r in table.column("token_ids").to_pylist()))
    return {
        "gradient_checkpointing": args.checkpointing,
        "micro_batch_tokens": args.micro_batch_tokens,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_rss_after_setup_bytes": rss_setup,
        "tokens_per_step": tokens,
        "learner_tok_s": tokens / statistics.median(seconds),
        "step_s": seconds,
        "steps": steps,
        "micro_batches": m.get("micro_batches"),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--games", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--micro-batch-tokens", type=int, default=4096, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import contextlib

        out = sys.stdout
        with contextlib.redirect_stdout(sys.stderr):
            result = child(args)
        print(json.dumps(result), file=out)
        return

    runs = []
    for ckpt, mbt in SETTINGS:
        cmd = [sys.executable, __file__, "--child", "--games", str(args.games), "--steps", str(args.steps),
               "--threads", str(args.threads), "--micro-batch-tokens", str(mbt)] + (["--checkpointing"] if ckpt else [])
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps({k: runs[-1][k] for k in ("gradient_checkpointing", "micro_batch_tokens", "peak_rss_bytes",
                                                   "learner_tok_s")}), file=sys.stderr)
    base = runs[0]
    print(json.dumps({
        "name": "learner_memory",
        "games": args.games,
        "threads": args.threads,
        "runs": runs,
        "peak_rss_gb": {f"ckpt={r['gradient_checkpointing']},mbt={r['micro_batch_tokens']}": r["peak_rss_bytes"] / 1e9
                        for r in runs},
        "tok_s_over_default": {f"ckpt={r['gradient_checkpointing']},mbt={r['micro_batch_tokens']}":
                               r["learner_tok_s"] / base["learner_tok_s"] for r in runs},
        "same_update_as_default": {f"ckpt={r['gradient_checkpointing']},mbt={r['micro_batch_tokens']}":
                                   r["steps"] == base["steps"] for r in runs},
        "loadavg_1m": os.getloadavg()[0],
    }))


if __name__ == "__main__":
    main()
