#!/usr/bin/env bash
# GPU check, for the day an NVIDIA GPU is lent (no network needed; everything from requirements-gpu.txt):
#   1. TensorRT engines of the fixture: FP32 and FP16 (to_trt.sh when trtexec exists, else the Python
#      builder), INT8 calibrated PTQ (Python builder) and INT8 from a QAT QDQ ONNX (no calibrator);
#      with --stacked RUN (a benchmarks/compress.py run folder on the same --data): FP16 and INT8 engines of the
#      stacked model (--method's pruned + distilled checkpoint -> FP16; its QAT checkpoint -> INT8 from QDQ);
#   2. val.py on each engine and on the .pt (CUDA): one table of mAP and batch-1 / batch-8 latency;
#   3. 2 epochs of yolov5n on NEU-DET on CUDA with AMP, printing images/s.
# Fails fast (exit 3, one line saying what is missing) when there is no NVIDIA GPU, CUDA torch or TensorRT.
#
#   bash benchmarks/gpu_check.sh [--weights FIXTURE.pt] [--data NEU-DET.yaml] [--out DIR] [--imgsz 640]
#                                [--stacked runs/compress --method peer]
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
weights="$root/../shared/fixtures/yolov5n-neu-det-v7.pt"
data="$root/../shared/datasets/neu-det/neu-det.yaml"
out="$root/runs/gpu_check"
imgsz=640
stacked=""
method="peer"
python="${PYTHON:-python}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --weights) weights="$2"; shift 2 ;;
        --data) data="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --imgsz) imgsz="$2"; shift 2 ;;
        --stacked) stacked="$2"; shift 2 ;;
        --method) method="$2"; shift 2 ;;
        *) echo "gpu_check.sh: unknown option $1 (options: --weights --data --out --imgsz --stacked --method)" >&2
           exit 2 ;;
    esac
done

cd "$root"
fail() { echo "gpu_check.sh: $*" >&2; exit 3; }

# --- 0. fail fast: GPU, CUDA torch, TensorRT, inputs ------------------------------------------------------
command -v nvidia-smi >/dev/null 2>&1 || fail "no NVIDIA GPU here (nvidia-smi not found); run this on a machine with an NVIDIA GPU and driver"
nvidia-smi -L >/dev/null 2>&1 || fail "nvidia-smi finds no usable NVIDIA GPU ($(nvidia-smi -L 2>&1 | head -1))"
"$python" - <<'PY' || exit 3
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh: torch sees no CUDA device (a CPU-only torch build?); install a CUDA build of torch")
try:
    import tensorrt  # noqa: F401
except ImportError:
    sys.exit("gpu_check.sh: the tensorrt package is missing; pip install -r requirements-gpu.txt (offline: a wheel cache)")
PY
[[ -f "$weights" ]] || fail "weights $weights not found (--weights)"
[[ -f "$data" ]] || fail "data YAML $data not found (--data)"
stacked_kd="$stacked/train/$method-kd/weights/best.pt"
stacked_qat="$stacked/train/$method-qat/weights/best.pt"
if [[ -n "$stacked" ]]; then
    [[ -f "$stacked_kd" && -f "$stacked_qat" ]] || fail "--stacked $stacked: no $method-kd and $method-qat checkpoints under train/ (run benchmarks/compress.py --work $stacked first, or pick --method slim|eagleeye|peer)"
fi

mkdir -p "$out"
start=$(date +%s)
echo "gpu_check: $(nvidia-smi -L | head -1); TensorRT $("$python" -c 'import tensorrt; print(tensorrt.__version__)')"

# --- 1. engines -------------------------------------------------------------------------------------------
cp "$weights" "$out/fixture.pt"
"$python" "$root/export.py" --weights "$out/fixture.pt" --include onnx --imgsz "$imgsz" --dynamic --no-compare
shapes=(1x3x${imgsz}x${imgsz} 8x3x${imgsz}x${imgsz} 8x3x${imgsz}x${imgsz})
if command -v trtexec >/dev/null 2>&1 || [[ -x /usr/src/tensorrt/bin/trtexec ]]; then
    "$root/to_trt.sh" --onnx "$out/fixture.onnx" --shapes "${shapes[@]}" --output "$out/fp32.engine"
    "$root/to_trt.sh" --onnx "$out/fixture.onnx" --fp16 --shapes "${shapes[@]}" --output "$out/fp16.engine"
else
    echo "gpu_check: no trtexec (pip TensorRT ships none): FP32/FP16 engines from the Python builder"
    "$python" "$root/export.py" --weights "$out/fixture.pt" --include engine --imgsz "$imgsz" --dynamic \
        --opt-shape 8x3x${imgsz}x${imgsz} --max-shape 8x3x${imgsz}x${imgsz} --device 0 --output-dir "$out/fp32" --no-compare
    mv "$out/fp32/fixture.engine" "$out/fp32.engine"; mv "$out/fp32/fixture.engine.json" "$out/fp32.engine.json"
    "$python" "$root/export.py" --weights "$out/fixture.pt" --include engine --half --imgsz "$imgsz" --dynamic \
        --opt-shape 8x3x${imgsz}x${imgsz} --max-shape 8x3x${imgsz}x${imgsz} --device 0 --output-dir "$out/fp16" --no-compare
    mv "$out/fp16/fixture.engine" "$out/fp16.engine"; mv "$out/fp16/fixture.engine.json" "$out/fp16.engine.json"
