"""Rollout efficiency: generated tokens/s of the rollout worker playing IPD with SmolLM2, over the
raw AsyncLLM's tokens/s on the same prompts at the same concurrency, on the same engine, same run.

1. A RolloutWorker (in-process, no Ray: the actor adds only the call around `run`) plays `--games`
   IPD games concurrently (LLM vs LLM, base model, always-guided as SmolLM2 needs). Every request
   it sends (prompt ids, sampling, adapter) is recorded.
2. The raw baseline replays exactly those requests straight into the engine's AsyncLLM (same
   SamplingParams, same LoRA request), wave by wave: wave k = every seat's k-th decision, all at
   once, as the worker's games submit them. So both phases run the same prompts in the same batch
   structure; what the raw phase lacks is the match runner: chats, env steps, bookkeeping, and the
   wait of each game for its slower seat.
An unmeasured worker run of the same size warms the engine up first; the prefix cache is reset
before each phase; the pair of phases is repeated `--repeats` times and the totals compared.
Prints ONE JSON object (last line):
{"name": "rollout", "worker_tok_s": ..., "raw_tok_s": ..., "rollout_efficiency_ratio": ...}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def log(message: str) -> None:
    print(f"[bench_rollout] {message}", file=sys.stderr, flush=True)


class Recorder:
    """Wraps an engine; records every generate request."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.requests: list[tuple[list[int], Any, str | None]] = []

    async def generate(self, prompt_token_ids: list[int], sampling: Any, adapter: str | None) -> Any:
        self.requests.append((list(prompt_token_ids), sampling, adapter))
        return await self.engine.generate(prompt_token_ids, sampling, adapter)

    async def load_adapter(self, version: Any) -> str:
        return await self.engine.load_adapter(version)

    async def unload_adapter(self, key: str) -> None:
        await self.engine.unload_adapter(key)


def specs(games: int, rounds: int, offset: int) -> list:
    from actors.worker import MatchSpec, PlayerSpec, SamplingSpec

    base = PlayerSpec("llm", "base")
    return [
        MatchSpec("ipd", offset + g, offset + g, seed=g, seats=(base, base), options={"n_rounds": rounds},
                  sampling=SamplingSpec(temperature=1.0, free_samples=0))
        for g in range(games)
    ]


async def worker_phase(worker: Any, games: int, rounds: int, offset: int) -> tuple[int, float]:
    await worker.engine.engine._llm.reset_prefix_cache()
    t0 = time.perf_counter()
    batches = await worker.run(specs(games, rounds, offset), concurrency=games, refs=False)
    seconds = time.perf_counter() - t0
    tokens = sum(sum(1 for t in row if t >= 0) for b in batches for row in b.column("token_round").to_pylist())
    return tokens, seconds


async def raw_phase(engine: Any, requests: list[tuple[list[int], Any, str | None]], eos: int) -> tuple[int, float]:
    """Replay `requests` into the engine's AsyncLLM, wave by wave (wave = decisions made so far in
    the chat: each finished turn of ChatML-like chats ends with one eos, user turns too)."""
    from vllm import SamplingParams
    from vllm.inputs.engine import tokens_input
    from vllm.sampling_params import StructuredOutputsParams

    llm = engine._llm
    waves: dict[int, list] = {}
    for ids, s, adapter in requests:
        waves.setdefault((ids.count(eos) - 2) // 2, []).append((ids, s, adapter))

    async def one(ids: list[int], s: Any, adapter: str | None) -> int:
        params = SamplingParams(
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            seed=s.seed,
            logprobs=0,
            structured_outputs=StructuredOutputsParams(regex=s.regex) if s.regex else None,
        )
        final = None
        lora = engine._served[adapter].request
        async for out in llm.generate(tokens_input(ids), params, uuid.uuid4().hex, lora_request=lora):
            final = out
        return len(final.outputs[0].token_ids)

    await llm.reset_prefix_cache()
    t0 = time.perf_counter()
    tokens = 0
    for k in sorted(waves):
        tokens += sum(await asyncio.gather(*(one(*r) for r in waves[k])))
    return tokens, time.perf_counter() - t0


async def main(args: argparse.Namespace) -> dict[str, Any]:
    from actors.worker import RolloutWorker

    config = {
        "model": str(args.model),
        "engine": {"max_loras": 2, "max_lora_rank": 8, "max_model_len": 4096, "max_num_seqs": 256,
                   "threads": args.threads or "node",  # as a sync-mode training run's engine
                   **({"engine_kwargs": json.loads(args.engine_kwargs)} if args.engine_kwargs else {})},
        "concurrency": args.games,
    }
    worker = RolloutWorker(config)
    worker.engine = Recorder(worker.engine)
    await worker.engine.engine.start()
    try:
        # warm-up at the measured size (grammar compilation, kernels for these batch shapes)
        await worker_phase(worker, args.games, args.rounds, offset=10_000)
        log(f"warm-up done; measuring {args.games} games x {args.rounds} rounds, {args.repeats} repeats")
        eos = worker.template.tokenizer.eos_token_id
        worker_tokens = worker_seconds = raw_tokens = raw_seconds = 0.0
        for rep in range(args.repeats):
            worker.engine.requests.clear()
            tok, sec = await worker_phase(worker, args.games, args.rounds, offset=rep * args.games)
            worker_tokens, worker_seconds = worker_tokens + tok, worker_seconds + sec
            log(f"worker: {tok} tokens in {sec:.1f}s ({len(worker.engine.requests)} requests)")
            tok, sec = await raw_phase(worker.engine.engine, list(worker.engine.requests), eos)
            raw_tokens, raw_seconds = raw_tokens + tok, raw_seconds + sec
            log(f"raw: {tok} tokens in {sec:.1f}s")
        worker_tok_s, raw_tok_s = worker_tokens / worker_seconds, raw_tokens / raw_seconds
        return {
            "name": "rollout",
            "worker_tok_s": round(worker_tok_s, 2),
            "raw_tok_s": round(raw_tok_s, 2),
            "rollout_efficiency_ratio": round(worker_tok_s / raw_tok_s, 4),
            "games": args.games,
            "rounds": args.rounds,
            "repeats": args.repeats,
            "requests_per_phase": len(worker.engine.requests),
            "worker_seconds": round(worker_seconds, 2),
            "raw_seconds": round(raw_seconds, 2),
            "generated_tokens": [int(worker_tokens), int(raw_tokens)],
            "engine_kwargs": json.loads(args.engine_kwargs or "{}"),
            "engine_torch_threads": worker.engine.engine.torch_threads,
        }
    finally:
        worker.engine.engine.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "smollm2-135m-instruct")
    parser.add_argument("--games", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="engine threads (0: the machine's cores)")
    parser.add_argument("--engine-kwargs", default="", help='extra vLLM engine args as JSON: {"block_size": 32}')
    result = asyncio.run(main(parser.parse_args()))
    print(json.dumps(result))
