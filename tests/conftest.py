"""Shared fixtures: the prepared SmolLM2 export, its tokenizer, and a tiny random Llama with that tokenizer.
Shared helpers (fakes, trajectory builders) live in support.py and vllm_support.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models" / "smollm2-135m-instruct"

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# `make test` runs the modules on two pytest-xdist workers, a module to a worker (`--dist loadfile`),
# in the order collected. Putting the long modules first is longest-processing-time-first scheduling:
# the two workers then finish close together instead of one starting the cluster test as the other
# ends. Seconds per module on the 2-core CI machine, one module at a time (`--durations=0`); a module
# not listed is short and keeps its place after these.
MODULE_SECONDS = {
    "test_resume_determinism.py": 300, "test_train_games.py": 300, "test_train_faults.py": 240,
    "test_cluster_e2e.py": 225, "test_train_e2e.py": 190, "test_console.py": 125, "test_data_path.py": 92,
    "test_serve_browser.py": 90, "test_worker.py": 90, "test_serve.py": 80, "test_evaluate.py": 80,
    "test_learner.py": 60, "test_fuzz_envs.py": 55, "test_constrain.py": 50, "test_vllm_engine.py": 50,
    "test_engine_lifecycle.py": 45, "test_match.py": 45, "test_stack_smoke.py": 45,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest modules first (stable: items of a module, and unlisted modules, keep their order)."""
    items.sort(key=lambda item: -MODULE_SECONDS.get(item.path.name, 0))


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """SmolLM2-135M-Instruct exported by `make model` (a test fails, not skips, without it)."""
    from reciprocity.models import is_prepared

    assert is_prepared(MODEL_DIR), "the model is not prepared: run `make model`"
    return MODEL_DIR


@pytest.fixture(scope="session")
def tiny_model_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama (hidden 64) with SmolLM2's tokenizer and chat template."""
    from reciprocity.models import build_tiny

    return build_tiny(model_dir, tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path):
    """SmolLM2's Hugging Face tokenizer (chat template included)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))
