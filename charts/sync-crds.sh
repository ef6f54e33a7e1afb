#!/usr/bin/env bash
# Copy the generated product CRD into the Helm chart, or check that the copy is current.
#
#   charts/sync-crds.sh          copy crds/*.lora-operator.dev.yaml into charts/lora-operator/crds/
#   charts/sync-crds.sh --check  exit 1 if the chart's copy differs from (or lacks) the source
#
# The repository-root crds/ is the source of truth (generated from the pydantic models);
# tests/integration/test_chart.py fails when the chart's copy has drifted.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src_dir="$root/crds"
dst_dir="$root/charts/lora-operator/crds"
check=false
[[ "${1:-}" == "--check" ]] && check=true

shopt -s nullglob
sources=("$src_dir"/*.lora-operator.dev.yaml)
if (( ${#sources[@]} == 0 )); then
  echo "sync-crds: no $src_dir/*.lora-operator.dev.yaml; generate the CRD first" >&2
  exit 1
fi

status=0
for src in "${sources[@]}"; do
  dst="$dst_dir/$(basename "$src")"
  if cmp -s "$src" "$dst"; then
    continue
  fi
  if $check; then
    echo "sync-crds: $dst differs from $src; run charts/sync-crds.sh" >&2
    status=1
  else
    cp "$src" "$dst"
    echo "sync-crds: updated $dst"
  fi
done
exit $status
