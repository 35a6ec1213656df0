"""Adapter hot-swap on SmolLM2-135M: publish -> servable latency, probe fidelity, and the LoRA tax.

Usage: python benchmarks/bench_adapters.py [--versions 10] [--prompts 64] [--max-tokens 24]

- publish: an r=16 all-linear adapter exported by the learner code (bytes + PEFT config + probe),
  then `VLLMEngine.load_adapter` (sha, validation, fresh dir, add_lora under a new name and id, the
  fidelity probe); p50/p95 over versions, each retiring the previous one as in training.
- probe fidelity: mean |engine - learner| prompt log-prob on the probe chat, with the learner in
  fp32 (bf16 weights upcast) and in bf16: the honest level the probe tolerance is set above.
- LoRA tax: tokens/s of 64 concurrent short prompts (prefill + 24 new tokens) with an adapter over
  the bare base model, warm (one untimed round first); also through the all-zero adapter (the
  `zero_base_adapter` fallback for the base model).
Prints ONE JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout: the JSON line only

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "smollm2-135m-instruct"
TARGET_P95_S = 1.0


def adapter_model(std: float) -> Any:
    """SmolLM2 (fp32 from the bf16 export) with an r=16 all-linear LoRA; B ~ N(0, std) so the
    adapter changes the policy the way a few training steps do."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(MODEL), dtype=torch.float32)
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    model = get_peft_model(base, cfg).eval()
    reseed(model, 0, std)
    return model


def reseed(model: Any, seed: int, std: float) -> None:
    """New LoRA weights: a new adapter version."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A" in n:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def make_versions(model: Any, n: int, std: float) -> list[Any]:
    from transformers import AutoTokenizer

    from learner.export import export_adapter, probe_token_ids

    ids = probe_token_ids(AutoTokenizer.from_pretrained(str(MODEL)))
    versions = []
    for v in range(1, n + 1):
        reseed(model, v, std)
        versions.append(export_adapter(model, name="bench", version=v, base_model_dir=MODEL, probe_ids=ids))
    return versions


def bf16_probe_error(model: Any, engine_lp: list[float], ids: tuple[int, ...]) -> float:
    """Probe error against a bf16 learner (the same weights, forward in bf16)."""
    import torch

    from learner.export import probe_logprobs

    model.to(torch.bfloat16)
    try:
        ref = probe_logprobs(model, list(ids))
    finally:
        model.to(torch.float32)
    return statistics.fmean(abs(a - b) for a, b in zip(engine_lp, ref, strict=True))


def prompts(n: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(MODEL))
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"Round {i}: the other agent played <A>. What do you play?"}]
        out.append(list(tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)))
    return out


async def throughput(engine: Any, batch: list[list[int]], adapter: str | None, max_tokens: int) -> float:
    """Decode tokens/s of one concurrent round (after one untimed warm-up round)."""
    from actors.engine import Sampling

    s = Sampling(max_tokens=max_tokens, temperature=1.0)
    await asyncio.gather(*(engine.generate(p, s, adapter) for p in batch))
    t0 = time.perf_counter()
    gens = await asyncio.gather(*(engine.generate(p, s, adapter) for p in batch))
    return sum(len(g.token_ids) for g in gens) / (time.perf_counter() - t0)


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    from actors.adapters import AdapterVersion
    from actors.vllm_engine import VLLMEngine, write_zero_adapter

    model = adapter_model(args.std)
    versions = make_versions(model, args.versions, args.std)
    engine = VLLMEngine(MODEL, max_loras=2, max_lora_rank=16, max_model_len=2048)
    await engine.start()
    log(f"engine started in {engine.start_seconds:.1f}s, dtype {engine.dtype}, cpu lora fix {engine.cpu_lora_fixed}")
    try:
        publish, errs, errs_bf16 = [], [], []
        prev = None
        for v in versions:
            t0 = time.perf_counter()
            key = await engine.load_adapter(v)
            publish.append(time.perf_counter() - t0)
            errs.append(engine.probe_error[key])
            reseed(model, v.version, args.std)
            engine_lp = await engine.prompt_logprobs(v.probe.token_ids, key)
            errs_bf16.append(bf16_probe_error(model, engine_lp, v.probe.token_ids))
            if prev:
                await engine.unload_adapter(prev)
            prev = key
            log(f"published {key} in {publish[-1]:.3f}s {engine.stats.publish_phases}")
        batch = prompts(args.prompts)
        tok_s_base = await throughput(engine, batch, None, args.max_tokens)
        log(f"base {tok_s_base:.1f} tok/s")
        tok_s_lora = await throughput(engine, batch, prev, args.max_tokens)
        log(f"lora {tok_s_lora:.1f} tok/s")
        # the fallback for the base model (zero_base_adapter): an all-zero rank-1 adapter
        zero = AdapterVersion.from_dir(write_zero_adapter(engine.base, engine.adapter_root / "zero-bench"), "zero", 1)
        tok_s_zero = await throughput(engine, batch, await engine.load_adapter(zero), args.max_tokens)
        start_s, dtype, fixed = engine.start_seconds, engine.dtype, engine.cpu_lora_fixed
    finally:
        engine.shutdown()
    p50, p95 = percentile(publish, 50), percentile(publish, 95)
    return {
        "name": "adapters",
        "publish_p50_s": round(p50, 4),
        "publish_p95_s": round(p95, 4),
        "publish_p95_target_ratio": round(p95 / TARGET_P95_S, 4),
        "lora_tax_ratio": round(tok_s_lora / tok_s_base, 4),
        "tok_s_base": round(tok_s_base, 1),
        "tok_s_lora": round(tok_s_lora, 1),
        "zero_base_tax_ratio": round(tok_s_zero / tok_s_base, 4),
        "probe_error_fp32_mean": round(statistics.fmean(errs), 5),
        "probe_error_fp32_max": round(max(errs), 5),
        "probe_error_bf16_mean": round(statistics.fmean(errs_bf16), 5),
        "probe_error_bf16_max": round(max(errs_bf16), 5),
        "probe_tolerance": engine.probe_tolerance,
        "probe_tokens": len(versions[0].probe.token_ids),
        "versions": len(versions),
        "concurrent_prompts": len(batch),
        "engine_start_s": round(start_s or 0.0, 1),
        "engine_dtype": dtype,
        "cpu_lora_fix": fixed,
        "load_average_1m": round(os.getloadavg()[0], 1),
    }


def log(msg: str) -> None:
    print(f"[bench_adapters] {msg}", file=sys.stderr, flush=True)


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--versions", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--std", type=float, default=0.02, help="std of the LoRA B weights")
    args = ap.parse_args()
    t0 = time.perf_counter()
    result = asyncio.run(bench(args))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