fi
"$python" "$root/export.py" --weights "$out/fixture.pt" --include engine --int8 --data "$data" --calib-images 256 \
    --imgsz "$imgsz" --dynamic --opt-shape 8x3x${imgsz}x${imgsz} --max-shape 8x3x${imgsz}x${imgsz} --device 0 \
    --output-dir "$out/ptq" --no-compare
mv "$out/ptq/fixture.engine" "$out/int8-ptq.engine"; mv "$out/ptq/fixture.engine.json" "$out/int8-ptq.engine.json"

# QAT: one epoch of fake-quantized fine-tuning on CUDA (float32), then its QDQ ONNX -> INT8 engine, no calibrator
"$python" "$root/train.py" --qat --weights "$out/fixture.pt" --data "$data" --imgsz 256 --batch-size 32 --epochs 1 \
    --device 0 --noautoanchor --noplots --hyp-override lr0=0.001 lrf=0.1 warmup_epochs=0 \
    --project "$out" --name qat --exist-ok
"$python" "$root/export.py" --weights "$out/qat/weights/best.pt" --include engine --int8 --imgsz "$imgsz" --dynamic \
    --opt-shape 8x3x${imgsz}x${imgsz} --max-shape 8x3x${imgsz}x${imgsz} --device 0 --output-dir "$out/qat-export" --no-compare
mv "$out/qat-export/best.engine" "$out/int8-qat.engine"; mv "$out/qat-export/best.engine.json" "$out/int8-qat.engine.json"

# stacked model (benchmarks/compress.py): pruned + distilled -> FP16 engine; + QAT -> INT8 engine from its QDQ graph
engines=("$out/fixture.pt" "$out/fp32.engine" "$out/fp16.engine" "$out/int8-ptq.engine" "$out/int8-qat.engine")
if [[ -n "$stacked" ]]; then
    cp "$stacked_kd" "$out/stacked.pt"; cp "$stacked_qat" "$out/stacked-qat.pt"
    "$python" "$root/export.py" --weights "$out/stacked.pt" --include engine --half --imgsz "$imgsz" --dynamic \
        --opt-shape 8x3x${imgsz}x${imgsz} --max-shape 8x3x${imgsz}x${imgsz} --device 0 --output-dir "$out/stacked-fp16" --no-compare
    mv "$out/stacked-fp16/stacked.engine" "$out/stacked-fp16.engine"; mv "$out/stacked-fp16/stacked.engine.json" "$out/stacked-fp16.engine.json"
    "$python" "$root/export.py" --weights "$out/stacked-qat.pt" --include engine --int8 --imgsz "$imgsz" --dynamic \
        --opt-shape 8x3x${imgsz}x${imgsz} --max-shape 8x3x${imgsz}x${imgsz} --device 0 --output-dir "$out/stacked-int8" --no-compare
    mv "$out/stacked-int8/stacked-qat.engine" "$out/stacked-int8.engine"; mv "$out/stacked-int8/stacked-qat.engine.json" "$out/stacked-int8.engine.json"
    engines+=("$out/stacked.pt" "$out/stacked-fp16.engine" "$out/stacked-int8.engine")
else
    echo "gpu_check: no --stacked run folder: stacked-model rows skipped"
fi

# --- 2. mAP (val.py) and latency of each artifact -----------------------------------------------------------
"$python" "$root/benchmarks/gpu_table.py" --data "$data" --imgsz "$imgsz" --device 0 "${engines[@]}" | tee "$out/table.md"

# --- 3. training speed: 2 epochs of yolov5n, CUDA AMP --------------------------------------------------------
train_start=$(date +%s.%N)
"$python" "$root/train.py" --cfg yolov5n.yaml --data "$data" --imgsz 256 --batch-size 32 --epochs 2 --device 0 \
    --noplots --noval --project "$out" --name train --exist-ok
train_end=$(date +%s.%N)
"$python" - "$data" "$train_start" "$train_end" <<'PY'
import sys
sys.path.insert(0, ".")
from utils.export.common import image_files
images = len(image_files(sys.argv[1], "train"))
seconds = float(sys.argv[3]) - float(sys.argv[2])
print(f"training: 2 epochs x {images} images in {seconds:.1f} s (start-up and final validation included): "
      f"{2 * images / seconds:.1f} images/s")
PY
echo "gpu_check: done in $(( $(date +%s) - start )) s; table in $out/table.md"
