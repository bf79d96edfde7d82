#!/usr/bin/env bash
# The prepared GPU check: installs the project (nothing else), runs benchmarks/gpu_check.py (training
# GPT-2 124M: tokens/s and MFU; decoding at batch 1 and 16), then the GPU-marked tests. Meant to take
# under 5 minutes on one GPU once the install is cached; on a machine without CUDA it runs the CPU
# path and the GPU tests report themselves skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
make install
.venv/bin/python benchmarks/gpu_check.py
.venv/bin/python -m pytest -q -rs -m gpu -p no:cacheprovider
