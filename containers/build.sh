#!/usr/bin/env bash
# Builds the chimap runtime image as a real OCI image without a Docker engine or a registry,
# with Debian's buildah (vfs storage), then runs the BIDS-App inside it on bids/example.
#
#   sudo apt-get install buildah podman     # Debian 12; run this script as root
#   bash containers/build.sh                # image localhost/chimap/chimap:0.1.0
#
# containers/Dockerfile needs the rust and debian images from Docker Hub; where no registry can
# be reached (as on this project's machines), this script takes the same two stages from the
# host instead: the build stage is `cargo build --release --locked --bin chimap` here (Debian 12,
# the Dockerfile's build image is Debian 12 too), and the runtime stage starts from scratch
# with the binary and the four glibc libraries it links (ldd), so the image holds nothing else.
# Layout and entry point are the Dockerfile's: /usr/local/bin/chimap, ENTRYPOINT ["chimap"].
# Outputs: the image in buildah/podman's vfs storage and out/chimap-<version>.oci.tar.
#
# `bash containers/build.sh --cuda` builds the CUDA variant (containers/Dockerfile.cuda's
# layout) the same way: the binary from scripts/build_cuda.sh, plus the CUDA libraries it
# links, taken from the PyPI wheels that script installs, in /usr/local/cuda/lib64. The
# driver's libcuda.so.1 is not in the image: `--nv` (Apptainer) or `--gpus all` (Docker)
# brings the host's. Here, without a GPU, the run binds the build's no-device stub instead and
# checks that --device auto falls back to the CPU and --device cuda stops with a clear error.
# Image chimap/chimap:<version>-cuda, archive out/chimap-<version>-cuda.oci.tar.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
STORE=(--storage-driver vfs)
CUDA=0
[[ ${1:-} == --cuda ]] && CUDA=1

VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
IMAGE=chimap/chimap:$VERSION
if [[ $CUDA == 1 ]]; then
    IMAGE=$IMAGE-cuda
    echo "== build stage: scripts/build_cuda.sh (cargo build --release --features cuda)"
    bash scripts/build_cuda.sh
    CUDA_TARGET=${CARGO_TARGET_DIR:-$REPO/../cuda-target}
    BIN=$CUDA_TARGET/release/chimap
    LINK=$CUDA_TARGET/cuda-link
else
    echo "== build stage: cargo build --release --locked --bin chimap"
    cargo build --release --locked --bin chimap
    BIN=${CARGO_TARGET_DIR:-target}/release/chimap
