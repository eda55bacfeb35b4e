#!/usr/bin/env bash
# One prepared check for a machine with an NVIDIA GPU: the CUDA tests (skipped elsewhere), the GPU
# save/load benchmark, the load benchmark, then the rest of the test suite. It installs nothing: it
# uses the machine's python3, which must have torch (CUDA build), safetensors, numpy,
# xxhash, typer, rich, pytest, pytest-timeout and hypothesis.
#   bash bench/gpu_check.sh            # from the repository root
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD/tests/helpers${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi -L || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count())"
# the tests that need CUDA first (seconds), then the benchmarks, then the rest of the suite: a lent
# machine's time is short, and what it alone can check comes first
python3 -m pytest -q -p no:cacheprovider -o addopts="--import-mode=importlib --timeout=300" -m cuda tests -rs 2>&1 | tail -15
python3 bench/bench_gpu.py --repeat 5
# loads against their floors, GPU contenders included (load-to-GPU vs load_file(device="cuda")); W4: one 1 GiB tensor
python3 bench/bench_load.py --workloads W1,W4 --rounds 3
python3 -m pytest -q -p no:cacheprovider -o addopts="--import-mode=importlib --timeout=300" -m "not cuda" tests 2>&1 | tail -15
