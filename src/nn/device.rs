//! Where the learned models run: `--device cpu|cuda|auto`.
//!
//! CUDA exists only in a binary built with `--features cuda`; the default build has no CUDA
//! code at all, and asking it for `cuda` is a usage error that says how to rebuild. `auto`
//! takes the first CUDA device when there is one and falls back to the CPU otherwise; either
//! way the choice is logged once.

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The device requested on the command line or in the configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when this binary has it and a GPU opens, else the CPU.
    #[default]
    Auto,
    /// The CPU (all cores, or --nthreads).
    Cpu,
    /// The first CUDA GPU; an error when none opens or the binary lacks CUDA.
    Cuda,
}

impl DeviceChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceChoice::Auto => "auto",
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Cuda => "cuda",
        }
    }
}

/// Whether this binary was built with the `cuda` feature.
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// Opens the requested device. The CUDA device is opened once per process and shared, so
/// that every acquisition reuses its context, kernels and FFT plans.
pub fn open(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda => cuda().map_err(Error::Usage),
        DeviceChoice::Auto => Ok(match cuda() {
            Ok(dev) => dev,
            Err(why) => {
                log_once(&format!("device auto: CPU ({why})"));
                Device::Cpu
            }
        }),
    }
}

/// A short name for logs and sidecars: `cpu` or `cuda:0`.
pub fn name(dev: &Device) -> String {
    match dev {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda:0".into(),
        Device::Metal(_) => "metal".into(),
    }
}

fn log_once(msg: &str) {
    static LOGGED: std::sync::Once = std::sync::Once::new();
    LOGGED.call_once(|| tracing::info!("{msg}"));
}

#[cfg(not(feature = "cuda"))]
fn cuda() -> std::result::Result<Device, String> {
    Err(
        "--device cuda needs a chimap built with CUDA: rebuild with \
         `cargo build --release --features cuda` (see scripts/build_cuda.sh), or pass --device cpu"
            .into(),
    )
}

#[cfg(feature = "cuda")]
fn cuda() -> std::result::Result<Device, String> {
    use std::sync::OnceLock;
    static CUDA: OnceLock<std::result::Result<Device, String>> = OnceLock::new();
    CUDA.get_or_init(|| match Device::new_cuda(0) {
        Ok(dev) => {
            tracing::info!("device: CUDA GPU 0");
            Ok(dev)
        }
        Err(e) => {
            // One line for the log: candle appends a backtrace when RUST_BACKTRACE is set.
            let e = match e {
                candle_core::Error::WithBacktrace { inner, .. } => *inner,
                e => e,
            };
            Err(format!(
                "no CUDA device could be opened ({}); check the driver (nvidia-smi), \
                 `--nv` for Apptainer or `--gpus all` for Docker, or pass --device cpu",
                e.to_string().lines().next().unwrap_or_default()
            ))
        }
    })
    .clone()
}

/// Bytes in a `--max-memory` value given in GiB; an error for non-positive values.
pub fn budget_bytes(gib: f64) -> Result<usize> {
    if !(gib.is_finite() && gib > 0.0) {
        return Err(Error::Usage(format!(
            "--max-memory must be a positive number of GiB, got {gib}"
        )));
    }
    Ok((gib * (1u64 << 30) as f64) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_always_opens_and_auto_always_gives_a_device() {
        assert!(open(DeviceChoice::Cpu).unwrap().is_cpu());
        let auto = open(DeviceChoice::Auto).unwrap();
        // Without the feature auto can only be the CPU.
        assert!(CUDA_BUILT || auto.is_cpu());
        assert_eq!(name(&Device::Cpu), "cpu");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_rebuild() {
        let err = open(DeviceChoice::Cuda).unwrap_err().to_string();
        assert!(err.contains("--features cuda"), "{err}");
        assert!(err.contains("--device cpu"), "{err}");
    }

    #[test]
    fn memory_budget_is_positive_gib() {
        assert_eq!(budget_bytes(3.0).unwrap(), 3 << 30);
        assert_eq!(budget_bytes(0.5).unwrap(), 1 << 29);
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let err = budget_bytes(bad).unwrap_err().to_string();
            assert!(err.contains("--max-memory"), "{err}");
        }
    }
}
