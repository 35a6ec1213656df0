"""The quiet console: a command prints its own lines; the libraries' logs go to a file.

vLLM, Ray, DeepSpeed, transformers and torch log from three kinds of process: the driver (this
one), the Ray workers (rollout workers, learner ranks, the pool, Serve's replicas) and the processes
those start (vLLM's engine core). Filtering loggers by name misses C++ logs, `print`s, `warnings`
and child processes, so the redirection is at the file-descriptor level:

- in the driver, `library_logs_to(path)` points fd 2 (and fd 1 for `train`) at the log file and
  hands the command a stream on the real stdout for its own lines (progress, tables, warnings that
  matter to the user, one line each);
- `init_ray` (reciprocity.launcher) then starts the Ray workers with `log_to_driver=False` and the
  runtime-env setup hook `redirect_process_output`, which points the worker's fds 1 and 2 at the same
  file (`$RECIPROCITY_LOG_FILE`, appended to by every process; the engine core inherits the fds).

`--verbose` skips all of it: the library logs reach the console as before (Ray's `log_to_driver`).
On a cluster each node appends to its own copy of the path (runs_dir exists on every node); a node
where the file cannot be opened keeps Ray's own worker log files (/tmp/ray/session_*/logs).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

LOG_ENV = "RECIPROCITY_LOG_FILE"
SETUP_HOOK = "reciprocity.quiet.redirect_process_output"
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND


def log_file() -> Path | None:
    """The file library logs go to now (None: verbose, or outside a command)."""
    path = os.environ.get(LOG_ENV)
    return Path(path) if path else None


def default_log_path(directory: Path, command: str) -> Path:
    """`<directory>/logs/<command>-<time>.log`."""
    return Path(directory).absolute() / "logs" / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}.log"


@contextlib.contextmanager
def log_to(path: Path | None) -> Iterator[None]:
    """Quiet mode on, with `path` as the log file, for the code inside (None: verbose, no change):
    commands whose engine phase redirects itself (evaluate, play) need only this."""
    before = os.environ.get(LOG_ENV)
    if path is not None:
        os.environ[LOG_ENV] = str(Path(path).absolute())
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(LOG_ENV, None)
        else:
            os.environ[LOG_ENV] = before


@contextlib.contextmanager
def library_logs_to(path: Path | None, stdout: bool = True) -> Iterator[TextIO]:
    """Inside the block, fd 2 (and fd 1 with `stdout`) append to `path`, and so do the Ray workers
    started inside it; yields the stream for the command's own lines (the real stdout). With
    `path` None (verbose) nothing changes and the stream is sys.stdout."""
    if path is None:
        yield sys.stdout
        return
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, _FLAGS, 0o644)
    fds = (1, 2) if stdout else (2,)
    saved = {n: os.dup(n) for n in fds}
    user = open(os.dup(saved[1]), "w", buffering=1, closefd=True) if stdout else sys.stdout  # noqa: SIM115
    try:
        with log_to(path):
            for n in fds:
                os.dup2(fd, n)
            yield user
    finally:
        with contextlib.suppress(ValueError, OSError):
            sys.stdout.flush()
            sys.stderr.flush()
        for n, old in saved.items():
            os.dup2(old, n)
            os.close(old)
        os.close(fd)
        if user is not sys.stdout:
            user.close()


def redirect_process_output() -> None:
    """Ray's worker_process_setup_hook: this worker's fds 1 and 2 (Python, C++ and child processes
    alike) append to `$RECIPROCITY_LOG_FILE`. Without the variable, or when the file cannot be
    opened on this node, the worker keeps Ray's own log files."""
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    try:
        fd = os.open(path, _FLAGS, 0o644)
    except OSError:
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(ValueError, OSError):
            stream.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    # Ray may have replaced sys.stdout/sys.stderr with its own files: write to the fds again
    if getattr(sys.stdout, "fileno", None) is None or _fileno(sys.stdout) != 1:
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    if getattr(sys.stderr, "fileno", None) is None or _fileno(sys.stderr) != 2:
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115


def _fileno(stream: TextIO) -> int:
    try:
        return stream.fileno()
    except (OSError, ValueError, AttributeError):
        return -1
