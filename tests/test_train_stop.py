"""Stopping a run: SIGTERM (`kill`, `timeout`, a scheduler) ends `reciprocity train` as Ctrl-C does.
The loop's control flow around a stand-in trainer (the loop's own logic, no Ray): the MLflow run is
marked KILLED, the actors are closed, the previous SIGTERM handler is back, the interrupt reaches
the caller (the CLI, which then shuts the local Ray down)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from reciprocity import train
from reciprocity.config import load_config


class _Tracker:
    def __init__(self) -> None:
        self.status: str | None = None
        self.run_id, self.uri = "r", "sqlite:///x.db"

    def finish(self, status: str = "FINISHED") -> None:
        self.status = status


class _Trainer:
    """Iterates until `stop_at`, where the process SIGTERMs itself."""

    made: list[_Trainer] = []

    def __init__(self, cfg: Any, address: Any = None, resume: Any = None) -> None:
        self.cfg, self.iteration, self.run_dir = cfg, 0, Path("runs/x")
        self.tracker, self.closed, self.history = _Tracker(), False, []
        self.stop_at: int | None = _Trainer.stop_at
        _Trainer.made.append(self)

    def iterations(self):
        while self.iteration < self.cfg.iterations:
            if self.iteration == self.stop_at:
                os.kill(os.getpid(), signal.SIGTERM)
            self.iteration += 1
            m = {"iteration": self.iteration - 1, "seconds/iteration": 1.0}
            self.history.append(m)
            yield m

    def save_checkpoint(self) -> None: ...

    def log_adapter(self, ref: Any) -> None: ...

    def close(self) -> None:
        self.closed = True


class _Pool:
    class versions:  # noqa: N801 (an actor method's `.remote`)
        @staticmethod
        def remote(iteration: int) -> list[str]:
            return ["v"]


@pytest.fixture
def fake_trainer(monkeypatch: pytest.MonkeyPatch):
    _Trainer.made = []
    monkeypatch.setattr(train, "Trainer", _Trainer)
    monkeypatch.setattr(train.ray, "get", lambda x: x)
    monkeypatch.setattr(_Trainer, "pool", _Pool, raising=False)
    return _Trainer


def _cfg():
    return load_config(Path("configs/smoke.yaml"), ["iterations=5", "checkpoint.every=1"])


def test_sigterm_stops_the_run_as_killed_and_closes_the_actors(fake_trainer) -> None:
    def before(signum: int, frame: Any) -> None:
        raise AssertionError("the run's own handler should be in place")

    old = signal.signal(signal.SIGTERM, before)
    try:
        fake_trainer.stop_at = 2
        with pytest.raises(KeyboardInterrupt):
            train.run(_cfg())
        (t,) = fake_trainer.made
        assert t.iteration == 2 and len(t.history) == 2  # stopped as iteration 2 began
        assert t.tracker.status == "KILLED" and t.closed
        assert signal.getsignal(signal.SIGTERM) is before  # restored
    finally:
        signal.signal(signal.SIGTERM, old)


def test_a_run_that_ends_is_finished_and_restores_the_handler(fake_trainer) -> None:
    fake_trainer.stop_at = None
    before = signal.getsignal(signal.SIGTERM)
    history = train.run(_cfg())
    (t,) = fake_trainer.made
    assert [h["iteration"] for h in history] == [0, 1, 2, 3, 4]
    assert t.tracker.status == "FINISHED" and t.closed
    assert signal.getsignal(signal.SIGTERM) is before
