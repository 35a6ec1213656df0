"""Helpers shared by test modules (no test module imports another): IPD trajectories built with the
real tokenizer, the token engine test double, the tiny-model training overrides and the shell-line
parsers of the cluster checks. Fixtures live in conftest.py; vLLM helpers in vllm_support.py."""

from __future__ import annotations

import asyncio
import contextlib
import shlex
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "ray_cluster.yaml"

# ------------------------------------------------------------------------------- IPD trajectories
PAYOFF = {("C", "C"): (3, 3), ("C", "D"): (0, 5), ("D", "C"): (5, 0), ("D", "D"): (1, 1)}
IPD_REGEX = "(<A>|<B>)"
RULES = (
    "You are playing an iterated game against another agent. Each round you both choose <A> or <B> "
    "at the same time. Answer exactly <A> or <B>."
)


def ipd_game(
    tok: Any,
    game_id: int,
    group_id: int,
    rng: Any,
    n_rounds: int = 3,
    trainable: tuple[bool, bool] = (True, True),
    guided: bool = True,
    rules: str = RULES,
    version: int = 0,
) -> list[Any]:
    """Both seats of one IPD game: prompt, then per round a generated `<A>`/`<B>` + eos and the
    next user turn. Engine log-probs: log 0.5 on the choice token, 0 on forced tokens (guided)."""
    import numpy as np

    from actors.trajectories import SeatTrajectory

    eos = tok.eos_token_id
    seats = [
        SeatTrajectory("run", 0, game_id, group_id, "ipd", 0, s, "learner" if trainable[s] else "scripted",
                       version, "x", version, trainable[s], 1.0)
        for s in (0, 1)
    ]
    prompt = tok.apply_chat_template([{"role": "user", "content": rules}], add_generation_prompt=True,
                                     tokenize=True, return_dict=False)
    for s in seats:
        if s.trainable:
            s.add_prompt(prompt)
    for t in range(n_rounds):
        acts = [rng.choice(["C", "D"]) for _ in (0, 1)]
        rewards = PAYOFF[(acts[0], acts[1])]
        for i, s in enumerate(seats):
            label = "<A>" if acts[i] == "C" else "<B>"
            s.rewards.append(float(rewards[i]))
            s.actions.append(acts[i])
            s.n_decisions += 1
            if not s.trainable:
                continue
            ids = tok.encode(label, add_special_tokens=False) + [eos]
            lps = [0.0, float(np.log(0.5))] + [0.0] * (len(ids) - 2) if guided else list(-rng.random(len(ids)))
            s.add_generated(ids, lps, t, version)
            s.guided.append(guided)
            s.decision_regex.append(IPD_REGEX if guided else "")
            other = "<A>" if acts[1 - i] == "C" else "<B>"
            turn = f"\n<|im_start|>user\nLast round, the other agent played {other}.<|im_end|>\n<|im_start|>assistant\n"
            s.add_prompt(tok.encode(turn, add_special_tokens=False))
    return seats


