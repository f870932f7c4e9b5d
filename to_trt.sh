#!/usr/bin/env bash
# Build a TensorRT engine from an exported ONNX on the device that will run it (Jetson, any NVIDIA GPU),
# and write the engine's sidecar JSON (names/stride/imgsz copied from the ONNX sidecar, plus the TensorRT
# version, GPU name and compute capability the engine is tied to).
#
#   ./to_trt.sh --onnx yolov5n.onnx --fp16 --output yolov5n.engine
#   ./to_trt.sh --onnx yolov5n.onnx --int8 --calib yolov5n.cache --fp16 --output yolov5n-int8.engine
#   ./to_trt.sh --onnx yolov5n.onnx --shapes 1x3x640x640 4x3x640x640 8x3x640x640 --workspace 2048
#
# --int8 needs a calibration cache (--calib) made by `export.py --include engine --int8 --data ...` on a
# machine with the same TensorRT major version, because trtexec cannot read images for calibration.
# Without --shapes, an ONNX exported with --dynamic or --dynamic-batch gets YOLOv5 v7.0's profile from its
# sidecar: batch 1 / batch//2 / batch (export.py --batch-size) at the export image size.
set -euo pipefail

usage() {
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    echo "options: --onnx FILE --output FILE [--fp16] [--int8 --calib CACHE] [--shapes MIN OPT MAX]"
    echo "         [--workspace MiB] [--input-name images] [--trtexec PATH]"
}

onnx="" output="" fp16=0 int8=0 calib="" workspace=4096 input_name="images"
min_shape="" opt_shape="" max_shape=""
trtexec="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"

while [[ $# -gt 0 ]]; do
    case "$1" in
        --onnx) onnx="$2"; shift 2 ;;
        --output) output="$2"; shift 2 ;;
        --fp16) fp16=1; shift ;;
        --int8) int8=1; shift ;;
        --calib) calib="$2"; shift 2 ;;
        --shapes) min_shape="$2"; opt_shape="$3"; max_shape="$4"; shift 4 ;;
        --workspace) workspace="$2"; shift 2 ;;
        --input-name) input_name="$2"; shift 2 ;;
        --trtexec) trtexec="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "to_trt.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done

[[ -n "$onnx" && -f "$onnx" ]] || { echo "to_trt.sh: --onnx FILE is required and must exist (got '$onnx')" >&2; exit 2; }
[[ -f "$onnx.json" ]] || { echo "to_trt.sh: $onnx.json (the export sidecar) is missing; export with export.py first" >&2; exit 2; }
[[ -n "$output" ]] || output="${onnx%.onnx}.engine"
[[ -x "$trtexec" ]] || { echo "to_trt.sh: trtexec not found at '$trtexec' (install TensorRT or pass --trtexec)" >&2; exit 2; }
if [[ $int8 -eq 1 && ( -z "$calib" || ! -f "$calib" ) ]]; then
    echo "to_trt.sh: --int8 needs an existing calibration cache: --calib FILE" >&2; exit 2
fi

if [[ -z "$min_shape" ]]; then  # a dynamic ONNX without --shapes: v7.0's profile (trtexec alone would pick 1x3x1x1)
    shapes="$(ONNX="$onnx" python3 -c '
import json, os
meta = json.load(open(os.environ["ONNX"] + ".json"))
if meta.get("dynamic"):
    (height, width), batch = meta["imgsz"], int(meta["batch"])
    print(" ".join(f"{n}x3x{height}x{width}" for n in (1, max(1, batch // 2), batch)))
')"
    if [[ -n "$shapes" ]]; then
        read -r min_shape opt_shape max_shape <<<"$shapes"
        echo "to_trt.sh: $onnx has dynamic axes and no --shapes were given: profile min $min_shape opt $opt_shape max $max_shape"
    fi
fi

cmd=("$trtexec" "--onnx=$onnx" "--saveEngine=$output" "--memPoolSize=workspace:${workspace}M")
[[ $fp16 -eq 1 ]] && cmd+=("--fp16")
[[ $int8 -eq 1 ]] && cmd+=("--int8" "--calib=$calib")
if [[ -n "$min_shape" ]]; then
    cmd+=("--minShapes=${input_name}:${min_shape}" "--optShapes=${input_name}:${opt_shape}"
          "--maxShapes=${input_name}:${max_shape}")
fi

echo "+ ${cmd[*]}"
"${cmd[@]}"

# The Python package's version is what TensorRTBackend compares against; trtexec's banner is the fallback.
trt_version="$(python3 -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null || true)"
if [[ -z "$trt_version" ]]; then
    trt_version="$("$trtexec" --version 2>&1 | grep -oE 'TensorRT v?[0-9.]+' | head -n1 | grep -oE '[0-9.]+$' || true)"
fi
if command -v nvidia-smi >/dev/null 2>&1; then
    gpu_name="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1)"
    capability="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1)"
else  # Jetson without nvidia-smi
    gpu_name="$(python3 -c 'import torch; print(torch.cuda.get_device_name(0))')"
    capability="$(python3 -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))')"
fi
precision="fp32"; [[ $fp16 -eq 1 ]] && precision="fp16"; [[ $int8 -eq 1 ]] && precision="int8"

ONNX="$onnx" ENGINE="$output" TRT="$trt_version" GPU="$gpu_name" CAP="$capability" PRECISION="$precision" \
MIN="$min_shape" OPT="$opt_shape" MAX="$max_shape" python3 - <<'PY'
import datetime
import json
import os

onnx, engine = os.environ["ONNX"], os.environ["ENGINE"]
try:
    with open(onnx + ".json") as f:
        meta = json.load(f)
except FileNotFoundError:
    raise SystemExit(f"to_trt.sh: {onnx}.json (the export sidecar) is missing; export with export.py first")
shape = lambda s: [int(v) for v in s.split("x")] if s else None
profile = {"min": shape(os.environ["MIN"]), "opt": shape(os.environ["OPT"]), "max": shape(os.environ["MAX"])}
free = [axis for i, axis in ((0, "batch"), (2, "height"), (3, "width"))
        if profile["min"] and profile["min"][i] != profile["max"][i]]  # what the engine accepts, not the ONNX
meta.update(format="engine", precision=os.environ["PRECISION"], dynamic=free,
            profile=profile if profile["min"] else None,
            engine={"tensorrt": os.environ["TRT"], "gpu": os.environ["GPU"], "compute_capability": os.environ["CAP"]},
            created=datetime.datetime.now().isoformat(timespec="seconds"), built_with="to_trt.sh")
with open(engine + ".json", "w") as f:
    json.dump(meta, f, indent=2, sort_keys=True)
print(f"engine {engine}, sidecar {engine}.json (TensorRT {os.environ['TRT']}, {os.environ['GPU']}, sm {os.environ['CAP']})")
PY
