#!/usr/bin/env bash
# Peak memory of the participant pipeline, measured beside chimap's own estimate (the one
# `--mem-gb` and `--dry-run` use), for a grid and a list of methods: README's memory table.
#
#   bash scripts/memory_table.sh DATASET [METHOD...]
#
# DATASET is a raw BIDS dataset with one acquisition, e.g. from
#   chimap simulate --chi ../shared/data/mni_phantom/chi_head.nii.gz \
#       --chi-brain ../shared/data/mni_phantom/chi_brain.nii.gz \
#       --seg ../shared/data/mni_phantom/seg.nii.gz /tmp/mni-1mm          # 1 mm, 5 echoes
#   chimap simulate --dims 440 440 300 --voxel-size 0.5 0.5 0.5 --field-strength 7 \
#       --echo-times 3 6 9 12 15 18 --oversample 1 --dtype int16 /tmp/head-7t  # 0.5 mm
# The iterative methods run a few iterations only: their buffers are all allocated by then,
# and the peak does not grow with iterations. Peaks are the kernel's (VmHWM, as `time -v`
# reports); runs are one after another, so nothing else shares the figure.
set -euo pipefail
cd "$(dirname "$0")/.."
DATASET=$1
shift
METHODS=("$@")
[ ${#METHODS[@]} -gt 0 ] || METHODS=(tkd cfl2 ilsqr tv rts medi tfi lpcnn loopnet unet)
BIN=${CHIMAP:-target/release/chimap}
[ -x "$BIN" ] || cargo build --release --quiet
WORK=$(mktemp -d "${TMPDIR:-/tmp}/chimap-memory.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cat > "$WORK/few.yaml" <<'EOF'
inversion:
  ilsqr:
    max_iterations: 3
  tv:
    max_iterations: 3
  rts:
    max_iterations: 2
  medi:
    max_iterations: 1
    cg_iterations: 3
  tfi:
    max_relative_residual: 100.0
    admm:
      max_iterations: 3
EOF
echo "| method | estimate (GiB) | measured peak (GiB) | estimate / peak | stage of the peak | seconds |"
echo "|---|---|---|---|---|---|"
for m in "${METHODS[@]}"; do
    estimate=$("$BIN" "$DATASET" "$WORK/x" participant --method "$m" --dry-run 2>/dev/null |
        sed -n 's/^memory: .* needs about \([0-9.]*\) GiB.*/\1/p' | head -1)
    start=$(date +%s)
    "$BIN" "$DATASET" "$WORK/out-$m" participant --method "$m" --config "$WORK/few.yaml" \
        -q > /dev/null 2>&1 || true
    seconds=$(($(date +%s) - start))
    sidecar=$(find "$WORK/out-$m" -name '*_Chimap.json' | head -1)
    if [ -z "$sidecar" ]; then
        echo "| $m | $estimate | (failed) | | | $seconds |"
        continue
    fi
    python3 - "$sidecar" "$m" "$estimate" "$seconds" <<'PY'
import json, sys
path, method, estimate, seconds = sys.argv[1:]
peaks = json.load(open(path))["PeakMemoryGiB"]
peak = peaks.pop("peak")
# The stage after which the peak was first reached (the values only grow), in the
# pipeline's order (src/pipeline/progress.rs: STAGE_ORDER; JSON keys are sorted).
order = ["load", "phase scaling", "echo fit and magnitude mask", "mask refinement",
         "signal voids", "background removal", "void sources", "checks", "registration",
         "inversion"]
stage = next(s for s in order if peaks.get(s, 0) >= peak)
print(f"| {method} | {estimate} | {peak:.2f} | {float(estimate) / peak:.2f} | {stage} | {seconds} |")
PY
    rm -rf "$WORK/out-$m"
done
