#!/usr/bin/env bash
# The whole pipeline on synthetic data, on a CPU (`make demo`, after `make install`): dataset ->
# training -> export fp32, fp16, bf16 and int8 -> streaming a video -> latency table -> accuracy
# table (the release gate: a non-zero exit if a backend drifts). Each step that finds its output
# already made does nothing, so a second `make demo` only streams and measures again.
#
# Outputs: data/synth (dataset), runs/tbn (checkpoints, export, export-fp16, export-bf16,
# export-int8), runs/tbn/demo (masks, overlay video, stream stats, latency and accuracy JSON + PNG charts).
# Environment: PY (default .venv/bin/python), DEMO_FRAMES (latency frames, default 20),
# DEMO_ITERS (training steps; default: the demo preset's) for a quicker smoke run.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
DATA=data/synth
RUN=runs/tbn
DEMO=$RUN/demo
FRAMES=${DEMO_FRAMES:-20}
STEPS=8
step=0
start=$(date +%s)

if [ ! -x "$PY" ]; then
    echo "demo: $PY not found; run 'make install' first (or set PY=/path/to/python)" >&2
    exit 2
fi

progress() {
    step=$((step + 1))
    echo
    echo "[$step/$STEPS] $* ($(( $(date +%s) - start )) s so far)"
}

progress "synthetic dataset -> $DATA"
"$PY" -m tbn_train.data.synth --out "$DATA"     # does nothing if it is already there

progress "train the demo model (tbn_tiny, --preset demo) -> $RUN"
# does nothing if the same run has finished there already (--overwrite trains it again)
"$PY" -m tbn_train.train --preset demo --data "$DATA" --out "$RUN" ${DEMO_ITERS:+--iters "$DEMO_ITERS"}

# Export at the dataset's frame size, so tbn-run and the accuracy check need no resize.
read -r HEIGHT WIDTH < <("$PY" -c "import json; m = json.load(open('$DATA/synth.json')); print(m['height'], m['width'])")

progress "export fp32 (${HEIGHT}x${WIDTH}) -> $RUN/export"
"$PY" -m tbn_export --checkpoint "$RUN/best.safetensors" --out "$RUN/export" \
    --height "$HEIGHT" --width "$WIDTH"

progress "export fp16 (${HEIGHT}x${WIDTH}) -> $RUN/export-fp16"
"$PY" -m tbn_export --checkpoint "$RUN/best.safetensors" --out "$RUN/export-fp16" \
    --height "$HEIGHT" --width "$WIDTH" --fp16

progress "export bf16 (${HEIGHT}x${WIDTH}), verified in bf16 -> $RUN/export-bf16"
"$PY" -m tbn_export --checkpoint "$RUN/best.safetensors" --out "$RUN/export-bf16" \
    --height "$HEIGHT" --width "$WIDTH" --bf16 --verify -q

progress "export int8 (${HEIGHT}x${WIDTH}), calibrated on the train split, verified -> $RUN/export-int8"
# --verify: ONNX Runtime must pass; OpenVINO's result is recorded, and where it fails (as it
# does for this model on OpenVINO 2026.4) the openvino backend refuses the export
"$PY" -m tbn_export --checkpoint "$RUN/best.safetensors" --out "$RUN/export-int8" \
    --height "$HEIGHT" --width "$WIDTH" --int8 --calib "$DATA/train.txt" --verify -q --overwrite

VIDEO=$(ls "$DATA"/videos/val_*.mp4 2>/dev/null | head -n 1 || true)
VIDEO=${VIDEO:-$(ls "$DATA"/videos/*.mp4 | head -n 1)}
progress "stream $VIDEO with tbn-run -> $DEMO/masks, $DEMO/overlay.mp4"
mkdir -p "$DEMO"
"$PY" -m tbn_runtime "$VIDEO" --out "$DEMO/masks" --model "$RUN/export" \
    --overlay "$DEMO/overlay.mp4" --stats "$DEMO/stream-stats.json" --overwrite --no-progress

EXPORTS="$RUN/export,$RUN/export-fp16,$RUN/export-bf16,$RUN/export-int8"
progress "latency table ($FRAMES frames; naive vs ring vs ONNX Runtime vs OpenVINO vs tbn-run)"
"$PY" benchmarks/latency.py --export "$EXPORTS" --frames "$FRAMES" \
    --warmup 3 --json "$DEMO/latency.json" --plot "$DEMO/latency.png"

progress "accuracy table (PyTorch vs ONNX Runtime and OpenVINO on $DATA val; the release gate)"
"$PY" benchmarks/accuracy.py --data "$DATA" --checkpoint "$RUN/best.safetensors" \
    --exports "$EXPORTS" --json "$DEMO/accuracy.json" --plot "$DEMO/accuracy.png"

echo
echo "demo: done in $(( $(date +%s) - start )) s; masks, overlay, tables and charts in $DEMO"
