#!/usr/bin/env bash
# One prepared check for a machine with an NVIDIA GPU: the whole test suite (its CUDA tests
# run there instead of skipping), then the GPU save/load benchmark and the load benchmark. It installs nothing: it
# uses the machine's python3, which must have torch (CUDA build), safetensors, numpy,
# xxhash, typer, rich, pytest, pytest-timeout and hypothesis.
#   bash bench/gpu_check.sh            # from the repository root
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD/tests/helpers${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi -L || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count())"
python3 -m pytest -q -p no:cacheprovider -o addopts="--import-mode=importlib --timeout=300" tests -rs 2>&1 | tail -25
python3 bench/bench_gpu.py --repeat 5
# loads against their floors, GPU contenders included (load-to-GPU vs load_file(device="cuda"))
python3 bench/bench_load.py --workloads W1 --rounds 3
