#!/usr/bin/env bash
# Builds chimap with `--features cuda` on a machine with no GPU and no CUDA install, from the
# CUDA 13.0 pieces that PyPI ships as wheels, so that the binary can be carried to a GPU machine.
#
#   bash scripts/build_cuda.sh                 # release binary
#   bash scripts/build_cuda.sh --tests         # also the test and bench executables (--no-run)
#   bash scripts/build_cuda.sh --check         # also clippy with the feature
#   bash scripts/build_cuda.sh --bundle        # --tests, then out/gpu/: chimap, lib-tests and
#                                              # bench-device for scripts/gpu_check.sh
#
# Environment (all optional):
#   CHIMAP_CUDA_VENV   venv holding the wheels (default ~/.cache/chimap-cuda; created if absent)
#   CUDA_PATH          use an installed toolkit instead of the wheels (nvcc in $CUDA_PATH/bin)
#   CUDA_COMPUTE_CAP   GPU architecture for candle's kernels (default 90: H100/H200)
#   CARGO_TARGET_DIR   default ../cuda-target beside the repository, away from the CPU build
#
# CUDA 13.0 is pinned on purpose: candle's kernels are shipped as PTX and JIT-compiled by the
# driver, which refuses PTX from a newer toolkit than it supports; 13.0 runs on every CUDA 13
# driver. The binary links the CUDA libraries by soname (libcublas.so.13, libcufft.so.12, ...),
# so at run time any CUDA 13 install (or the same wheels on LD_LIBRARY_PATH) provides them.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WANT_TESTS=0
WANT_CHECK=0
WANT_BUNDLE=0
for arg in "$@"; do
    case $arg in
        --tests) WANT_TESTS=1 ;;
        --check) WANT_CHECK=1 ;;
        --bundle) WANT_TESTS=1; WANT_BUNDLE=1 ;;
        *) echo "unknown argument: $arg (expected --tests, --check or --bundle)" >&2; exit 2 ;;
    esac
done

export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/../cuda-target}

if [[ -z "${CUDA_PATH:-}" ]]; then
    VENV=${CHIMAP_CUDA_VENV:-$HOME/.cache/chimap-cuda}
    if [[ ! -x "$VENV/bin/python" ]]; then
        python3 -m venv "$VENV"
    fi
    "$VENV/bin/pip" install --quiet \
        'nvidia-cuda-nvcc==13.0.*' 'nvidia-nvvm==13.0.*' 'nvidia-cuda-crt==13.0.*' \
        'nvidia-cuda-runtime==13.0.*' 'nvidia-cuda-nvrtc==13.0.*' 'nvidia-cuda-cccl==13.0.*' \
        'nvidia-nvjitlink==13.0.*' 'nvidia-cublas==13.0.*' 'nvidia-curand==10.4.0.*' \
        'nvidia-cufft==12.0.*'
    CUDA_PATH=$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')
fi
export CUDA_PATH
export PATH=$CUDA_PATH/bin:$PATH
nvcc --version | tail -2

# The linker wants unversioned names (libcufft.so) and the driver library libcuda.so, which
# only a GPU driver installs. Build a link folder: symlinks to the toolkit's libraries, and a
# stub libcuda.so.1 exporting the driver functions cudarc declares, each answering
# CUDA_ERROR_NO_DEVICE (100). It is for linking; at run time the loader finds the driver's
# real libcuda.so.1 by its soname. On a machine without a driver, putting the stub folder on
# LD_LIBRARY_PATH lets the binary start, and --device auto then falls back to the CPU.
LINK=$CARGO_TARGET_DIR/cuda-link
mkdir -p "$LINK"
for dir in "$CUDA_PATH/lib" "$CUDA_PATH/lib64"; do
    [[ -d $dir ]] || continue
    for lib in "$dir"/lib*.so.*; do
        [[ -e $lib ]] || continue
        base=$(basename "$lib")
        ln -sfn "$lib" "$LINK/$base"
        ln -sfn "$lib" "$LINK/${base%%.so.*}.so"
    done
done
if [[ ! -e "$LINK/libcuda.so.1" ]]; then
    SYS=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -path '*cudarc-0.19.*/src/driver/sys/mod.rs' | sort | tail -1)
    [[ -n $SYS ]] || { echo "cudarc sources not found: run 'cargo fetch' first" >&2; exit 1; }
    grep -oE '^\s+fn cu[A-Za-z0-9_]+\(' "$SYS" | sed -E 's/^\s+fn (cu[A-Za-z0-9_]+)\(/int \1(void) { return 100; }/' |
        sort -u >"$LINK/cuda_stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$LINK/libcuda.so.1" "$LINK/cuda_stub.c"
    ln -sfn libcuda.so.1 "$LINK/libcuda.so"
fi
export CHIMAP_CUDA_LIB_DIR=$LINK
# The libraries' own dependencies (cublas -> cublasLt) resolve from the same folder.
export RUSTFLAGS="${RUSTFLAGS:-} -C link-arg=-Wl,-rpath-link,$LINK"

# The kernels' nvcc builds and the link are long on small machines: stay polite.
NICE=(nice -n 10)
"${NICE[@]}" cargo build --release --locked --features cuda --bin chimap
BIN=$CARGO_TARGET_DIR/release/chimap
echo "binary: $BIN ($(du -m "$BIN" | cut -f1) MiB)"
echo "shared libraries it needs:"
readelf -d "$BIN" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/  \1/p'
if [[ $WANT_TESTS == 1 ]]; then
    "${NICE[@]}" cargo test --release --locked --features cuda --no-run 2>&1 |
        tee "$CARGO_TARGET_DIR/test-executables.txt"
    "${NICE[@]}" cargo bench --locked --features cuda --bench device --no-run 2>&1 |
        tee -a "$CARGO_TARGET_DIR/test-executables.txt"
    echo "test and bench executables:"
    sed -n 's/.*Executable \(.*\) (\(.*\))$/\2|\1/p' "$CARGO_TARGET_DIR/test-executables.txt" |
        while IFS='|' read -r path name; do echo "  $(du -m "$path" | cut -f1) MiB  $name"; done
fi
if [[ $WANT_BUNDLE == 1 ]]; then
    exe() { sed -n "s|.*Executable $1 (\(.*\))\$|\1|p" "$CARGO_TARGET_DIR/test-executables.txt" | tail -1; }
    mkdir -p out/gpu
    install -m 0755 "$BIN" out/gpu/chimap
    install -m 0755 "$(exe 'unittests src/lib.rs')" out/gpu/lib-tests
    install -m 0755 "$(exe 'benches/device.rs')" out/gpu/bench-device
    strip out/gpu/* 2>/dev/null || true
    ls -l out/gpu
    # The kernels embedded in each executable are mostly PTX text: xz shrinks the bundle
    # about 7x, under what a remote run can carry (out/gpu.tar.xz; gpu_check.sh unpacks it).
    tar -C out -cf - gpu | xz -T0 -6 >out/gpu.tar.xz.partial && mv out/gpu.tar.xz.partial out/gpu.tar.xz
    echo "bundle for scripts/gpu_check.sh: out/gpu ($(du -sm out/gpu | cut -f1) MiB)," \
        "out/gpu.tar.xz ($(du -m out/gpu.tar.xz | cut -f1) MiB)"
fi
if [[ $WANT_CHECK == 1 ]]; then
    "${NICE[@]}" cargo clippy --release --locked --features cuda --all-targets -- -D warnings
fi
