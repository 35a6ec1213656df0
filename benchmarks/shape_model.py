"""A model directory of a named architecture with random weights and SmolLM2's tokenizer.

Usage: python benchmarks/shape_model.py OUT_DIR --shape smollm2-135m|smollm2-1.7b|qwen2.5-7b
                                         [--tokenizer models/smollm2-135m-instruct]

For throughput and memory benchmarks on a machine the weights cannot reach (the lent GPU box has no
network and takes a 64 MiB upload): a learner step's time and memory depend on the shapes, not on
the weights' values. Never for anything that reads the model's outputs.
- smollm2-135m: the tokenizer directory's own config (the model `make model` prepares).
- smollm2-1.7b: SmolLM2-1.7B's published dimensions (Llama architecture).
- qwen2.5-7b: Qwen2.5-7B-Instruct's published dimensions (Qwen2 architecture, the paper's model:
  `configs/*_aa.yaml`), with its 152,064-row embedding and untied lm_head computed in full. The
  SmolLM2 tokenizer's ids (< 49,152) index it; prompts are therefore shorter than Qwen's tokenizer
  would make them by a few percent, which the benchmark's tokens/s already accounts for.
Weights: the architecture's own initialisation (torch seed 0), saved in bfloat16.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
SHAPES: dict[str, dict | None] = {
    "smollm2-135m": None,
    "smollm2-1.7b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=49152,
                         max_position_embeddings=8192, rope_theta=130000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=False),
}


def build(out: Path, shape: str, tokenizer_dir: Path) -> int:
    """Write the model directory; returns its parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    own = AutoConfig.from_pretrained(str(tokenizer_dir))
    dims = SHAPES[shape]
    if dims is None:
        config = own
    else:
        dims = dict(dims)
        config = AutoConfig.for_model(dims.pop("model_type"), **dims)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(config, key, getattr(own, key))
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out / name)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--tokenizer", type=Path, default=ROOT / "models" / "smollm2-135m-instruct")
    args = ap.parse_args()
    n = build(args.out, args.shape, args.tokenizer)
    print(f"{args.shape}: {n:,} parameters (random) -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
