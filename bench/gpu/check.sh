#!/usr/bin/env bash
# The one GPU check (issues 11 and 16), sized for 10 minutes on one GPU:
#   1. bench/gpu/determinism.py  determinism: exact per family (SD 1.x first, then sdxl, flux, causal-lm):
#      two uninterrupted runs equal, SIGTERM and SIGKILL resumes equal; steps/s and peak memory exact vs fast
#   2. bench/gpu/check.py        the CUDA training options on a tiny SDXL (fp32, bf16, fp16 + GradScaler,
#      gradient checkpointing, adamw8bit), each stopped and resumed bit-exactly
# Each prints its table and writes one JSON under bench/results/. Exit 0 when both passed.
#
#   bash bench/gpu/check.sh                  # on a CUDA machine (installs the virtualenv first if missing)
#   bash bench/gpu/check.sh --device cpu     # the end-to-end proof on a CPU: SD only, a few steps
#
#   3. bench/gpu/sdxl.py         only when DIFFUSERS_SCRIPT names diffusers' train_text_to_image_lora_sdxl.py:
#      the same figures (steps/s, peak memory) for it and for lora-train on the same model and data
#
# DETERMINISM_BUDGET (seconds, default 330): no family of step 1 starts after it, so step 2 still fits.
set -uo pipefail
cd "$(dirname "$0")/../.."
device=cuda
if [[ "${1:-}" == "--device" ]]; then device="${2:?--device cuda|cpu}"; fi
python="${PYTHON:-.venv/bin/python}"
if [[ ! -x "$python" ]]; then
  make install || exit 1  # the project's pinned virtualenv (torch from PyPI: a CUDA build on Linux x86-64)
fi
export HF_HUB_OFFLINE=1
results=bench/results
start=$(date +%s)
if [[ "$device" == cuda ]]; then
  "$python" bench/gpu/determinism.py --budget-seconds "${DETERMINISM_BUDGET:-330}" --out "$results/determinism.json"
  det=$?
  "$python" bench/gpu/check.py --out "$results/gpu_check.json"
  chk=$?
else
  "$python" bench/gpu/determinism.py --device cpu --families sd --steps 4 --save-steps 2 \
    --out "$results/determinism_check_cpu.json"
  det=$?
  "$python" bench/gpu/check.py --device cpu --variants fp32 --steps 2 --out "$results/gpu_check_cpu.json"
  chk=$?
fi
ref=0
if [[ -n "${DIFFUSERS_SCRIPT:-}" ]]; then
  tiny=(); [[ "$device" == cpu ]] && tiny=(--tiny --reps 1)
  "$python" bench/gpu/sdxl.py --device "$device" "${tiny[@]}" --diffusers-script "$(realpath "$DIFFUSERS_SCRIPT")" \
    --out "$results/gpu_check_diffusers_$device.json"
  ref=$?
fi
echo "bench/gpu/check.sh on $device: determinism.py exit $det, check.py exit $chk, sdxl.py (diffusers script) exit" \
  "$ref$([[ -z "${DIFFUSERS_SCRIPT:-}" ]] && echo ' (not run: DIFFUSERS_SCRIPT unset)'), $(( $(date +%s) - start ))s"
[[ $det -eq 0 && $chk -eq 0 && $ref -eq 0 ]]
