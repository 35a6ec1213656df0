"""What `reciprocity train` shows: its own lines on the console, the libraries' logs in a file,
live progress on a terminal and one line per phase elsewhere."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console
from support import ROOT, tiny_overrides

from reciprocity import progress, quiet

# A library's log line: vLLM/Ray/DeepSpeed/transformers records, Ray's prefixes for worker output,
# Python warnings, torch.distributed and DeepSpeed rank prefixes.
FOREIGN = re.compile(
    r"^\s*(INFO|WARNING|ERROR|DEBUG|CRITICAL)\b"
    r"|\b(INFO|WARNING|ERROR|DEBUG) \d\d-\d\d \d\d:\d\d"  # vLLM: "INFO 12-02 06:21:02 [file.py:12]"
    r"|\d{4}[-/]\d\d[-/]\d\d[ T]\d\d:\d\d:\d\d([,.]\d+)?\s+(INFO|WARNING|ERROR|DEBUG)"  # Ray, MLflow, logging
    r"|\((\w+ )?pid=\d+"  # Ray's worker prefix: "(RolloutWorker pid=123)", "(pid=123)"
    r"|\[rank\d+\]|\[(INFO|WARNING)\]"
    r"|\b\w*Warning: "  # warnings.warn: "FutureWarning: ..."
    r"|Triton|tokenizers|deprecated"
)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][AB012]|\x1b[78=>]")


# -- pure parts ------------------------------------------------------------------------------------
def test_eta_counts_the_iterations_left_less_the_running_ones_time() -> None:
    assert progress.eta_seconds(0, 3, [], 10.0) is None
    assert progress.eta_seconds(1, 3, [100.0], 30.0) == pytest.approx(170.0)
    assert progress.eta_seconds(2, 3, [100.0, 50.0], 200.0) == 0.0
    assert progress.eta_seconds(3, 3, [1.0], 5.0) == 0.0
    assert progress.clock(None) == "--:--" and progress.clock(75) == "01:15" and progress.clock(3725) == "1:02:05"


def test_worker_progress_sums_and_reads_as_games_and_decisions() -> None:
    p = progress.sum_progress([{"planned": 8, "games": 3, "decisions": 40, "seconds": 10.0},
                               {"planned": 8, "games": 5, "decisions": 60, "seconds": 20.0}])
    assert p == {"planned": 16, "games": 8, "decisions": 100, "seconds": 20.0}
    assert progress.rollout_detail(p) == "8/16 games, 100 decisions (5.0/s)"


def test_without_a_terminal_each_phase_prints_one_line() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    view = progress.RunProgress(console, total=2, done=0)
    assert not view.live
    view.start_iteration(0)
    view.phase("rollout", total=16)
    for games in (4, 8, 16):  # updates print nothing: no stream of redraws in a log
        view.update(completed=games, detail=f"{games}/16 games")
    view.phase("learn")
    view.update(completed=3, total=3, detail="3/3 micro-batches")
    view.phase("publish", detail="version 1 to 1 worker(s)")
    view.warn("1 rollout share(s) replayed after a worker restart")
    view.end_iteration("coop 0.5")
    view.close()
    lines = out.getvalue().splitlines()
    assert [re.sub(r" in \d+\.\ds$", "", line) for line in lines[:4]] == [
        "it 0 rollout: 16/16 games", "it 0 learn: 3/3 micro-batches",
        "warning: 1 rollout share(s) replayed after a worker restart",  # at once, the running phase's line at its end
        "it 0 publish: version 1 to 1 worker(s)"]
    assert "it 0: coop 0.5" in lines[4] and len(lines) == 5


def test_library_logs_go_to_the_file_and_own_lines_to_the_console(tmp_path: Path,
                                                                  capfd: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "logs" / "x.log"
    with quiet.library_logs_to(log) as out:
        os.write(1, b"a library print on fd 1\n")
        os.write(2, b"a C++ library on fd 2\n")
        subprocess.run([sys.executable, "-c", "print('a child process')"], check=True)
        out.write("our line\n")
        assert quiet.log_file() == log
    assert quiet.log_file() is None
    captured = capfd.readouterr()
    assert captured.out == "our line\n" and captured.err == ""
    assert log.read_text().splitlines() == ["a library print on fd 1", "a C++ library on fd 2", "a child process"]
    with quiet.library_logs_to(None) as out:  # --verbose: nothing moves
        assert out is sys.stdout and quiet.log_file() is None
        print("shown")
    assert capfd.readouterr().out == "shown\n"


# -- a real run on a terminal ------------------------------------------------------------------------
def _run_on_a_pty(argv: list[str], cwd: Path, timeout_s: float) -> list[tuple[float, str]]:
    """Run `argv` with a pseudo-terminal as stdout and stderr; (seconds since start, text) chunks."""
    import pty
    import select

    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "150", "LINES": "40", "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks: list[tuple[float, str]] = []
    try:
        while time.monotonic() - t0 < timeout_s:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                chunks.append((time.monotonic() - t0, data.decode("utf-8", "replace")))
            elif proc.poll() is not None:
                break
        proc.wait(timeout=max(1.0, timeout_s - (time.monotonic() - t0)))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert proc.returncode == 0, "".join(c for _, c in chunks)[-4000:]
    return chunks


def screen_lines(chunks: list[tuple[float, str]]) -> list[str]:
    """The text as lines: escape sequences removed, carriage-return redraws split into lines."""
    text = ANSI.sub("", "".join(c for _, c in chunks))
    return [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]


@pytest.mark.slow
def test_train_on_a_terminal_shows_only_its_own_lines_and_live_progress(tiny_model_dir: Path,
                                                                         tmp_path: Path) -> None:
    overrides = [*tiny_overrides(tiny_model_dir, tmp_path), "iterations=1", "checkpoint.every=1",
                 "rollout.games_per_iteration=48"]  # 6 waves of 8 games: a rollout of several polls
    chunks = _run_on_a_pty([sys.executable, "-m", "reciprocity", "train", "--config", "configs/smoke.yaml",
                            *overrides], ROOT, timeout_s=900)
    (tmp_path / "console.txt").write_text("".join(c for _, c in chunks))
    lines = screen_lines(chunks)
    foreign = [line for line in lines if FOREIGN.search(line)]
    assert foreign == [], foreign[:20]
    assert lines[0].startswith("library logs: ")
    log = Path(lines[0].removeprefix("library logs: ").strip())
    assert log.parent == tmp_path / "runs" / "tiny" / "logs"
    logged = log.read_text()  # the libraries did log, to the file: vLLM's engine, Ray, the learner's rank
    assert "vllm" in logged.lower() and len([x for x in logged.splitlines() if FOREIGN.search(x)]) > 20
    # live progress: the rollout row is redrawn while the games run, with its counts
    rollout = [(t, c) for t, c in chunks if "decisions" in ANSI.sub("", c)]
    assert rollout, "no rollout progress row"
    assert any("micro-batches" in line for line in lines) and any(" run " in f" {line} " for line in lines)
    first, last = rollout[0][0], rollout[-1][0]  # the rollout's span: the terminal is written to every < 3 s
    times = [t for t, _ in chunks if first <= t <= last]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert len(rollout) >= 2 and max(gaps, default=0.0) < 3.0, gaps
    counts = [int(n) for _, c in rollout for n in re.findall(r"(\d+) decisions", ANSI.sub("", c))]
    assert len(set(counts)) >= 2, counts  # the counts move
    assert any(re.match(r"^\S*\s*it 0: ", line) or "it 0: " in line for line in lines)
    assert any(line.startswith("MLflow run ") for line in lines)
