//! Dipole inversion: local field (ppm) → susceptibility χ (ppm).
//!
//! Every method implements [`Method`], so `--method` is a lookup and each method gets the
//! same referencing, sidecar and report. All of them use the one `DipoleOperator`.

pub mod learned;
pub mod tkd;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::physics::DipoleOperator;
use crate::{Mask, Result};

/// A local field measured at one head orientation.
pub struct Orientation<'a> {
    /// Local field in ppm on the grid of the problem, zero outside the mask.
    pub field: &'a [f32],
    /// Unit B0 direction in the voxel frame.
    pub b0: [f64; 3],
}

/// What every inversion method receives.
pub struct Problem<'a> {
    pub dims: [usize; 3],
    pub voxel_size: [f64; 3],
    /// One or more orientations on the same grid.
    pub orientations: Vec<Orientation<'a>>,
    /// Where the local field is valid; χ is returned inside it (zero outside).
    pub mask: &'a Mask,
}

impl Problem<'_> {
    /// The dipole operator of orientation `n`.
    pub fn operator(&self, n: usize) -> DipoleOperator {
        DipoleOperator::new(self.dims, self.voxel_size, self.orientations[n].b0)
    }
}

/// A dipole-inversion method.
pub trait Method {
    /// Short name used in file names (`desc-<name>`) and sidecars.
    fn name(&self) -> &'static str;
    /// χ in ppm, zero outside the mask, not yet referenced.
    fn invert(&self, problem: &Problem) -> Result<Vec<f32>>;
    /// The parameters used, for the sidecar.
    fn parameters(&self) -> serde_json::Value;
}

/// The methods that `--method` accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MethodName {
    /// Thresholded k-space division (Shmueli et al. 2009).
    Tkd,
    /// Learned proximal gradient descent (Lai et al. 2020); needs `--weights`.
    Lpcnn,
    /// Looped U-net with GHPA (Chen et al. 2024); needs `--weights`.
    Loopnet,
    /// Plain 3D U-net baseline; needs `--weights`.
    Unet,
}

impl MethodName {
    /// The name used in file names and sidecars.
    pub fn as_str(self) -> &'static str {
        match self {
            MethodName::Tkd => "tkd",
            MethodName::Lpcnn => "lpcnn",
            MethodName::Loopnet => "loopnet",
            MethodName::Unet => "unet",
        }
    }
}

/// The `inversion` section of the configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Inversion method.
    pub method: MethodName,
    /// Parameters of TKD.
    pub tkd: tkd::Config,
    /// Weights (safetensors) of the learned methods; required by them, no default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weights: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            method: MethodName::Tkd,
            tkd: tkd::Config::default(),
            weights: None,
        }
    }
}

impl Config {
    /// The configured method, ready to run; an error when a learned method has no weights.
    pub fn method(&self) -> Result<Box<dyn Method + Send + Sync>> {
        Ok(match self.method {
            MethodName::Tkd => Box::new(tkd::Tkd::new(self.tkd.clone())),
            m => Box::new(learned::Learned::new(m, self.weights.clone())?),
        })
    }
}

/// Subtracts the mean of χ over `reference` from every voxel inside `mask` and returns the
/// mean removed. χ is only defined up to a constant (D(0) = 0), so maps are reported
/// relative to a region; the sidecar names it.
pub fn reference_to_mean(chi: &mut [f32], mask: &Mask, reference: &Mask) -> f64 {
    let (sum, n) = chi
        .iter()
        .zip(reference)
        .filter(|(_, &r)| r)
        .fold((0.0f64, 0usize), |(s, n), (&v, _)| (s + v as f64, n + 1));
    let mean = if n > 0 { sum / n as f64 } else { 0.0 };
    for (v, &m) in chi.iter_mut().zip(mask) {
        *v = if m { *v - mean as f32 } else { 0.0 };
    }
    mean
}
