#!/usr/bin/env bash
# Checks a CUDA build of chimap on a GPU machine that has a CUDA 13 driver and libraries but
# no Rust toolchain. Two halves:
#
#   here (build machine):  bash scripts/build_cuda.sh --bundle   # out/gpu/ and out/gpu.tar.xz
#   there (GPU machine):   bash scripts/gpu_check.sh [out/gpu]   # from the repo root; unpacks
#                                                               # out/gpu.tar.xz when needed
# With the `run` tool of a session that has a GPU: carry ["out/gpu.tar.xz"] (about 21 MiB).
#
# It prints the GPU and the libraries the binaries resolve, then
#   1. the CUDA-vs-CPU tests (src/nn/cuda_tests.rs: every op with gradients, LP-CNN whole and
#      tiled, LoopNet, a training step) and the CPU tests of nn and the learned methods,
#   2. the app end to end on bids/example with --method lpcnn --device cuda, compared voxel
#      by voxel with the same run on --device cpu,
#   3. the whole-head inference benchmark (benches/device.rs): CPU vs CUDA time and memory.
# Everything it prints is also written to $OUT (or out/gpu-check) as log files.
set -uo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${1:-out/gpu}
LOGS=${OUT:-out/gpu-check}
if [[ ! -x $BUNDLE/chimap && -f out/gpu.tar.xz ]]; then
    mkdir -p out/unpacked && tar -C out/unpacked -xJf out/gpu.tar.xz && BUNDLE=out/unpacked/gpu
fi
mkdir -p "$LOGS"
status=0
step() { echo; echo "== $*"; }

# CUDA libraries from a toolkit or from PyPI wheels carried along, if the loader lacks them.
for dir in /usr/local/cuda/lib64 "$BUNDLE/lib"; do
    [[ -d $dir ]] && export LD_LIBRARY_PATH=$dir:${LD_LIBRARY_PATH:-}
done

step "GPU and driver"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$LOGS/gpu.txt"

step "shared libraries of the binaries"
for bin in "$BUNDLE"/chimap "$BUNDLE"/lib-tests "$BUNDLE"/bench-device; do
    echo "$bin:"
    ldd "$bin" | grep -E 'cuda|cublas|cufft|curand|nvrtc|not found' | sed 's/^/  /'
    if ldd "$bin" | grep -q 'not found'; then
        echo "  missing libraries: put them on LD_LIBRARY_PATH (or in $BUNDLE/lib)"
        status=1
    fi
done 2>&1 | tee "$LOGS/ldd.txt"

step "1. tests: CUDA against CPU, then the CPU tests of nn and the learned methods"
"$BUNDLE/lib-tests" --test-threads=1 nn::cuda_tests 2>&1 | tee "$LOGS/cuda_tests.txt"
[[ ${PIPESTATUS[0]} == 0 ]] || status=1
"$BUNDLE/lib-tests" nn:: inversion::learned 2>&1 | tail -5 | tee "$LOGS/cpu_tests.txt"
[[ ${PIPESTATUS[0]} == 0 ]] || status=1

step "2. the app on bids/example: LP-CNN on CUDA and on the CPU"
for dev in cuda cpu; do
    rm -rf "out/gpu-example-$dev"
    /usr/bin/time -v "$BUNDLE/chimap" bids/example "out/gpu-example-$dev" participant \
        --participant-label 1 --method lpcnn --device "$dev" \
        2>"$LOGS/example-$dev.log"
    rc=$?
    grep -E 'device|Elapsed|Maximum resident' "$LOGS/example-$dev.log"
    [[ $rc == 0 ]] || { echo "chimap --device $dev failed ($rc): $LOGS/example-$dev.log"; status=1; }
done
# Same maps within float tolerance: the comparison uses chimap's own `evaluate`.
cuda_map=$(find out/gpu-example-cuda -name '*lpcnn*_Chimap.nii.gz' | sort | head -1)
cpu_map=$(find out/gpu-example-cpu -name '*lpcnn*_Chimap.nii.gz' | sort | head -1)
mask=${cpu_map/desc-lpcnn_Chimap/desc-brain_mask}
[[ -f $mask ]] || mask=$(find out/gpu-example-cpu -name '*desc-brain_mask.nii.gz' | sort | head -1)
if [[ -n $cuda_map && -n $cpu_map && -n $mask ]]; then
    "$BUNDLE/chimap" evaluate --reference "$cpu_map" --mask "$mask" "$cuda_map" 2>&1 |
        tee "$LOGS/example-compare.txt"
else
    echo "no maps to compare (cuda: '$cuda_map', cpu: '$cpu_map', mask: '$mask')"
    status=1
fi

step "3. whole-head inference benchmark (200x230x190)"
"$BUNDLE/bench-device" --dims 200,230,190 2>&1 | tee "$LOGS/bench.txt"
[[ ${PIPESTATUS[0]} == 0 ]] || status=1

echo
[[ $status == 0 ]] && echo "gpu check: all passed" || echo "gpu check: FAILED (see $LOGS)"
exit $status
