"""`reciprocity doctor`: what is installed, whether the model is ready, what the machine can do."""

from __future__ import annotations

import importlib
import os
import platform
from pathlib import Path

from rich.console import Console
from rich.table import Table

from reciprocity.models import is_prepared, model_sha

DEFAULT_MODEL = Path("models/smollm2-135m-instruct")
PACKAGES = ("torch", "vllm", "ray", "deepspeed", "peft", "transformers", "mlflow", "pyarrow")


def _version(name: str) -> tuple[bool, str]:
    try:
        mod = importlib.import_module(name)
    except Exception as e:  # a broken install raises all sorts of errors on import
        return False, f"import failed: {type(e).__name__}: {str(e)[:80]}"
    return True, str(getattr(mod, "__version__", "?"))


def _bf16() -> tuple[bool, str]:
    """Whether bf16 matmuls work, and whether `dtype: auto` picks bf16 here (a GPU with bf16, or a CPU
    with native bf16: actors.device, the check the engine and the learner make)."""
    try:
        import torch

        from actors.device import cpu_has_bf16

        native = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else cpu_has_bf16()
        x = torch.ones(8, 8, dtype=torch.bfloat16)
        ok = bool(torch.allclose((x @ x).float(), torch.full((8, 8), 8.0)))
        auto = "dtype auto: bfloat16 (native)" if native else "dtype auto: float32 (no native bf16)"
        return ok, f"bf16 matmul works; {auto}" if ok else "bf16 matmul gives wrong results"
    except Exception as e:
        return False, f"bf16 check failed: {e}"


def _gpus() -> str:
    try:
        import torch

        n = torch.cuda.device_count()
        return f"{n} ({torch.cuda.get_device_name(0)})" if n else "0"
    except Exception:
        return "0"


def main(model_dir: Path = DEFAULT_MODEL) -> int:
    table = Table(title="reciprocity doctor", show_lines=False)
    table.add_column("component")
    table.add_column("status")
    table.add_column("detail")
    problems: list[str] = []
    table.add_row("python", "ok", platform.python_version())
    for name in PACKAGES:
        ok, detail = _version(name)
        table.add_row(name, "ok" if ok else "FAIL", detail)
        if not ok:
            problems.append(name)
    ready = is_prepared(model_dir)
    table.add_row("model", "ok" if ready else "FAIL",
                  f"{model_dir} sha {model_sha(model_dir)}" if ready else f"{model_dir} missing: run `make model`")
    if not ready:
        problems.append("model")
    table.add_row("cpu cores", "ok", str(os.cpu_count()))
    table.add_row("gpus", "ok", _gpus())
    ok, detail = _bf16()
    table.add_row("bf16", "ok" if ok else "warn", detail)
    Console().print(table)
    if problems:
        print(f"verdict: NOT READY ({', '.join(problems)}); `make install` sets everything up")
        return 1
    print("verdict: ready: every component imports and the model is prepared")
    return 0
