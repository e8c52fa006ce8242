//! Dipole inversion: local field (ppm) → susceptibility χ (ppm).
//!
//! Every method implements [`Method`], so `--method` is a lookup and each method gets the
//! same referencing, sidecar and report. All of them use the one `DipoleOperator`.

pub mod cfl2;
pub mod cgls;
pub mod cosmos;
pub mod ilsqr;
pub mod lambda;
pub mod learned;
pub mod medi;
pub mod rts;
pub mod sstv;
#[cfg(test)]
pub(crate) mod testing;
pub mod tfi;
pub mod tkd;
pub mod tv;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use rayon::prelude::*;
use rustfft::num_complex::Complex32;

use crate::physics::fft::Fft3;
use crate::physics::{dipole_kernel, DipoleOperator};
use crate::{Error, Mask, Result};

/// A local field measured at one head orientation.
pub struct Orientation<'a> {
    /// Local field in ppm on the grid of the problem, zero outside the mask.
    pub field: &'a [f32],
    /// Unit B0 direction in the voxel frame.
    pub b0: [f64; 3],
}

/// The total field of one orientation, background included, for the one-step methods (TFI).
pub struct TotalField<'a> {
    /// Total field in ppm on the grid of the problem, valid on `support`.
    pub field: &'a [f32],
    /// Where the total field was measured and is trusted (the brain and, for raw phase, the
    /// tissue with signal around it).
    pub support: &'a Mask,
    /// Relative reliability of each voxel's total field; `None` = uniform on `support`.
    pub weight: Option<&'a [f32]>,
}

/// What every inversion method receives.
pub struct Problem<'a> {
    pub dims: [usize; 3],
    pub voxel_size: [f64; 3],
    /// One or more orientations on the same grid.
    pub orientations: Vec<Orientation<'a>>,
    /// Where the local field is valid; χ is returned inside it (zero outside).
    pub mask: &'a Mask,
    /// Relative reliability of each voxel's field (e.g. inverse noise, mean 1 in the mask),
    /// used by the weighted methods (iLSQR, TV-ADMM); `None` = uniform inside the mask.
    pub weight: Option<&'a [f32]>,
    /// Magnitude image on the same grid, for methods with anatomical priors (MEDI's edge
    /// mask); `None` when the input had none.
    pub magnitude: Option<&'a [f32]>,
    /// The total field, given to the one-step methods ([`Method::one_step`]) by pipelines
    /// that have it (raw phase, total field maps); `None` otherwise.
    pub total: Option<TotalField<'a>>,
    /// The ventricles' CSF, where MEDI+0 holds χ uniform; `None` when the pipeline found
    /// none (field-map inputs, one echo, no ventricles).
    pub csf: Option<&'a Mask>,
}

impl Problem<'_> {
    /// The dipole operator of orientation `n`.
    pub fn operator(&self, n: usize) -> DipoleOperator {
        DipoleOperator::new(self.dims, self.voxel_size, self.orientations[n].b0)
    }

    /// The dipole kernel of every orientation, on the half spectrum.
    pub fn kernels(&self) -> Vec<Vec<f32>> {
        self.orientations
            .iter()
            .map(|o| dipole_kernel(self.dims, self.voxel_size, o.b0))
            .collect()
    }

    /// The data weight inside the mask, zero outside: the problem's weight or the mask.
    pub fn data_weight(&self) -> Vec<f32> {
        match self.weight {
            Some(w) => w
                .iter()
                .zip(self.mask)
                .map(|(&w, &m)| if m && w.is_finite() { w.max(0.0) } else { 0.0 })
                .collect(),
            None => self.mask.iter().map(|&m| m as u8 as f32).collect(),
        }
    }

    /// W² with W scaled to mean 1 in the mask, so λ means the same whatever the weight's
    /// units; an error naming `method` when the mask or the weight is empty.
    pub fn squared_unit_weight(&self, method: &str) -> Result<Vec<f32>> {
        let w = self.data_weight();
        let inside = w.iter().zip(self.mask).filter(|(_, &m)| m).map(|(&w, _)| w);
        let scale = unit_mean_scale(inside)
            .ok_or_else(|| Error::Numerics(format!("{method}: the mask or the weight is empty")))?;
        Ok(w.iter().map(|w| (w * scale).powi(2)).collect())
    }

    /// Fails with a clear message unless every orientation's field has the grid's size.
    fn check(&self, method: &str) -> Result<()> {
        let n: usize = self.dims.iter().product();
        if self.orientations.is_empty() {
            return Err(Error::Numerics(format!(
                "{method} needs at least one local field"
            )));
        }
        if self.mask.len() != n
            || self.orientations.iter().any(|o| o.field.len() != n)
            || self.weight.is_some_and(|w| w.len() != n)
            || self.magnitude.is_some_and(|w| w.len() != n)
        {
            return Err(Error::Numerics(format!(
                "{method}: field, mask, weight and magnitude must all have {n} voxels"
            )));
        }
        Ok(())
    }
}

