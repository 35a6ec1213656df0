"""Env throughput: scripted-vs-scripted games with every prompt built and every output parsed, as in
a real rollout (the scripted seats stand in for the engine). Target: a round's env + prompt + parse
cost under 100 us. Prints one JSON object; `<game>_target_ratio` = measured us / 100 (<= 1 meets it).

The figure is the process CPU time per round, best of `repeats` runs (on a shared machine, wall
time also counts waiting for a core); the best wall time per round is printed beside it.

    .venv/bin/python benchmarks/bench_envs.py [--games 200] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import time

from envs.loop import play_scripted

TARGET_US = 100.0
PAIRS = {
    "ipd": ("tit_for_tat", "random"),
    "split_nocomm": ("welfare_maximising", "random"),
    "trust_and_split": ("truthful", "random"),
}


def us_per_round(game: str, games: int, repeats: int) -> tuple[float, float]:
    """(CPU, wall) microseconds per round, each the best of `repeats` runs."""
    cpu = wall = float("inf")
    for _ in range(repeats):
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        records = play_scripted(game, PAIRS[game], games, seed=0)
        rounds = sum(len(r.rewards[0]) for r in records)
        cpu = min(cpu, (time.process_time() - start_cpu) / rounds)
        wall = min(wall, (time.perf_counter() - start_wall) / rounds)
    return cpu * 1e6, wall * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--games", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    out: dict[str, object] = {"name": "envs", "games": args.games, "repeats": args.repeats, "target_us": TARGET_US}
    for game in PAIRS:
        us, wall_us = us_per_round(game, args.games, args.repeats)
        out[f"{game}_us_per_round"] = round(us, 2)
        out[f"{game}_wall_us_per_round"] = round(wall_us, 2)
        out[f"{game}_rounds_per_s"] = round(1e6 / us)
        out[f"{game}_target_ratio"] = round(us / TARGET_US, 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
