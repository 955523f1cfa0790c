#!/usr/bin/env bash
# Issue 20's GPU checks in one short run on a lent GPU machine; each check's output goes to $OUT/NAME.txt and
# its last lines to the console:
#   cuda_tests   the tests that skip without CUDA (CUDA-graph decoding, CUDA IPC weight sync)
#   mfu_135m     the PPO learner step (benchmarks/ppo_profile.py) of the SmolLM2-135M shape, random weights,
#                bf16, 64 rows x (256 + 128) tokens: seconds per pass, model TFLOP/s, MFU of a 989 TFLOP/s peak
#   mfu_454m     the same for a random 24 x 1024 Llama (454M parameters), 32 rows
#   rollout_64   the project's engine against plain generate and the floors, SmolLM2 architecture, batch 64
#   rollout_256  the same at batch 256
# From the repository root on the device, after the bundle install of ../shared/gpu/README.md (ray, deepspeed,
# datasets), with a pytest wheel among the carried ones and a GPT-2 tokenizer folder at $TOKENIZER (default
# .gpu/gpt2, a copy of ../shared/tokenizers/gpt2):
#     OUT=$OUT bash benchmarks/gpu_check.sh
# Written 2026-12-05 without a GPU machine to run it on: the CPU parts of each command were checked here, the
# CUDA paths not yet. A full conf/tldr.yaml round needs the SmolLM2 model file (98 MB, over one call's limit:
# ../shared/gpu/README.md) and is not in this script.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
TOKENIZER=${TOKENIZER:-.gpu/gpt2}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}  # dense bf16, H100 SXM and H200
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=9.0  # the machine's "9.0a" breaks DeepSpeed's op builds
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"

check() {
    local name=$1 started=$SECONDS
    shift
    echo "== $name: $*"
    "$@" > "$OUT/$name.txt" 2>&1
    echo "== $name: exit $? after $((SECONDS - started)) s"
    tail -n 14 "$OUT/$name.txt"
}

check cuda_tests python -m pytest -q -p no:cacheprovider tests/test_generation_cuda.py tests/test_weight_sync.py
check mfu_135m python benchmarks/ppo_profile.py --device cuda --dtype bfloat16 --layers 30 --width 576 \
    --intermediate 1536 --rows 64 --prompt-tokens 256 --new-tokens 128 --steps 3 --peak-tflops "$PEAK_TFLOPS" \
    --tokenizer "$TOKENIZER"
check mfu_454m python benchmarks/ppo_profile.py --device cuda --dtype bfloat16 --layers 24 --width 1024 \
    --rows 32 --prompt-tokens 256 --new-tokens 128 --steps 3 --peak-tflops "$PEAK_TFLOPS" --tokenizer "$TOKENIZER" \
    --set micro_batch_size=8
check rollout_64 python benchmarks/rollout.py --device cuda --model smollm2-random --prompts 64 --prompt-tokens 128 \
    --new-tokens 128
check rollout_256 python benchmarks/rollout.py --device cuda --model smollm2-random --prompts 256 --prompt-tokens 128 \
    --new-tokens 128