/// `Σᵢ g(Dᵢ)·FFT(fᵢ)` and `Σᵢ g(Dᵢ)²` over the orientations of `problem`: the numerator and
/// denominator of every closed-form k-space solution (TKD with `g` = truncation, CFL2 and
/// COSMOS with `g` = identity). For one orientation it is `g(D)F` and `g(D)²`.
pub fn combined_spectrum(
    problem: &Problem,
    fft: &Fft3,
    g: impl Fn(f32) -> f32 + Sync,
) -> (Vec<Complex32>, Vec<f32>) {
    let fields: Vec<&[f32]> = problem.orientations.iter().map(|o| o.field).collect();
    let kernels = problem.kernels();
    let kernels: Vec<&[f32]> = kernels.iter().map(Vec::as_slice).collect();
    crate::physics::dipole::combine_orientations(fft, &fields, &kernels, g)
}

/// Zeroes `chi` outside the mask.
fn restrict(mut chi: Vec<f32>, mask: &Mask) -> Vec<f32> {
    chi.par_iter_mut().zip(mask.par_iter()).for_each(|(v, &m)| {
        if !m {
            *v = 0.0;
        }
    });
    chi
}

/// A dipole-inversion method.
pub trait Method {
    /// Short name used in file names (`desc-<name>`) and sidecars.
    fn name(&self) -> &'static str;
    /// χ in ppm, zero outside the mask, not yet referenced.
    fn invert(&self, problem: &Problem) -> Result<Vec<f32>>;
    /// The parameters used, for the sidecar.
    fn parameters(&self) -> serde_json::Value;
    /// Whether the pipeline should invert each multi-orientation set jointly (one Chimap per
    /// set) instead of each orientation on its own.
    fn joint_orientations(&self) -> bool {
        false
    }
    /// Whether the method inverts the total field (background and tissue as one χ) and so
    /// wants [`Problem::total`] and χ over the whole brain mask, not the background-removed
    /// field's mask.
    fn one_step(&self) -> bool {
        false
    }
    /// Rejects unusable settings, so that a bad configuration fails before any data is read
    /// rather than after each acquisition's preprocessing.
    fn check_config(&self) -> Result<()> {
        Ok(())
    }
}

/// The methods that `--method` accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MethodName {
    /// Thresholded k-space division (Shmueli et al. 2009).
    Tkd,
    /// Closed-form Tikhonov with gradient regularisation (Bilgic et al. 2014).
    Cfl2,
    /// LSQR with streaking-artifact removal (Li et al. 2015).
    Ilsqr,
    /// Total variation by ADMM, weighted data term (Bilgic et al. 2014; Milovic et al. 2018).
    Tv,
    /// Closed-form multi-orientation inversion (Liu et al. 2009); needs 2+ orientations.
    Cosmos,
    /// Rapid two-step: exact inversion off the cone, TV fills the cone (Kames et al. 2018).
    Rts,
    /// Nonlinear data term with magnitude-edge-weighted TV, Gauss-Newton (Liu et al. 2011).
    Medi,
    /// Total field inversion (Liu et al. 2018), experimental: one step from the total field,
    /// background sources and tissue χ together (TV-ADMM); needs raw phase or a total field
    /// map.
    Tfi,
    /// Single-step TV (Chatnuntawech et al. 2017): one step from the total field, its
    /// background annihilated by spherical-mean high-passes inside the data term; needs raw
    /// phase or a total field map.
    Sstv,
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
            MethodName::Cfl2 => "cfl2",
            MethodName::Ilsqr => "ilsqr",
            MethodName::Tv => "tv",
            MethodName::Cosmos => "cosmos",
            MethodName::Rts => "rts",
            MethodName::Medi => "medi",
            MethodName::Tfi => "tfi",
            MethodName::Sstv => "sstv",
            MethodName::Lpcnn => "lpcnn",
            MethodName::Loopnet => "loopnet",
            MethodName::Unet => "unet",
        }
    }

    /// A network with weights (its activations are tiled to a memory budget).
    pub fn learned(self) -> bool {
        matches!(
            self,
            MethodName::Lpcnn | MethodName::Loopnet | MethodName::Unet
        )
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
    /// Parameters of CFL2.
    pub cfl2: cfl2::Config,
    /// Parameters of iLSQR.
    pub ilsqr: ilsqr::Config,
    /// Parameters of TV-ADMM.
    pub tv: tv::Config,
    /// Parameters of COSMOS.
    pub cosmos: cosmos::Config,
    /// Parameters of RTS.
    pub rts: rts::Config,
    /// Parameters of MEDI.
    pub medi: medi::Config,
    /// Parameters of TFI.
    pub tfi: tfi::Config,
    /// Parameters of SS-TV.
    pub sstv: sstv::Config,
    /// Weights (safetensors) of the learned methods; required by them, no default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weights: Option<PathBuf>,
    /// Where the learned methods run (`--device`): auto, cpu or cuda.
    pub device: crate::nn::device::DeviceChoice,
    /// Memory for the learned methods' activations, in GiB (`--max-memory`), on the CPU or
    /// the GPU; larger volumes run in overlapping tiles.
    pub max_memory_gib: f64,
    /// The learned methods from raw phase or a total field map (one orientation): start
    /// from SS-TV (`sstv` above), LP-CNN fitting its field, which keeps the harmonic part of
    /// the local field that background removal loses; the U-nets refine SS-TV's map where
    /// they would TV's. `false`: they work from the background-removed local field, as the
    /// other methods.
    pub learned_from_total: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            method: MethodName::Tkd,
            tkd: tkd::Config::default(),
            cfl2: cfl2::Config::default(),
            ilsqr: ilsqr::Config::default(),
            tv: tv::Config::default(),
            cosmos: cosmos::Config::default(),
            rts: rts::Config::default(),
            medi: medi::Config::default(),
            tfi: tfi::Config::default(),
            sstv: sstv::Config::default(),
            weights: None,
            device: Default::default(),
            max_memory_gib: 3.0,
            learned_from_total: true,
        }
    }
}

