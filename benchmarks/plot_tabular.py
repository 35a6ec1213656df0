"""Train the tabular memory-1 IPD policy with each credit and plot P(C | state) over iterations.

Usage: python benchmarks/plot_tabular.py [--seed 0] [--out sysdesign/img/tabular_ipd.png]
       python benchmarks/plot_tabular.py --prior 0.93,0.85,0.275 --out sysdesign/img/tabular_ipd_llm_prior.png
(--prior P_START,P_AFTER_C,P_AFTER_D: a reactive policy, which sees only the opponent's last action
as the LLM's prompt does, started from those probabilities of cooperating, e.g. SmolLM2's.)
Prints one JSON object: {"name": "tabular", "<run>_p_c_<state>": ..., "seconds": ...}, with <run> in
naive, sum, aa, aa_buffer (method spec, section 1).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from learner.tabular import STATES, TabularResult, train_tabular  # noqa: E402

RUNS: dict[str, dict[str, Any]] = {
    "naive": {"method": "naive"},
    "sum": {"method": "sum"},
    "aa": {"method": "aa", "beta": 0.5, "gamma": 0.9},
    "aa_buffer": {"method": "aa", "beta": 0.5, "gamma": 0.9, "buffer": True},
}
TITLES = {
    "naive": "naive (C = A1)",
    "sum": "sum of rewards (C = A1 + A2)",
    "aa": "Advantage Alignment, self-play",
    "aa_buffer": "Advantage Alignment + agent buffer",
}
STATE_LABELS = {
    "start": "start",
    "CC": "CC (both C)",
    "CD": "CD (I C, they D)",
    "DC": "DC (I D, they C)",
    "DD": "DD (both D)",
}


def plot(results: dict[str, TabularResult], out: Path, subtitle: str = "") -> None:
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), sharey=True)
    for ax, (name, r) in zip(axes, results.items(), strict=True):
        for j, state in enumerate(STATES):
            ax.plot(r.history[:, j], label=STATE_LABELS[state], lw=1.6)
        ax.set_title(TITLES[name], fontsize=10)
        ax.set_xlabel("iteration")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("P(C | state)")
    axes[-1].legend(loc="center right", fontsize=8)
    seed = results["aa"].seed
    fig.suptitle(f"Memory-1 IPD policy, 128 games x 10 rounds, Adam lr 0.1 (seed {seed}){subtitle}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--out", type=Path, default=Path("sysdesign/img/tabular_ipd.png"))
    parser.add_argument("--prior", type=str, default=None,
                        help="P_START,P_AFTER_C,P_AFTER_D: reactive policy started from these P(C)")
    args = parser.parse_args()

    extra: dict[str, Any] = {}
    subtitle = ""
    if args.prior:
        p_start, p_c, p_d = (float(x) for x in args.prior.split(","))
        p = np.array([p_start, p_c, p_d, p_c, p_d])
        extra = {"init_logits": np.log(p / (1 - p)), "reactive": True}
        subtitle = f"\nreactive, from P(C | start, opp C, opp D) = {p_start}, {p_c}, {p_d}"
    start = time.perf_counter()
    results = {
        name: train_tabular(iterations=args.iterations, seed=args.seed, **kwargs, **extra)
        for name, kwargs in RUNS.items()
    }
    seconds = time.perf_counter() - start
    plot(results, args.out, subtitle)

    report: dict[str, object] = {"name": "tabular", "seed": args.seed, "iterations": args.iterations,
                                 "prior": args.prior}
    for name, r in results.items():
        for state in STATES:
            report[f"{name}_p_c_{state}"] = round(r.p_c[state], 4)
        report[f"{name}_mean_reward_last20"] = round(float(r.mean_reward[-20:].mean()), 4)
    report["seconds"] = round(seconds, 3)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
