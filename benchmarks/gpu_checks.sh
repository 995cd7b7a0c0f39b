#!/usr/bin/env bash
# The GPU checks for a session that is lent a CUDA machine (never run by CI).
# One short script, about 10 minutes on one H200: the capture tests on the GPU, then the
# capture-overhead benchmark (prefill, generate, static-cache generate, and the recorded compiled
# forward and compiled generate against unrecorded; CUDA graphs there with transformers' default).
# Paste its output into benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch transformers accelerate >/dev/null 2>&1 || true
python -m pip install -q -e ".[test]" >/dev/null
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'gpus', torch.cuda.device_count())"
# capture exactness and generation paths on the GPU (tests take --device)
timeout 300 python -m pytest -q -p no:cacheprovider --device cuda \
  tests/test_capture.py tests/test_generation_paths.py -x 2>&1 | tail -5
# compiled capture: torch.compile(fullgraph=True), compiled before record, compiled static-cache
# generate, and mode="reduce-overhead" (CUDA graphs write the static buffers; skipped on CPU)
timeout 420 python -m pytest -q -p no:cacheprovider --device cuda tests/test_compiled_capture.py -x 2>&1 | tail -5
# overhead, interleaved in one process (SPEC 7: <= 1.02 for prefill on a GPU)
timeout 420 python benchmarks/capture_overhead.py --device cuda --layers 16 --experts 128 --top-k 8 \
  --hidden 1024 --batch 16 --seq 1024 --rounds 10 --decode-steps 32 --static-steps 32 --compiled
# decode: what recording adds per generate decode step, eager and compiled (CUDA graphs: CompileConfig's
# default mode="reduce-overhead"), batch 1 and 8, 2 and 16 layers and Qwen3-30B-A3B's layer shape (SPEC 7:
# recorded / plain <= 1.02 a decode step on a GPU)
timeout 600 python benchmarks/decode_overhead.py --device cuda --layers 2 16 --batches 1 8 --real-shape \
  --compiled --rounds 7 --new-tokens 64
