#!/usr/bin/env bash
# Run a command as if on a CPU with AVX2 only (no AVX-512, no AVX-VNNI, no native bf16), to estimate
# on an AVX-512 machine what the 2-core AVX2 machine of issue 15 takes:
#   - /proc/cpuinfo without those flags (a bind mount in a private mount namespace: needs root), so
#     the engine and the learner pick float32 as they do there (actors/device.py);
#   - torch's kernels, oneDNN and MKL capped at AVX2.
# vLLM still loads its AVX-512 kernels (it asks the CPU itself) and the cores, clock and memory stay
# this machine's: an estimate, not the machine. sysdesign/benchmarks.md has how close it comes.
# On a CPU with AMX, vLLM still sees AMX (it asks torch.cpu._is_amx_tile_supported) and a bf16 engine
# crashes in its AMX kernel under the caps: the few tests that start vLLM in bf16 fail here only.
#   sudo benchmarks/as_avx2.sh make test
set -euo pipefail
flags=$(mktemp)
sed -E 's/ (avx512[a-z0-9_]*|amx[a-z0-9_]*|avx_vnni[a-z0-9_]*)//g' /proc/cpuinfo > "$flags"
export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 DNNL_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
exec unshare --mount --propagation private bash -c 'mount --bind "$1" /proc/cpuinfo && shift && exec "$@"' as_avx2 "$flags" "$@"
