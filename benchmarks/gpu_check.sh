#!/usr/bin/env bash
# Every GPU check in one go, on an NVIDIA machine: the GPU tests (pytest -m gpu), then the GPU benchmark
# (benchmarks/bench_gpu.py: torch eager fp32/fp16/bf16, torch.compile fp16 with CUDA graphs, ONNX Runtime
# CUDA fp32/fp16 with the fused step bound on the device, TensorRT where it imports) for tiny and for the
# B preset at 16x32x32 latents, with accuracy against PyTorch fp32 on the same noise; then the VAE decoder
# on TensorRT (benchmarks/bench_decode.py --trt: fp32 and fp16 engines, untiled and tiled, against diffusers).
#   bash benchmarks/gpu_check.sh                 (from anywhere; about 5-8 minutes on an H100)
# Env: PRESETS (B16,tiny)  STEPS (50)  COMPILE_MODES (reduce-overhead)  WORK (/tmp/vdit-gpu)
#      OUT (benchmarks/gpu): gpu_results.json, gpu_table.md and the logs land there
#      PYTHON (python3)  TEST_TIMEOUT (240 s)  BENCH_TIMEOUT (420 s)  DECODE_TIMEOUT (420 s)
# Nothing is installed from the network unless it is missing: onnxruntime-gpu (CUDA provider), tensorrt.
# Each stage is time-bounded and a failing stage does not stop the next; the exit code is non-zero when
# any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PRESETS=${PRESETS:-B16,tiny}
STEPS=${STEPS:-50}
COMPILE_MODES=${COMPILE_MODES-reduce-overhead}
WORK=${WORK:-/tmp/vdit-gpu}
OUT=${OUT:-benchmarks/gpu}
mkdir -p "$OUT" "$WORK"
status=0
stage() { echo; echo "== $* ($(date -u +%H:%M:%S))"; }

stage "GPU"
if ! command -v nvidia-smi >/dev/null; then
  echo "gpu_check: no nvidia-smi: this script needs an NVIDIA GPU" >&2
  exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

stage "vdit_deploy importable"
if ! "$PYTHON" -c "import vdit_deploy.runtimes, sys; sys.exit(not vdit_deploy.__file__.startswith('$PWD'))" 2>/dev/null; then
  # an editable install; offline machines fall back to a link tree of this checkout on PYTHONPATH
  if ! "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null; then
    shim="$WORK/shim/vdit_deploy"
    rm -rf "$WORK/shim" && mkdir -p "$shim"
    for f in vdit_deploy/*; do ln -s "$PWD/$f" "$shim/"; done
    for stage_dir in export runtimes calibration; do ln -s "$PWD/$stage_dir" "$shim/$stage_dir"; done
    # PYTHONSAFEPATH: `python -m pytest` must not put this checkout (vdit_deploy/ without its stages) first
    export PYTHONPATH="$WORK/shim${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
    echo "gpu_check: pip could not install this checkout; using a link tree at $WORK/shim"
  fi
fi
"$PYTHON" - <<'PY' || status=1
import onnxruntime as ort, torch, vdit_deploy
print("vdit_deploy", vdit_deploy.__file__)
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name(0))
print("onnxruntime", ort.__version__, ort.get_available_providers())
try:
    import tensorrt
    print("tensorrt", tensorrt.__version__)
except Exception as e:
    print("tensorrt: not importable:", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
PY
if ! "$PYTHON" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"; then
  echo "gpu_check: onnxruntime has no CUDA provider; trying pip install onnxruntime-gpu (ORT CUDA rows skip if it fails)"
  "$PYTHON" -m pip install -q "onnxruntime-gpu>=1.18" || true
fi

stage "GPU tests (pytest -m gpu)"
# only the files that hold GPU tests: the rest import test-only packages a GPU image may lack (diffusers)
timeout "${TEST_TIMEOUT:-240}" "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider $(grep -l "mark.gpu" tests/test_*.py) \
    2>&1 | tee "$OUT/gpu_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

stage "benchmark ($PRESETS, $STEPS steps)"
timeout "${BENCH_TIMEOUT:-420}" "$PYTHON" benchmarks/bench_gpu.py --presets "$PRESETS" --steps "$STEPS" \
    --compile-modes "$COMPILE_MODES" --work "$WORK" --out "$OUT" 2>&1 | tee "$OUT/bench_gpu.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

stage "VAE decode on TensorRT (bench_decode.py --trt)"
timeout "${DECODE_TIMEOUT:-420}" "$PYTHON" benchmarks/bench_decode.py --trt --out "$OUT/decode_trt.json" \
    2>&1 | tee "$OUT/bench_decode_trt.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

stage "done: exit $status; results in $OUT"
exit $status
