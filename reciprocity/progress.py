"""Live progress of a training run: what `reciprocity train` shows while an iteration runs.

Two rows on a terminal (rich): the run (iterations done, elapsed, an ETA for the whole run) and the
phase now running: rollout (games finished of planned, decisions, decisions per second), learn
(micro-batches done), publish, evaluate, checkpoint. The driver feeds it from cheap polls of the
actors (`RolloutWorker.progress`, `Learner.progress`) every `POLL_S` seconds while it waits.

Where the output is not a terminal (CI, `ray job submit` logs) the rows would print as a stream of
redraws, so each finished phase prints one line instead (`it 0 rollout: 16/16 games, 320 decisions
(2.1/s) in 152.0s`).

`Silent` is the same interface doing nothing: a Trainer driven by code (tests, benchmarks) shows
nothing unless given a `RunProgress`.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn
from rich.spinner import Spinner

POLL_S = 1.0  # seconds between polls of the actors while the driver waits


def spinner(console: Console, text: str) -> Live:
    """A transient spinner line (rich's `console.status`, without its redirection of sys.stdout and
    sys.stderr, which would send library logs to the console while it spins)."""
    return Live(Spinner("dots", text=text), console=console, transient=True, refresh_per_second=8,
                redirect_stdout=False, redirect_stderr=False)


def eta_seconds(done: int, total: int, iteration_seconds: list[float], in_iteration_s: float) -> float | None:
    """Seconds left in the run: the mean of the finished iterations' times for every iteration not
    finished, less what the running one has already taken; None before an iteration has finished."""
    if not iteration_seconds:
        return None
    mean = sum(iteration_seconds) / len(iteration_seconds)
    return max(0.0, (total - done) * mean - in_iteration_s) if done < total else 0.0


def clock(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


def rollout_detail(p: dict[str, float]) -> str:
    """`12/16 games, 340 decisions (2.3/s)` from summed worker progress."""
    rate = p["decisions"] / p["seconds"] if p.get("seconds") else 0.0
    return f"{int(p['games'])}/{int(p['planned'])} games, {int(p['decisions'])} decisions ({rate:.1f}/s)"


def sum_progress(parts: list[dict[str, float]]) -> dict[str, float]:
    """Workers' progress summed (seconds: the longest)."""
    out = {"planned": 0.0, "games": 0.0, "decisions": 0.0, "seconds": 0.0}
    for p in parts:
        for k in ("planned", "games", "decisions"):
            out[k] += float(p.get(k, 0))
        out["seconds"] = max(out["seconds"], float(p.get("seconds", 0.0)))
    return out


class Silent:
    """The progress interface, doing nothing."""

    def start_iteration(self, iteration: int) -> None: ...

    def phase(self, name: str, total: float | None = None, detail: str = "") -> None: ...

    def update(self, completed: float | None = None, total: float | None = None, detail: str = "") -> None: ...

    def end_iteration(self, line: str) -> None: ...

    def warn(self, text: str) -> None: ...

    def tick(self) -> None: ...

    def close(self) -> None: ...


class RunProgress(Silent):
    def __init__(self, console: Console, total: int, done: int = 0, live: bool | None = None) -> None:
        self.console = console
        self.total, self.done = total, done
        self.live = console.is_terminal if live is None else live
        self.iteration = done
        self.iteration_seconds: list[float] = []
        self.t_run = self.t_iter = self.t_phase = time.monotonic()
        self.name, self.detail, self.phase_total = "", "", None
        self._bars: Progress | None = None
        if self.live:
            # no redirection of sys.stdout/sys.stderr: a library's handler bound while the rows show
            # would print through the console instead of into the log file
            self._bars = Progress(TextColumn("{task.description:>10}"), BarColumn(bar_width=30),
                                  TextColumn("{task.fields[detail]}"), console=console, refresh_per_second=4,
                                  transient=True, redirect_stdout=False, redirect_stderr=False)
            self._run = self._bars.add_task("run", total=total, completed=done, detail="")
            self._phase = self._bars.add_task("", total=None, detail="")
            self._bars.start()

    # -- the run ---------------------------------------------------------------------------
    def start_iteration(self, iteration: int) -> None:
        self.iteration = iteration
        self.t_iter = time.monotonic()
        self.tick()

    def end_iteration(self, line: str) -> None:
        self._end_phase()
        self.iteration_seconds.append(time.monotonic() - self.t_iter)
        self.done += 1
        self.console.log(f"it {self.iteration}: {line}")
        self.t_iter = time.monotonic()
        self.tick()

    def run_detail(self) -> str:
        now = time.monotonic()
        eta = eta_seconds(self.done, self.total, self.iteration_seconds, now - self.t_iter)
        return (f"iteration {min(self.done + 1, self.total)}/{self.total}  elapsed {clock(now - self.t_run)}"
                f"  ETA {clock(eta) if eta is not None else 'after the first iteration'}")

    # -- phases ----------------------------------------------------------------------------
    def phase(self, name: str, total: float | None = None, detail: str = "") -> None:
        self._end_phase()
        self.name, self.phase_total, self.detail = name, total, detail
        self.t_phase = time.monotonic()
        if self._bars is not None:
            self._bars.reset(self._phase, total=total, completed=0, description=name, detail=detail)
        self.tick()

    def update(self, completed: float | None = None, total: float | None = None, detail: str = "") -> None:
        if total is not None:
            self.phase_total = total
        self.detail = detail or self.detail
        if self._bars is not None:
            self._bars.update(self._phase, completed=completed, total=total, detail=self.detail)
        self.tick()

    def tick(self) -> None:
        """Refresh the run row (elapsed, ETA); called on every update and poll."""
        if self._bars is not None:
            self._bars.update(self._run, completed=self.done, detail=self.run_detail())

    def _end_phase(self) -> None:
        if self.name and not self.live:
            detail = f"{self.detail} " if self.detail else ""
            self.console.print(f"it {self.iteration} {self.name}: {detail}in {time.monotonic() - self.t_phase:.1f}s",
                               highlight=False)
        self.name, self.detail = "", ""

    def warn(self, text: str) -> None:
        """A warning that matters to the user: one line, above the live rows."""
        self.console.print(f"[yellow]warning:[/] {text}", highlight=False)

    def close(self) -> None:
        self._end_phase()
        if self._bars is not None:
            self._bars.stop()
            self._bars = None


def describe(metrics: dict[str, Any]) -> str:
    """Warnings of one iteration's metrics that matter to the user (none: empty)."""
    notes = []
    if metrics.get("rollout/replays"):
        notes.append(f"{int(metrics['rollout/replays'])} rollout share(s) replayed after a worker restart")
    for key, value in metrics.items():
        if key.endswith("api_forfeits") and value:
            notes.append(f"{int(value)} API decision(s) forfeited ({key})")
    return "; ".join(notes)
