"""The learner's peak memory at the smoke config, and what bounding it costs in tokens/s.

Usage: python benchmarks/bench_learner_memory.py [--games 16] [--steps 2] [--threads 2] [--speed-ab]

--speed-ab: the cost of a fixed mmap threshold in time, under equal load: one process, alternate
steps with glibc's threshold at 32 MB (where the sliding default ends up) and at 128 KiB.

Each setting runs in a fresh child process (peak RSS is a per-process high-water mark): the real
`Learner` (DeepSpeed, PEFT, configs/smoke.yaml's learner settings: SmolLM2, LoRA r 8, AA credit,
entropy 0.01, 4096-token micro-batches), `--games` IPD-like games of 2..10 rounds with both seats
trainable (bench_learner's batch: more rows than the smoke run's one trained seat, so an upper
bound), one warm-up step and `--steps` timed steps. A setting is the share of layers checkpointed
(`learner.gradient_checkpointing`: 0 none, 0.5 half, 1 all) times the micro-batch token budget
times glibc's mmap threshold (`learner.mmap_threshold`).

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
SETTINGS = [  # (share of layers checkpointed, micro_batch_tokens, mmap threshold: 0 = glibc's sliding default)
    (0.0, 4096, 0), (1.0, 4096, 0), (1.0, 4096, 131072), (1.0, 4096, 4 << 20), (0.0, 4096, 131072),
    (0.5, 4096, 131072), (1.0, 2048, 0), (1.0, 8192, 0),
]


def child(args: argparse.Namespace) -> dict:
    import dataclasses

    import torch
    from bench_learner import MODEL, make_table
    from transformers import AutoTokenizer

    from learner.learner import Learner, set_mmap_threshold
    from reciprocity.config import load_config
    from reciprocity.learner_settings import learner_config

    torch.set_num_threads(args.threads)
    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    lc = dataclasses.replace(learner_config(cfg), model_dir=str(MODEL), num_threads=args.threads,
                             gradient_checkpointing=args.share, micro_batch_tokens=args.micro_batch_tokens,
                             mmap_threshold=args.mmap_threshold or None)
    tok = AutoTokenizer.from_pretrained(str(MODEL))
    table = make_table(tok, args.games)
    learner = Learner(lc)
    learner.setup()
    rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    steps, seconds = [], []
    ab: dict[int, list[float]] = {32 << 20: [], 128 << 10: []}
    for i in range(args.steps + 1):
        if args.speed_ab and i:  # alternate glibc's threshold: the sliding default's ceiling, the fixed one
            threshold = list(ab)[i % 2]
            set_mmap_threshold(threshold)
        t = time.perf_counter()
        m = learner.train_step([table])
        if i:  # the first is a warm-up
            seconds.append(time.perf_counter() - t)
            if args.speed_ab:
                ab[threshold].append(seconds[-1])
        steps.append({k: m[k] for k in ("loss", "grad_norm") if k in m})
    tokens = int(sum(len(r) for r in table.column("token_ids").to_pylist()))
    if args.speed_ab:  # one process, the same load on the machine for both: step seconds per threshold
        return {"speed_ab_step_s": {str(k): v for k, v in ab.items()},
                "fixed_over_sliding_step_s": statistics.median(ab[128 << 10]) / statistics.median(ab[32 << 20])}
    return {
        "gradient_checkpointing": args.share,
        "checkpointed_layers": learner.checkpointed_layers,
        "micro_batch_tokens": args.micro_batch_tokens,
        "mmap_threshold": args.mmap_threshold,
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
    ap.add_argument("--micro-batch-tokens", type=int, default=4096, help=argparse.SUPPRESS)
    ap.add_argument("--mmap-threshold", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--share", type=float, default=1.0, help=argparse.SUPPRESS)  # of layers checkpointed
    ap.add_argument("--speed-ab", action="store_true",
                    help="one process: alternate steps with a 32 MB and a 128 KiB mmap threshold, print their times")
    args = ap.parse_args()
    if args.speed_ab:
        args.child = True
    if args.child:
        import contextlib

        out = sys.stdout
        with contextlib.redirect_stdout(sys.stderr):
            result = child(args)
        print(json.dumps(result), file=out)
        return

    runs = []
    for share, mbt, mmap in SETTINGS:
        cmd = [sys.executable, __file__, "--child", "--games", str(args.games), "--steps", str(args.steps),
               "--threads", str(args.threads), "--micro-batch-tokens", str(mbt), "--mmap-threshold", str(mmap),
               "--share", str(share)]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps({k: runs[-1][k] for k in ("gradient_checkpointing", "micro_batch_tokens", "mmap_threshold",
                                                   "peak_rss_bytes", "learner_tok_s")}), file=sys.stderr)
    base = runs[0]

    def name(r: dict) -> str:
        return f"ckpt={r['gradient_checkpointing']},mbt={r['micro_batch_tokens']},mmap={r['mmap_threshold']}"

    print(json.dumps({
        "name": "learner_memory",
        "games": args.games,
        "threads": args.threads,
        "runs": runs,
        "peak_rss_gb": {name(r): r["peak_rss_bytes"] / 1e9 for r in runs},
        "tok_s_over_first": {name(r): r["learner_tok_s"] / base["learner_tok_s"] for r in runs},
        "same_update_as_first": {name(r): r["steps"] == base["steps"] for r in runs},
        "loadavg_1m": os.getloadavg()[0],
    }))


if __name__ == "__main__":
    main()