def ipd_table(tok: Any, n_games: int = 4, seed: int = 0, group_size: int = 2, **kw: Any) -> Any:
    """`n_games` IPD games (both seats each) as one Arrow table; group = game // group_size."""
    import numpy as np
    import pyarrow as pa

    from actors.trajectories import to_batch

    rng = np.random.default_rng(seed)
    rows = [r for g in range(n_games) for r in ipd_game(tok, g, g // group_size, rng, **kw)]
    return pa.Table.from_batches([to_batch(rows)])


# ------------------------------------------------------------------------------- token engine double
GUIDED = {"(<A>|<B>)": ("<A>", "<B>")}  # tests may swap an entry (restoring it after)


def guided_answer(regex: str, n: int) -> str:
    if regex in GUIDED:
        return GUIDED[regex][n % 2]
    if "message_start" in regex:
        return "<<message_start>>My hand is rock.<<message_end>>"
    if "proposal_start" in regex:
        return f"<<proposal_start>> {n % 11} <<proposal_end>>"
    return f"Proposal: {n % 11} hats, 5 books, 10 balls"


class FakeEngine:
    """A token engine test double: unguided samples are `garbage`; guided samples are valid
    answers picked by the prompt length. Generated ids are the answer's tokens plus the stop token."""

    def __init__(self, template: Any, garbage: str = "Sure! Let me think about it.") -> None:
        self.template, self.garbage = template, garbage
        self.loaded: set[str] = set()
        self.calls: list[tuple[list[int], Any, str | None]] = []

    async def generate(self, prompt_token_ids: list[int], sampling: Any, adapter: str | None) -> Any:
        from actors.engine import Generation, UnknownAdapterError

        if adapter is not None and adapter not in self.loaded:
            raise UnknownAdapterError(adapter)
        self.calls.append((list(prompt_token_ids), sampling, adapter))
        await asyncio.sleep(0)
        text = guided_answer(sampling.regex, len(prompt_token_ids)) if sampling.regex else self.garbage
        ids = self.template.encode(text) + [self.template.tokenizer.eos_token_id]
        return Generation(ids, [-0.25] * len(ids), text, adapter, "stop")

    async def load_adapter(self, version: Any) -> str:
        self.loaded.add(version.key)
        return version.key

    async def unload_adapter(self, key: str) -> None:
        self.loaded.discard(key)


def fake_engine(config: dict[str, Any]) -> FakeEngine:
    """A RolloutWorker `engine_factory` ("support:fake_engine"): a FakeEngine on the config's model."""
    from actors.chat import ChatTemplate

    return FakeEngine(ChatTemplate.from_pretrained(config["model"]))


# ------------------------------------------------------------------------------- training runs
def empty_mlflow_db(path: Path, template_dir: Path) -> Path:
    """An MLflow SQLite store at `path` (unless one is there): a copy of an empty one that MLflow made
    once in `template_dir`. Making one runs MLflow's schema migrations, 3-6 s on 2 cores, for every
    training run of the suite; the copy is the same file."""
    import shutil

    template = template_dir / "mlflow-empty.db"
    if not template.exists():
        from mlflow.tracking import MlflowClient

        tmp = template.with_suffix(".tmp.db")
        MlflowClient(f"sqlite:///{tmp}").search_experiments()
        tmp.rename(template)
    if not path.exists():
        shutil.copyfile(template, path)
    return path


def tiny_overrides(tiny_model_dir: Path, tmp_path: Path, run_name: str = "tiny") -> list[str]:
    """Config overrides of a 2-iteration training run on the tiny model, all files under tmp_path
    (its MLflow store starts as a copy of an empty one: `empty_mlflow_db`)."""
    empty_mlflow_db(tmp_path / "mlflow.db", tiny_model_dir.parent)
    return [
        f"model.path={tiny_model_dir}",
        "model.max_model_len=2048",
        f"runs_dir={tmp_path / 'runs'}",
        f"run_name={run_name}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.system_metrics=false",
        "iterations=2",
        "rollout.games_per_iteration=4",
        "rollout.concurrency=8",
        "rollout.kv_cache_gib=1",
        "rollout.probe_tolerance=0.5",
        "buffer.snapshot_every=1",
        "learner.micro_batch_tokens=4096",
        "learner.lr=1e-3",
        "checkpoint.every=2",
        "checkpoint.keep=2",
    ]


# ------------------------------------------------------------------------------- shell lines
SEPARATORS = {"&&", "||", ";", "&", "|", "(", ")"}


def simple_commands(line: str) -> list[list[str]]:
    """Split one shell line into its simple commands (argv lists), quotes kept, redirections dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    out: list[list[str]] = [[]]
    tokens = iter(lexer)
    for tok in tokens:
        if tok in SEPARATORS:
            out.append([])
        elif set(tok) <= set("<>&") and set(tok) & set("<>"):  # a redirection: drop it and its target
            next(tokens, None)
            if out[-1] and out[-1][-1].isdigit():  # the `2` of `2>/dev/null`
                out[-1].pop()
        else:
            out[-1].append(tok)
    return [argv for argv in out if argv]


def find_commands(lines: list[str], *prefix: str) -> list[list[str]]:
    """The argv after `prefix` of each simple command that starts with it (path-qualified ok)."""
    found = []
    for line in lines:
        for argv in simple_commands(line):
            while argv and argv[0] in ("nohup", "setsid"):
                argv = argv[1:]
            if (len(argv) >= len(prefix) and Path(argv[0]).name == prefix[0]
                    and tuple(argv[1:len(prefix)]) == prefix[1:]):
                found.append(argv[len(prefix):])
    return found


def find_command(lines: list[str], *prefix: str) -> list[str]:
    found = find_commands(lines, *prefix)
    assert len(found) == 1, f"expected one `{' '.join(prefix)}` command, found {found}"
    return found[0]


def parse_click(command: Any, args: list[str]) -> dict[str, Any]:
    """Parse `args` with a click command's own parser without running it (unknown flags fail)."""
    with command.make_context(command.name or "cmd", list(args)) as ctx:
        return dict(ctx.params)


# ------------------------------------------------------------------------------- a Ray cluster of one test
def cluster_processes(temp_dir: str) -> list[Any]:
    """The processes of the Ray cluster started with `ray start --temp-dir=temp_dir`: every process
    whose command line names that directory (GCS, raylet, dashboard, agents, workers) and all their
    descendants (a worker's vLLM engine, a job's driver). Other clusters on the machine are not in it."""
    import psutil

    found: dict[int, Any] = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if temp_dir in " ".join(p.info["cmdline"] or []):
                found[p.pid] = p
                found.update((c.pid, c) for c in p.children(recursive=True))
        except psutil.Error:
            continue
    return list(found.values())


def stop_cluster(temp_dir: str, grace_s: float = 15.0) -> list[Any]:
    """Stop only the Ray cluster of `temp_dir` (`ray stop` has no scope: it stops every Ray of the
    machine, other people's too): SIGTERM, then SIGKILL what is left after `grace_s`. Returns the
    processes that were stopped."""
    import psutil

    procs = cluster_processes(temp_dir)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=grace_s)
    return procs


# ------------------------------------------------------------------------------- learner
def learner_config(model_dir: Path | str, **overrides: Any) -> Any:
    """A LearnerConfig as the driver builds it (reciprocity.learner_settings.learner_config) from a default run
    config, for `model_dir`, with `overrides` (fields of LearnerConfig)."""
    import dataclasses

    from reciprocity.config import Config
    from reciprocity.learner_settings import learner_config as from_run_config

    return dataclasses.replace(from_run_config(Config()), model_dir=str(model_dir), **overrides)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
