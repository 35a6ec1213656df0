#!/bin/bash
# The learner on one GPU (sysdesign/benchmarks.md, "The learner on a GPU"): bench_learner at the paper's
# learner settings (configs/ipd_aa.yaml: ZeRO-2, bf16, 4096-token micro-batches, no checkpointing,
# 128 games a step) on SmolLM2-135M's and Qwen2.5-7B's shapes with random weights
# (benchmarks/shape_model.py), one JSON file each in OUT_DIR.
# Usage: bash benchmarks/gpu_learner.sh OUT_DIR [TOKENIZER_DIR]
# Needs torch with CUDA, transformers, peft, deepspeed, xgrammar, pydantic (no vLLM, no Ray).
set -u
out=${1:?OUT_DIR}; tok=${2:-models/smollm2-135m-instruct}; scratch=${SCRATCH:-/tmp/reciprocity-gpu}
mkdir -p "$out" "$scratch"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv"
run() {  # name shape games steps [bench_learner options]
    local name=$1 shape=$2 games=$3 steps=$4; shift 4
    echo "=== $(date -u +%T) $name"
    [ -d "$scratch/$shape" ] || python3 benchmarks/shape_model.py "$scratch/$shape" --shape "$shape" --tokenizer "$tok" || return
    python3 benchmarks/bench_learner.py --config configs/ipd_aa.yaml --model-dir "$scratch/$shape" \
        --games "$games" --steps "$steps" "$@" > "$out/$name.json" 2> "$out/$name.err"
    echo "rc=$? $(head -c 400 "$out/$name.json")"
}
run learner_135m_ipd_aa smollm2-135m 128 3
run learner_7b_ipd_aa qwen2.5-7b 128 2
# the micro-batches the 7B configs had before (16384 tokens): alone, and with every layer checkpointed
run learner_7b_mb16384 qwen2.5-7b 128 2 --no-bare --set learner.micro_batch_tokens=16384
run learner_7b_mb16384_ckpt1 qwen2.5-7b 128 2 --set learner.micro_batch_tokens=16384 --set learner.gradient_checkpointing=1
