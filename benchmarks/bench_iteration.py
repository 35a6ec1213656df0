"""Time, CPU use and memory per training iteration, by phase, for configs/smoke.yaml (SmolLM2 on CPU).

Prints one JSON object (last line). Per layout:
- seconds per phase (rollout, learn, publish, evaluate, checkpoint), mean over the iterations after
  the first (warm-up), and `overhead_ratio`: the share of an iteration outside generation (the
  worker's match time) and learner compute (forward/backward + optimizer step). Target < 0.10.
- `cpu_util_*`: CPU seconds of the run's processes (this process and every descendant: Ray, the
  workers, the vLLM engine processes, the learner) over wall seconds x cores, per phase and over
  whole iterations; `machine_util_*` the same from /proc/stat for every process on the machine.
- `engine_flops_over_peak`: the engine's achieved FLOP/s in the rollout phase over the measured
  matmul peak in the engine's dtype at the engine's threads (`engine_torch_threads`, read back from
  the engine process: `rollout.engine_threads`; `engine_peaks`: best of 5, before any run). FLOPs =
  2 x (decoder-layer linear parameters x (prefill tokens actually computed + decode tokens) +
  lm_head parameters x decode tokens: vLLM computes logits only where it samples), the token counts
  from the engine's own statistics (prompt tokens minus prefix-cache hits); attention and the LoRA
  products left out, so it is a lower bound.
- `learner_peak_rss_gb`: the learner rank's peak resident memory, sampled every 0.2 s.

    python benchmarks/bench_iteration.py [--iterations 3] [--single] [key.sub=value ...]

By default (and so in `make bench`) it runs the previous layout (`PREVIOUS_LAYOUT`: one thread per
phase, vLLM's CPU block size, every layer checkpointed, glibc's malloc as it comes) and the new
default back to back on the same machine and adds
`seconds_iteration_new_over_previous_ratio` (issue 15's target: <= 0.6). `--single` measures only
the default layout with the overrides (e.g. `mode=async`). `--compare` names the default
(the commands in sysdesign/benchmarks.md use it); the two exclude each other.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
CORES = len(os.sched_getaffinity(0))
# the defaults before issue 15: one thread per phase, vLLM's CPU default of 128-token KV blocks,
# activation checkpointing in every learner layer, glibc's malloc with its sliding mmap threshold
PREVIOUS_LAYOUT = ["learner.threads=1", "rollout.engine_threads=1", "rollout.block_size=128",
                   "learner.gradient_checkpointing=true", "learner.mmap_threshold=0", "learner.allocator=glibc",
                   "rollout.allocator=glibc"]


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of every CPU, from /proc/stat."""
    fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


class TreeMeter:
    """CPU seconds of this process and its descendants (exited ones keep their last reading), and
    the peak RSS of the learner rank, sampled in a thread."""

    def __init__(self) -> None:
        self.me = psutil.Process()
        self.cpu: dict[int, float] = {}
        self.learner_peak = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def sample(self) -> float:
        with self._lock:
            for p in [self.me, *self.me.children(recursive=True)]:
                try:
                    t = p.cpu_times()
                    self.cpu[p.pid] = t.user + t.system
                    if "Learner" in " ".join(p.cmdline()[:1]):
                        self.learner_peak = max(self.learner_peak, p.memory_info().rss)
                except psutil.Error:
                    pass
            return sum(self.cpu.values())

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            self.sample()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def recorder(meter: TreeMeter) -> Any:
    from reciprocity import progress

    class Recorder(progress.Silent):
        """A progress view that records wall time, tree CPU and machine CPU of every phase."""

        def __init__(self) -> None:
            self.phases: list[dict[str, Any]] = []  # one dict per iteration: phase -> [wall, cpu, busy, total]
            self.open: tuple[str, float, float, float, float] | None = None

        def start_iteration(self, iteration: int) -> None:
            self.phases.append(defaultdict(lambda: np.zeros(4)))

        def _close(self) -> None:
            if self.open is not None and self.phases:
                name, t, cpu, busy, total = self.open
                b, tt = machine_busy()
                self.phases[-1][name] += (time.perf_counter() - t, meter.sample() - cpu, b - busy, tt - total)
            self.open = None

        def phase(self, name: str, total: float | None = None, detail: str = "") -> None:
            self._close()
            self.open = (name.split(" ")[0], time.perf_counter(), meter.sample(), *machine_busy())

        def end_iteration(self, line: str) -> None:
            self._close()

    return Recorder()


