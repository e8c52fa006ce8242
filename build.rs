//! Build script: only the `cuda` feature needs it. cudarc, under the dynamic linking candle
//! uses, links the driver, cuBLAS, cuRAND and NVRTC but not cuFFT, which the dipole operator
//! calls; add it here with the folders where the toolkit keeps its libraries. The default
//! (CPU) build does nothing here.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for var in ["CHIMAP_CUDA_LIB_DIR", "CUDA_PATH", "CUDA_HOME", "CUDA_ROOT"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let mut dirs: Vec<PathBuf> = Vec::new();
    // A folder of libcufft.so & co. (scripts/build_cuda.sh makes one from the PyPI wheels).
    if let Some(dir) = env::var_os("CHIMAP_CUDA_LIB_DIR") {
        dirs.push(dir.into());
    }
    for var in ["CUDA_PATH", "CUDA_HOME", "CUDA_ROOT"] {
        if let Some(root) = env::var_os(var) {
            let root = PathBuf::from(root);
            dirs.extend(["lib64", "lib", "lib/x64"].map(|sub| root.join(sub)));
        }
    }
    dirs.push("/usr/local/cuda/lib64".into());
    for dir in dirs.into_iter().filter(|d| d.is_dir()) {
        println!("cargo:rustc-link-search=native={}", dir.display());
    }
    println!("cargo:rustc-link-lib=dylib=cufft");
}