fi
TAG=${IMAGE#chimap/chimap:}

echo "== runtime stage: from scratch, the binary and the libraries it links"
ROOTFS=$(mktemp -d "${TMPDIR:-/tmp}/chimap-rootfs.XXXXXX")
trap 'rm -rf "$ROOTFS"' EXIT
install -D -m 0755 "$BIN" "$ROOTFS/usr/local/bin/chimap"
# Each library at the path the binary asks for (the loader at /lib64, the rest in the Debian
# multiarch folder), resolved from symlinks to the real files.
if [[ $CUDA == 1 ]]; then
    # CUDA libraries into /usr/local/cuda/lib64 under their sonames (NVRTC also opens its
    # builtins library at run time); the driver stub stays out of the image.
    for lib in $(LD_LIBRARY_PATH=$LINK ldd "$BIN" | awk '/=> \//{print $3}' | grep "^$LINK/") \
               "$LINK"/libnvrtc-builtins.so.*; do
        name=$(basename "$lib")
        [[ $name == libcuda.so.1 ]] && continue
        install -D -m 0755 "$(readlink -f "$lib")" "$ROOTFS/usr/local/cuda/lib64/$name"
    done
    SYSLIBS=$(LD_LIBRARY_PATH=$LINK ldd "$BIN" "$ROOTFS"/usr/local/cuda/lib64/* 2>/dev/null |
        awk '/=> \//{print $3} /^[ \t]+\//{print $1}' | grep -v "^$LINK/" | sort -u)
else
    SYSLIBS=$(ldd "$BIN" | awk '/=> \//{print $3} /^[ \t]*\//{print $1}')
fi
for lib in $SYSLIBS; do
    install -D -m 0755 "$(readlink -f "$lib")" "$ROOTFS$lib"
done
# BIDS-Apps run as an arbitrary user: a world-writable /tmp, and nothing else writable.
install -d -m 1777 "$ROOTFS/tmp"
find "$ROOTFS" -type f | sed "s|^$ROOTFS||"

CUDA_ENV=()
if [[ $CUDA == 1 ]]; then
    CUDA_ENV=(--env LD_LIBRARY_PATH=/usr/local/cuda/lib64
              --env NVIDIA_VISIBLE_DEVICES=all --env NVIDIA_DRIVER_CAPABILITIES=compute,utility)
fi
CTR=$(buildah "${STORE[@]}" from scratch)
trap 'rm -rf "$ROOTFS"; buildah "${STORE[@]}" rm "$CTR" >/dev/null 2>&1 || true' EXIT
buildah "${STORE[@]}" copy "$CTR" "$ROOTFS" /
buildah "${STORE[@]}" config \
    --entrypoint '["chimap"]' --cmd '["--help"]' \
    --env PATH=/usr/local/bin:/usr/bin:/bin \
    ${CUDA_ENV[@]+"${CUDA_ENV[@]}"} \
    --workingdir /tmp \
    --label org.opencontainers.image.title=chimap \
    --label org.opencontainers.image.version="$VERSION" \
    --label org.opencontainers.image.description="QSM BIDS-App: multi-echo GRE phase to BIDS Chimap (ppm)" \
    "$CTR"
buildah "${STORE[@]}" commit --quiet --rm "$CTR" "$IMAGE" >/dev/null
trap 'rm -rf "$ROOTFS"' EXIT
mkdir -p out
rm -f "out/chimap-$TAG.oci.tar"
buildah "${STORE[@]}" push --quiet "$IMAGE" "oci-archive:out/chimap-$TAG.oci.tar"
buildah "${STORE[@]}" images "$IMAGE"
echo "OCI archive: out/chimap-$TAG.oci.tar ($(du -h "out/chimap-$TAG.oci.tar" | cut -f1))"

echo "== the image's entry point"
ENTRY=$(buildah "${STORE[@]}" inspect --type image "$IMAGE" |
    python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)["OCIv1"]["config"]["Entrypoint"]))')
echo "ENTRYPOINT $ENTRY"
test "$ENTRY" = '["chimap"]'

echo "== run the BIDS-App in the image on bids/example (data read-only)"
RUNOUT=$REPO/out/container-example
rm -rf "$RUNOUT" && mkdir -p "$RUNOUT"
ARGS=(/bids /out participant --nthreads 2)
EXTRA=()
if [[ $CUDA == 1 ]]; then
    # No GPU here: the no-device driver stub stands in for the host's libcuda.so.1.
    # The shipped LP-CNN weights are inside the binary: no weights file is mounted.
    EXTRA=(-v "$(readlink -f "$LINK/libcuda.so.1"):/usr/local/cuda/lib64/libcuda.so.1:ro")
    ARGS+=(--method lpcnn --device auto)
fi
# podman runs the image as `docker run` would (through its entry point). Inside some sandboxes
# the OCI runtime may not set resource limits ("setrlimit ... Operation not permitted"); then
# the same image runs through buildah's chroot isolation, with the same bind mounts.
if podman "${STORE[@]}" run --rm --network none --cgroups disabled \
    -u "$(id -u):$(id -g)" \
    -v "$REPO/bids/example:/bids:ro" -v "$RUNOUT:/out" ${EXTRA[@]+"${EXTRA[@]}"} \
    "$IMAGE" "${ARGS[@]}" 2> "$RUNOUT.podman.log"; then
    RUNNER=podman
    echo "ran with podman run"
else
    cat "$RUNOUT.podman.log"
    echo "podman run failed (above); running the image with buildah run --isolation chroot"
    CTR=$(buildah "${STORE[@]}" from "$IMAGE")
    trap 'rm -rf "$ROOTFS"; buildah "${STORE[@]}" rm "$CTR" >/dev/null 2>&1 || true' EXIT
    buildah "${STORE[@]}" run --isolation chroot \
        -v "$REPO/bids/example:/bids:ro" -v "$RUNOUT:/out" ${EXTRA[@]+"${EXTRA[@]}"} \
        "$CTR" -- chimap "${ARGS[@]}"
    RUNNER=buildah
fi
grep -i device "$RUNOUT.podman.log" || true
rm -f "$RUNOUT.podman.log"
if [[ $CUDA == 1 ]]; then
    ls "$RUNOUT"/sub-*/anat/*lpcnn*_Chimap.nii.gz
    echo "== --device cuda without a GPU: a clear error, exit status 2"
    set +e
    if [[ $RUNNER == podman ]]; then
        podman "${STORE[@]}" run --rm --network none --cgroups disabled "${EXTRA[@]}" \
            -v "$REPO/bids/example:/bids:ro" "$IMAGE" /bids /tmp/o participant --device cuda \
            --method lpcnn 2>"$RUNOUT.err"
    else
        buildah "${STORE[@]}" run --isolation chroot "${EXTRA[@]}" \
            -v "$REPO/bids/example:/bids:ro" "$CTR" -- chimap /bids /tmp/o participant \
            --device cuda --method lpcnn 2>"$RUNOUT.err"
    fi
    rc=$?
    set -e
    cat "$RUNOUT.err"
    test $rc -eq 2 && grep -q 'no CUDA device' "$RUNOUT.err"
    rm -f "$RUNOUT.err"
    echo "containers/build.sh --cuda: image $IMAGE built; ran the example on the CPU fallback"
    exit 0
fi
ls "$RUNOUT"/sub-*/anat/*_Chimap.nii.gz
test "$(ls "$RUNOUT"/sub-*/anat/*_Chimap.nii.gz | wc -l)" -eq \
     "$(find bids/example -path '*/derivatives' -prune -o -name '*_echo-1_part-phase_MEGRE.nii.gz' -print | wc -l)"
echo "containers/build.sh: image $IMAGE built and ran the example"