def engine_dtype() -> Any:
    """The engine's dtype on this CPU: bf16 where it is computed natively, else fp32 (`cpu_has_bf16`,
    the engine's own rule)."""
    import torch

    from actors.device import cpu_has_bf16

    return torch.bfloat16 if cpu_has_bf16() else torch.float32


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def engine_peaks() -> dict[int, float]:
    """Measured matmul FLOP/s in the engine's dtype, for 1 thread and for every core: the best of 5
    timings of 8 products of 2048-square matrices each, taken before any run so that nothing else
    computes. A peak timed once, briefly, after a run's processes had begun to exit came out
    anywhere in 0.55-0.97 TFLOP/s on the same CPU, and a low peak inflates the ratio."""
    from bench_learner import matmul_peak  # the one matmul timing of the benchmarks

    dtype, peaks = engine_dtype(), {}
    for threads in sorted({1, CORES}):
        with torch_threads(threads):
            peaks[threads] = max(matmul_peak(dtype, 2048, 8) for _ in range(5))
    return peaks


def model_shapes(path: Path) -> tuple[list[tuple[int, int]], int, int]:
    """(one decoder layer's linear maps as (in, out): qkv, o, gate_up, down; layers; lm_head
    parameters), from the model's config.json."""
    cfg = json.loads((path / "config.json").read_text())
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    return [(h, h + 2 * kv), (h, h), (h, 2 * inter), (inter, h)], cfg["num_hidden_layers"], cfg["vocab_size"] * h