impl Config {
    /// The configured method, ready to run; an error when a learned method has no weights.
    pub fn method(&self) -> Result<Box<dyn Method + Send + Sync>> {
        let method: Box<dyn Method + Send + Sync> = match self.method {
            MethodName::Tkd => Box::new(tkd::Tkd::new(self.tkd.clone())),
            MethodName::Cfl2 => Box::new(cfl2::Cfl2::new(self.cfl2.clone())),
            MethodName::Ilsqr => Box::new(ilsqr::Ilsqr::new(self.ilsqr.clone())),
            MethodName::Tv => Box::new(tv::TvAdmm::new(self.tv.clone())),
            MethodName::Cosmos => Box::new(cosmos::Cosmos::new(self.cosmos.clone())),
            MethodName::Rts => Box::new(rts::Rts::new(self.rts.clone())),
            MethodName::Medi => Box::new(medi::Medi::new(self.medi.clone())),
            MethodName::Tfi => Box::new(tfi::Tfi::new(self.tfi.clone())),
            MethodName::Sstv => Box::new(sstv::SsTv::new(self.sstv.clone())),
            m => Box::new(learned::Learned::new(
                m,
                self.weights.clone(),
                self.device,
                self.max_memory_gib,
                self.learned_from_total.then(|| self.sstv.clone()),
            )?),
        };
        method.check_config()?;
        Ok(method)
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

/// The factor that scales `weights` (non-negative) to mean 1; `None` when there are none or
/// they sum to zero. The one rule by which every weighted solver keeps λ unit-free.
pub(crate) fn unit_mean_scale(weights: impl Iterator<Item = f32>) -> Option<f32> {
    let (sum, count) = weights.fold((0.0f64, 0usize), |(s, k), w| (s + w as f64, k + 1));
    (count > 0 && sum > 0.0).then(|| (count as f64 / sum) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_weight_is_scaled_to_mean_one_in_the_mask() {
        assert_eq!(unit_mean_scale([1.0f32, 3.0].into_iter()), Some(0.5));
        assert_eq!(unit_mean_scale(std::iter::empty()), None);
        assert_eq!(unit_mean_scale([0.0f32, 0.0].into_iter()), None);
        let fields = [vec![0.0f32; 4]];
        let mask = vec![true, true, false, true];
        let weight = [2.0f32, 4.0, 100.0, f32::NAN];
        let p = Problem {
            weight: Some(&weight),
            ..testing::problem([4, 1, 1], &fields, &[[0.0, 0.0, 1.0]], &mask)
        };
        // Inside the mask W = (2, 4, 0 for NaN): mean 2, so (W/2)²; 0 outside the mask.
        assert_eq!(
            p.squared_unit_weight("X").unwrap(),
            vec![1.0, 4.0, 0.0, 0.0]
        );
        let empty = vec![false; 4];
        let err = testing::problem([4, 1, 1], &fields, &[[0.0, 0.0, 1.0]], &empty)
            .squared_unit_weight("X")
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("X: the mask or the weight is empty"),
            "{err}"
        );
    }

    #[test]
    fn unusable_solver_settings_fail_when_the_method_is_built() {
        let mut c = Config::default();
        for m in [
            MethodName::Tkd,
            MethodName::Tv,
            MethodName::Rts,
            MethodName::Medi,
            MethodName::Tfi,
        ] {
            c.method = m;
            assert!(c.method().is_ok(), "{m:?} defaults");
        }
        let expect = |c: &Config, needle: &str| {
            let err = c.method().err().expect("refused").to_string();
            assert!(err.contains(needle), "{needle:?} in {err}");
        };
        let mut tv = Config {
            method: MethodName::Tv,
            ..Config::default()
        };
        tv.tv.tolerance = 0.0;
        expect(&tv, "inversion.tv");
        let mut rts = Config {
            method: MethodName::Rts,
            ..Config::default()
        };
        rts.rts.delta = 1.0;
        expect(&rts, "inversion.rts.delta");
        let mut tfi = Config {
            method: MethodName::Tfi,
            ..Config::default()
        };
        tfi.tfi.pad_mm = -1.0;
        expect(&tfi, "inversion.tfi.pad_mm");
        let mut medi = Config {
            method: MethodName::Medi,
            ..Config::default()
        };
        medi.medi.radians_per_ppm = f64::NAN;
        expect(&medi, "inversion.medi");
    }
}
