#!/usr/bin/env bash
# GPU check for issue 6: install what is missing, export tiny / S / B(16x32x32), build TensorRT engines
# (fp32, fp16, int8 where a Q/DQ graph exists), run every GPU test, benchmark, record in RESULTS.md.
#   bash benchmarks/gpu_check.sh            (from the repository root, on an NVIDIA machine)
# Env: PRESETS (default tiny,S,B16), STEPS (50), WORK (/tmp/vdit-gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PRESETS=${PRESETS:-tiny,S,B16}
STEPS=${STEPS:-50}
WORK=${WORK:-/tmp/vdit-gpu}

if ! command -v nvidia-smi >/dev/null; then
  echo "gpu_check: no nvidia-smi: this script needs an NVIDIA GPU" >&2
  exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

# ---- install what is missing (TensorRT 10.x: the weak-typing FP16/INT8 flags this build uses) ----------
have() { python -c "import $1" 2>/dev/null; }
# cuda-python's major version must match the driver's CUDA major version (nvidia-smi's "CUDA Version").
CUDA_MAJOR=$(nvidia-smi | sed -n 's/.*CUDA Version: \([0-9]*\).*/\1/p' | head -1)
CUDA_MAJOR=${CUDA_MAJOR:-12}
have tensorrt || pip install "tensorrt-cu12>=10.8,<11"
have cuda.bindings || have cuda.cudart || pip install "cuda-python>=12.6,<$((CUDA_MAJOR + 1))"
have polygraphy || pip install "polygraphy>=0.49"
if ! python -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"; then
  pip uninstall -y onnxruntime && pip install "onnxruntime-gpu>=1.18" || echo "gpu_check: onnxruntime-gpu not installed; ORT CUDA rows skipped"
fi
pip install -q -e ".[torch,dev]" --no-deps
python -c "import tensorrt, cuda; print('tensorrt', tensorrt.__version__)"

# ---- checkpoints and exports -------------------------------------------------------------------------
python benchmarks/bench_gpu.py --presets "$PRESETS" --work "$WORK" --prepare

# ---- INT8 Q/DQ graphs (issue 4's `vdit calibrate`); skipped with a message where it is not there -------
if vdit calibrate --help >/dev/null 2>&1; then
  for name in ${PRESETS//,/ }; do
    ckpt="$WORK/ckpt-$name"; [ "$name" = tiny ] && ckpt=""
    if vdit calibrate "$WORK/export-$name" ${ckpt:+--checkpoint "$ckpt"}; then :; else
      echo "gpu_check: vdit calibrate failed for $name; TensorRT int8 skipped for it"
    fi
  done
else
  echo "gpu_check: 'vdit calibrate' is not available in this checkout: TensorRT int8 rows skipped"
fi

# ---- engines --------------------------------------------------------------------------------------------
for name in ${PRESETS//,/ }; do
  for precision in fp32 fp16 int8; do
    if [ "$precision" = int8 ] && [ ! -f "$WORK/export-$name/step.int8.onnx" ]; then continue; fi
    vdit build "$WORK/export-$name" --precision "$precision" --batch 1:2:8
    vdit build "$WORK/export-$name" --precision "$precision" --batch 1:2:8 --no-build   # cache hit
  done
done

# ---- tests and the benchmark table ------------------------------------------------------------------------
python -m pytest -q -m gpu tests
python benchmarks/bench_gpu.py --presets "$PRESETS" --work "$WORK" --steps "$STEPS"
