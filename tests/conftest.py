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
