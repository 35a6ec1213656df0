"""benchmarks/shape_model.py: the random-weight model directories the GPU learner figures rest on."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def shape_model():
    spec = importlib.util.spec_from_file_location("shape_model", ROOT / "benchmarks" / "shape_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["shape_model"] = module
    spec.loader.exec_module(module)
    return module


# the published sizes: Qwen2.5-7B-Instruct 7.62B (7,615,616,512), SmolLM2-1.7B 1.71B (1,711,376,384)
@pytest.mark.parametrize(("shape", "params", "arch"), [("qwen2.5-7b", 7_615_616_512, "Qwen2ForCausalLM"),
                                                       ("smollm2-1.7b", 1_711_376_384, "LlamaForCausalLM")])
def test_named_shapes_have_the_published_architecture_and_size(shape: str, params: int, arch: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    dims = dict(shape_model().SHAPES[shape])
    config = AutoConfig.for_model(dims.pop("model_type"), **dims)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == arch
    assert sum(p.numel() for p in model.parameters()) == params


def test_a_built_directory_loads_with_random_weights_and_the_tokenizer(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "shaped"
    n = shape_model().build(out, "smollm2-135m", tiny_model_dir)  # the source directory's own config
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert n == sum(p.numel() for p in model.parameters())
    assert model.dtype == torch.bfloat16
    assert AutoTokenizer.from_pretrained(str(out)).encode("<A>") == AutoTokenizer.from_pretrained(
        str(tiny_model_dir)).encode("<A>")
    again = shape_model().build(tmp_path / "again", "smollm2-135m", tiny_model_dir)
    weights, twin = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert again == n and all(torch.equal(w, twin[k]) for k, w in weights.items())  # seeded: the same every time
    q = next(w for k, w in weights.items() if k.endswith("q_proj.weight")).float()
    assert abs(q.std().item() / model.config.initializer_range - 1) < 0.1  # the architecture's own init