def linear_throughput(path: Path, threads: int, tokens: tuple[int, ...] = (8, 32, 128, 512)) -> dict[str, float]:
    """TFLOP/s of one decoder layer's four projections (the model's shapes, in the engine's dtype) at
    `tokens` rows per product: what an engine step of that many tokens can reach in its matmuls, the
    roofline to read `engine_flops_over_peak` against (best of 5)."""
    import torch
    import torch.nn.functional as F

    dtype = engine_dtype()
    shapes = model_shapes(path)[0]
    weights = [torch.randn(o, i, dtype=dtype) for i, o in shapes]
    out = {}
    with torch_threads(threads):
        for m in tokens:
            xs = [torch.randn(m, i, dtype=dtype) for i, _ in shapes]
            reps = max(3, 4096 // m)
            best = 0.0
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(reps):
                    for x, w in zip(xs, weights, strict=True):
                        F.linear(x, w)
                best = max(best, 2 * m * sum(i * o for i, o in shapes) * reps / (time.perf_counter() - t))
            out[str(m)] = best / 1e12
    return out


def model_params(path: Path) -> tuple[int, int]:
    """(parameters of the decoder layers' linear maps, parameters of the lm_head)."""
    shapes, layers, head = model_shapes(path)
    return layers * sum(i * o for i, o in shapes), head


def measure(iterations: int, overrides: list[str], peaks: dict[int, float],
            linear: dict[int, dict[str, float]]) -> dict[str, Any]:
    from reciprocity.config import load_config
    from reciprocity.train import Trainer

    tmp = Path(tempfile.mkdtemp(prefix="bench-iteration-"))
    cfg = load_config(ROOT / "configs/smoke.yaml", [
        f"iterations={iterations}", f"runs_dir={tmp}", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
        "checkpoint.every=0", "run_name=bench", *overrides])
    meter = TreeMeter()
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    startup = time.perf_counter() - t0
    view = trainer.view = recorder(meter)
    status = "FAILED"
    try:
        history = list(trainer.iterations())
        engines = [s.get("engine", {}) for s in trainer.workers.stats()]
        status = "FINISHED"
    finally:
        trainer.tracker.finish(status)
        trainer.close()
        meter.close()
    wall = time.perf_counter() - t0
    warm = history[1:] or history
    phases = view.phases[1:] or view.phases

    def mean(key: str) -> float:
        return float(np.mean([h.get(key, 0.0) for h in warm]))

    iteration = mean("seconds/iteration")
    generation = mean("rollout/worker_seconds_max")
    compute = mean("learner/time_forward_backward_s") + mean("learner/time_step_s")
    out: dict[str, Any] = {
        "overrides": overrides,
        "iterations": len(history),
        "games_per_iteration": cfg.rollout.games_per_iteration,
        "seconds_startup": startup,
        "seconds_iteration": iteration,
        "seconds_rollout": mean("seconds/rollout"),
        "seconds_generation": generation,
        "seconds_transfer": mean("seconds/transfer"),
        "seconds_learn": mean("seconds/learn"),
        "seconds_learner_compute": compute,
        "seconds_to_tensors": mean("learner/time_to_tensors_s"),
        "seconds_publish": mean("seconds/publish"),
        "generated_tokens": mean("generated_tokens"),
        "rollout_tokens_per_s": mean("rollout/tokens_per_s"),
        "learner_tokens_per_s": mean("learner/tokens_per_s"),
        "overhead_ratio": (iteration - generation - compute) / iteration,
        "learner_peak_rss_gb": meter.learner_peak / 2**30,
        "cores": CORES,
    }
    totals = np.zeros(4)
    for name in sorted({n for p in phases for n in p}):
        wall_s, cpu_s, busy, total = np.sum([p[name] for p in phases if name in p], axis=0)
        totals += (wall_s, cpu_s, busy, total)
        out[f"seconds_phase_{name}"] = wall_s / len(phases)
        out[f"cpu_util_{name}"] = cpu_s / (wall_s * CORES) if wall_s else 0.0
        out[f"machine_util_{name}"] = busy / total if total else 0.0
    out["cpu_util_iteration"] = totals[1] / (totals[0] * CORES) if totals[0] else 0.0
    out["machine_util_iteration"] = totals[2] / totals[3] if totals[3] else 0.0
    prompt = sum(e.get("prompt_tokens", 0) for e in engines)
    cached = sum(e.get("cached_prompt_tokens", 0) for e in engines)
    decoded = sum(e.get("generated_tokens", 0) for e in engines)
    rollout_s = sum(h.get("seconds/rollout", 0.0) for h in history)
    threads = min((e.get("torch_threads") or 1 for e in engines), default=1)
    if prompt:
        layers, head = model_params(Path(cfg.model.path))
        flops = 2 * (layers * (prompt - cached + decoded) + head * decoded)  # logits only where sampled
        peak = peaks.get(threads) or max(peaks.values())
        out.update({"engine_prompt_tokens": prompt, "engine_cached_prompt_tokens": cached,
                    "engine_decode_tokens": decoded, "engine_tflop_s": flops / rollout_s / 1e12,
                    "engine_torch_threads": threads, "engine_peak_tflop_s": peak / 1e12,
                    "engine_flops_over_peak": flops / rollout_s / peak,
                    "engine_linear_tflop_s_at_tokens_per_step": linear.get(threads)})
    out["wall_seconds_total"] = wall
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=3)
    layouts = ap.add_mutually_exclusive_group()
    layouts.add_argument("--compare", action="store_true",
                         help="previous layout (one thread per phase), then the default; what runs without a flag")
    layouts.add_argument("--single", action="store_true", help="only the default layout with the overrides")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    from reciprocity.config import load_config

    peaks = engine_peaks()  # before any run: an idle machine
    model = Path(load_config(ROOT / "configs/smoke.yaml", list(args.overrides)).model.path)
    linear = {t: linear_throughput(model, t) for t in peaks}
    out: dict[str, Any] = {"name": "iteration", "config": "configs/smoke.yaml",
                           "matmul_peak_tflop_s": {str(t): p / 1e12 for t, p in peaks.items()}}
    if not args.single:
        previous = measure(args.iterations, [*PREVIOUS_LAYOUT, *args.overrides], peaks, linear)
        new = measure(args.iterations, list(args.overrides), peaks, linear)
        ratio = {f"seconds_{k}_new_over_previous_ratio": new[f"seconds_{k}"] / previous[f"seconds_{k}"]
                 for k in ("iteration", "learn")}
        out.update({"previous": previous, "new": new, **ratio})
    else:
        out.update(measure(args.iterations, list(args.overrides), peaks, linear))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
