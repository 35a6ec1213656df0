"""Bad config and files through the real command line: `reciprocity train` refuses them with exit
code 2 and one line on stderr naming the key, before anything starts (no Ray, no MLflow run, no run
directory) and without touching existing files.

Malformed YAML, unknown keys, wrong types (booleans for numbers included), duplicate keys, non-UTF-8
bytes and bad overrides run the installed entry point in a subprocess (about 1 s each: the config
is checked before the training stack is imported). Errors found by the training driver's
preflight (a missing model directory, a checkpoint of another config, checkpoints that would be
overwritten) run once as a subprocess (the whole stack imported: its import noise must not reach
stderr) and otherwise in-process through typer's runner, where `ray.is_initialized()` proves that
nothing started.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from reciprocity import checkpoint
from reciprocity.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent / "reciprocity"


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1", "TERM": "dumb"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([str(CLI), "train", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def tree(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under root: sha256 and mtime (ns), to prove nothing was rewritten."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


BAD_FILES = {
    "malformed": ("method:\n  beta: [1,\n", "malformed YAML"),
    "unknown_key": ("methd:\n  beta: 1\n", "methd: unknown key"),
    "unknown_nested_key": ("rollout:\n  wokers: 2\n", "rollout.wokers: unknown key"),
    "wrong_type": ("method:\n  beta: abc\n", "method.beta"),
    "section_scalar": ("rollout: 5\n", "rollout: Input should be a valid dictionary"),
    "bool_for_int": ("iterations: yes\n", "iterations: Value error, expected a number, got the boolean true"),
    "literal": ("lora:\n  r: 7\n", "lora.r"),
    "duplicate_key": ("method:\n  beta: 0.5\n  gamma: 0.9\n  beta: 5\n", "line 4 malformed YAML: duplicate key 'beta'"),
    "top_level_list": ("- a\n- b\n", "top level must be a mapping"),
    "python_tag": ("seed: !!python/object/apply:os.system ['echo pwned']\n", "malformed YAML"),
    "constraint": ("rollout:\n  games_per_iteration: 10\n  seed_group_size: 4\n", "seed_group_size"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_config_file_exits_2_with_one_line(tmp_path: Path, case: str) -> None:
    text, expected = BAD_FILES[case]
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    before = tree(tmp_path)
    r = cli("--config", str(bad), cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    line = one_line(r.stderr)
    assert line.startswith("config error: ") and expected in line, line
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert tree(tmp_path) == before and not (tmp_path / "runs").exists()  # nothing written, nothing started
    assert "pwned" not in r.stdout + r.stderr


def test_undecodable_and_missing_files_and_bad_overrides(tmp_path: Path) -> None:
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x81 not yaml")
    r = cli("--config", str(binary), cwd=tmp_path)
    assert r.returncode == 2 and "not UTF-8" in one_line(r.stderr)
    r = cli("--config", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert r.returncode == 2 and "cannot read config" in one_line(r.stderr)
    good = tmp_path / "good.yaml"
    good.write_text("run_name: t\n")
    for override, key in (("method.bta=1", "method.bta"), ("method.beta=abc", "method.beta"),
                          ("lora.r=on", "lora.r"), ("method", "key.sub=value"), ("seed.x=1", "seed")):
        r = cli("--config", str(good), override, cwd=tmp_path)
        assert r.returncode == 2 and key in one_line(r.stderr), (override, r.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["binary.yaml", "good.yaml"]


def test_missing_model_directory_subprocess(tmp_path: Path) -> None:
    """The driver's preflight, with the whole stack imported: still one line, exit 2, no run dir."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run_name: nomodel\nruns_dir: {tmp_path / 'runs'}\nmodel: {{path: {tmp_path / 'no-model'}}}\n")
    r = cli("--config", str(cfg), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    line = one_line(r.stderr)
    assert line.startswith("error: model.path: no Hugging Face model at") and str(tmp_path / "no-model") in line
    assert not (tmp_path / "runs").exists() and not list(tmp_path.rglob("*.db"))


# ----------------------------------------------------------------------------- in-process (typer's runner)
@pytest.fixture()
def fake_model(tmp_path: Path) -> Path:
    """Enough of a model directory for preflight (config.json); the run must stop before loading it."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def _config_file(tmp_path: Path, fake_model: Path, **sections: object) -> Path:
    data = {"run_name": "r", "runs_dir": str(tmp_path / "runs"), "model": {"path": str(fake_model)},
            "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}, **sections}
    p = tmp_path / f"c{len(list(tmp_path.glob('c*.yaml')))}.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _checkpoint(run_dir: Path, cfg: Config, iteration: int) -> None:
    tmp = checkpoint.begin(run_dir, iteration)
    (tmp / "learner").mkdir()
    (tmp / "learner" / "weights.bin").write_bytes(os.urandom(4096))
    checkpoint.commit(tmp, checkpoint.State(iteration, iteration, "run-id", cfg.fingerprint(), {}), cfg, keep=3)


def _invoke(*args: str) -> tuple[int, str]:
    import ray
    from typer.testing import CliRunner

    from reciprocity.cli import app

    result = CliRunner().invoke(app, ["train", *args])
    assert not ray.is_initialized(), "Ray was started"
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stderr


def test_checkpoint_of_another_config_is_refused(tmp_path: Path, fake_model: Path) -> None:
    path_a = _config_file(tmp_path, fake_model, method={"beta": 0.5})
    run_dir = tmp_path / "runs" / "r"
    _checkpoint(run_dir, load_config(path_a), 2)
    _checkpoint(run_dir, load_config(path_a), 4)
    before = tree(run_dir)
    path_b = _config_file(tmp_path, fake_model, method={"beta": 0.7})
    code, err = _invoke("--config", str(path_b), "--resume", str(run_dir))
    assert code == 2
    line = one_line(err)
    assert "another config" in line and "method.beta: checkpoint '0.5', now '0.7'" in line, line
    assert tree(run_dir) == before and not (tmp_path / "mlflow.db").exists()


def test_existing_checkpoints_are_not_overwritten(tmp_path: Path, fake_model: Path) -> None:
    path = _config_file(tmp_path, fake_model)
    run_dir = tmp_path / "runs" / "r"
    _checkpoint(run_dir, load_config(path), 3)
    before = tree(run_dir)
    code, err = _invoke("--config", str(path))  # same run_name, no --resume
    assert code == 2 and "already holds checkpoints" in one_line(err) and "--resume" in err
    assert tree(run_dir) == before and not (tmp_path / "mlflow.db").exists()


def test_resume_without_a_readable_checkpoint(tmp_path: Path, fake_model: Path) -> None:
    path = _config_file(tmp_path, fake_model)
    code, err = _invoke("--config", str(path), "--resume", str(tmp_path / "nothing-here"))
    assert code == 2 and "no complete checkpoint" in one_line(err)
    run_dir = tmp_path / "runs" / "r"
    cfg = load_config(path)
    _checkpoint(run_dir, cfg, 2)
    _checkpoint(run_dir, cfg, 4)
    newest = checkpoint.checkpoints_dir(run_dir) / "it-000004" / "state.json"
    newest.write_text(newest.read_text()[:20])  # torn (e.g. a disk error): skipped, not crashed on
    assert checkpoint.load(run_dir, cfg)[1].iteration == 2
    (checkpoint.checkpoints_dir(run_dir) / "it-000002" / "state.json").write_text(json.dumps({"bad": 1}))
    code, err = _invoke("--config", str(path), "--resume", str(run_dir))
    assert code == 2 and "no complete checkpoint" in one_line(err)
