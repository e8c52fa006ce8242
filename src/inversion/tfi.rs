//! Total field inversion (TFI; Liu et al., MRM 2018): one step from the total field to χ.
//!
//! Two-step pipelines remove the background field first, and every background removal also
//! removes the harmonic part of the tissue's own field, which the inversion can then never
//! recover. TFI instead explains the whole measured field with one χ over the whole grid,
//! background sources (air, bone, everything outside the head's tissue) and tissue alike:
//! `min ½‖W(Dχ − f)‖² + λ‖∇χ‖₁`, with `f` the total field and W zero wherever the field is
//! not measured (no signal). Which part of the field inside the brain is
//! the brain's own is then decided by the prior (few, sharp edges) and by the field measured
//! in the tissue around the brain, not by a background-removal rule. That surrounding tissue
//! is what makes it work: on the test head below, with data in the brain alone TFI is no
//! better than background removal followed by MEDI (NRMSE 0.77 and 0.71), with data on the
//! head around it 0.17.
//!
//! Solver: the paper minimises the MEDI-style objective by Gauss-Newton and CG with a
//! preconditioner that scales the unknowns outside the brain (P_b = 30), because CG stopped
//! early otherwise never reaches the background's ppm-sized sources. Here the same objective
//! (isotropic TV, linear data term on the unwrapped field) is solved by chimap's TV-ADMM,
//! whose χ step is an exact k-space solve that treats every scale alike, so it needs no
//! preconditioner (measured on the test head with a periodic field: Gauss-Newton with
//! P_b = 30 stalled at 0.6–1.1 NRMSE, ADMM reached 0.15 in 100 iterations). The grid is zero-padded (`pad_mm`) so that
//! sources on one side of the field of view do not act on the other through the FFT's
//! periodicity. `lambda: auto` picks λ at the L-curve corner, as for TV.
//!
//! Without a total field (a local field map) TFI inverts the local field the same way, with
//! sources allowed outside the mask.
//!
//! **Experimental.** On the simulated MNI head from raw phase (background ±2 ppm in the
//! brain, against ±0.5 on the test head) the solve fits the field (relative residual 0.02)
//! with the background partly inside the brain: slow offsets of ±0.9 ppm between slabs and
//! χ of 1–8 ppm in the signal voids, NRMSE 43 % outside the voids and thousands of percent
//! with them, where MEDI gets 35 %. What is missing is what the paper's preconditioner
//! provides: a reason for the solver to put ppm-sized sources outside the brain first.

use serde::{Deserialize, Serialize};

use super::lambda::Lambda;
use super::tv::{self, TvAdmm};
use super::{restrict, Method, Orientation, Problem};
use crate::physics::fft::fast_len;
use crate::volume::{crop, pad};
use crate::{Error, Result};

/// The `inversion.tfi` section of the configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// How far beyond the brain mask (mm) the pipeline hands over the measured total field:
    /// voxels there with signal and a reliable echo fit (scalp, dura, muscle) constrain the
    /// background sources. 0 = the brain alone.
    pub support_mm: f64,
    /// Zero padding (mm) added along every axis before the dipole convolutions.
    pub pad_mm: f64,
    /// Fail when `‖W(Dχ − f)‖ / ‖W f‖` over the support exceeds this: the solve has not
    /// explained the field, and its χ is not to be trusted.
    pub max_relative_residual: f64,
    /// The TV-ADMM solve over the padded grid (λ in ppm·mm, or `auto`; penalties; limits).
    pub admm: tv::Config,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            support_mm: 10.0,
            pad_mm: 20.0,
            max_relative_residual: 0.5,
            // Tuned on the test head (χ in the brain within ±0.3 ppm, a −9 ppm sinus, noise
            // 0.004 ppm): λ = 10⁻³ with ρ₁ = 10λ, ρ₂ = 0.1 reached 0.15 NRMSE in 100
            // iterations; TV's own penalties (100λ, 1) needed 1000 for 0.14. The total field
            // spans ppm where a local field spans tenths, so the data penalty is smaller.
            // With 20 mm padding: 0.17 (λ = 10⁻³, 100 iterations), 0.12 (3·10⁻⁴, 300).
            admm: tv::Config {
                lambda: Lambda::Value(1e-3),
                rho_tv: 10.0,
                rho_data: 0.1,
                tolerance: 1e-3,
                max_iterations: 100,
                ..tv::Config::default()
            },
        }
    }
}

pub struct Tfi {
    config: Config,
    solver: TvAdmm,
    /// What the last solve inverted, on how many voxels of data, and its relative residual.
    last: std::sync::Mutex<(&'static str, usize, f64)>,
}

impl Tfi {
    pub fn new(config: Config) -> Self {
        Tfi {
            solver: TvAdmm::in_section(config.admm.clone(), "inversion.tfi.admm"),
            config,
            last: std::sync::Mutex::new(("", 0, f64::NAN)),
        }
    }

    /// The padded grid of a problem on `dims`.
    fn padded_dims(&self, dims: [usize; 3], voxel_size: [f64; 3]) -> [usize; 3] {
        padded_dims(dims, voxel_size, self.config.pad_mm)
    }
}

/// TFI's grid for a problem on `dims`: grown by `pad_mm` on every side, to FFT-friendly sizes.
pub fn padded_dims(dims: [usize; 3], voxel_size: [f64; 3], pad_mm: f64) -> [usize; 3] {
    [0, 1, 2].map(|a| fast_len(dims[a] + (2.0 * pad_mm / voxel_size[a]).ceil() as usize))
}

impl Method for Tfi {
    fn name(&self) -> &'static str {
        "tfi"
    }

    fn check_config(&self) -> Result<()> {
        if !(self.config.pad_mm >= 0.0 && self.config.pad_mm.is_finite()) {
            return Err(Error::Config(format!(
                "inversion.tfi.pad_mm must be 0 or more, got {}",
                self.config.pad_mm
            )));
        }
        self.solver.check_config()
    }

    fn invert(&self, problem: &Problem) -> Result<Vec<f32>> {
        self.check_config()?;
        problem.check("TFI")?;
        tracing::warn!(
            "TFI is experimental: on the simulated MNI head from raw phase it leaves the \
             background in χ (see README, Dipole inversion); prefer medi or tv for results"
        );
        if problem.orientations.len() != 1 {
            return Err(Error::Numerics(format!(
                "TFI inverts one orientation at a time, got {}: use cosmos or lpcnn for a \
                 multi-orientation set",
                problem.orientations.len()
            )));
        }
        let n = problem.mask.len();
        let (field, support, weight, input) = match &problem.total {
            Some(t) => (t.field, t.support, t.weight, "total field"),
            None => (
                problem.orientations[0].field,
                problem.mask,
                problem.weight,
                "local field",
            ),
        };
        if field.len() != n || support.len() != n || weight.is_some_and(|w| w.len() != n) {
            return Err(Error::Numerics(format!(
                "TFI: the total field, its support and weight must all have {n} voxels"
            )));
        }
        let (dims, pdims) = (
            problem.dims,
            self.padded_dims(problem.dims, problem.voxel_size),
        );
        let field_p = pad(field, dims, pdims, 0.0);
        let support_p = pad(support, dims, pdims, false);
        let weight_p = weight.map(|w| pad(w, dims, pdims, 0.0));
        let padded = Problem {
            dims: pdims,
            voxel_size: problem.voxel_size,
            orientations: vec![Orientation {
                field: &field_p,
                b0: problem.orientations[0].b0,
            }],
            mask: &support_p,
            weight: weight_p.as_deref(),
            magnitude: None,
            total: None,
            csf: None,
        };
        let chi = self.solver.invert_unrestricted(&padded)?;
        let residual = relative_residual(&padded, &chi);
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) =
            (input, support.iter().filter(|&&m| m).count(), residual);
        // A solve that leaves most of the field unexplained has put the background into the
        // brain (measured on a realistic head from raw phase: residual ≈ 1, NRMSE > 1000 %);
        // a wrong map must not pass for a result.
        if residual.is_nan() || residual > self.config.max_relative_residual {
            return Err(Error::Numerics(format!(
                "TFI did not fit the total field (relative residual {residual:.2} > \
                 inversion.tfi.max_relative_residual = {}): the background field is too strong \
                 for this solve; use a two-step method (--method medi, tv or rts)",
                self.config.max_relative_residual
            )));
        }
        Ok(restrict(crop(&chi, pdims, dims), problem.mask))
    }

    fn parameters(&self) -> serde_json::Value {
        let (input, voxels, residual) = *self.last.lock().unwrap_or_else(|e| e.into_inner());
        serde_json::json!({
            "support_mm": self.config.support_mm,
            "pad_mm": self.config.pad_mm,
            "max_relative_residual": self.config.max_relative_residual,
            "relative_residual": residual,
            "admm": self.solver.parameters(),
            "input": input,
            "data_voxels": voxels,
        })
    }

    fn one_step(&self) -> bool {
        true
    }
}

/// `‖W(Dχ − f)‖ / ‖W f‖` over the problem's mask, W its data weight.
fn relative_residual(problem: &Problem, chi: &[f32]) -> f64 {
    let w = problem.data_weight();
    let d = problem.operator(0).forward(chi);
    let f = problem.orientations[0].field;
    let (mut r, mut n) = (0.0f64, 0.0f64);
    for i in 0..w.len() {
        let w2 = (w[i] as f64).powi(2);
        r += w2 * (d[i] as f64 - f[i] as f64).powi(2);
        n += w2 * (f[i] as f64).powi(2);
    }
    if n > 0.0 {
        (r / n).sqrt()
    } else {
        0.0
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::inversion::medi::{self, Medi};
    use crate::inversion::testing::{brain, nrmse_demeaned};
    use crate::inversion::TotalField;
    use crate::physics::DipoleOperator;
    use crate::preprocess::background::{remove_background, BackgroundConfig};
    use crate::simulate::rng::centred_noise as random;
    use crate::volume::{Geometry, Volume};

    /// The 48³ test brain in a "head": tissue (χ 0) around the brain out to an ellipsoid,
    /// and below the brain an air-filled "sinus" (−9 ppm against tissue) whose field reaches
    /// into the brain, as the background does in vivo. Returns (χ, brain mask, head mask:
    /// tissue with signal, the sinus excluded).
    pub(in crate::inversion) fn head_with_sinus() -> (Vec<f32>, Vec<bool>, Vec<bool>) {
        let n = 48;
        let (mut chi, brain_mask) = brain();
        let mut head = vec![false; n * n * n];
        for k in 0..n {
            for j in 0..n {
                for i in 0..n {
                    let s = [i as f64 - 24.0, j as f64 - 14.0, k as f64 - 8.0];
                    let h = [i as f64 - 24.0, j as f64 - 24.0, k as f64 - 24.0];
                    let idx = i + n * (j + n * k);
                    if (s[0] / 6.0).powi(2) + (s[1] / 4.0).powi(2) + (s[2] / 3.0).powi(2) < 1.0
                        && !brain_mask[idx]
                    {
                        chi[idx] = -9.0;
                    } else if (h[0] / 21.0).powi(2) + (h[1] / 21.0).powi(2) + (h[2] / 19.0).powi(2)
                        < 1.0
                    {
                        head[idx] = true;
                    }
                }
            }
        }
        (chi, brain_mask, head)
    }

    /// The field of `chi` as a scanner measures it: no periodic copies of the sources (the
    /// convolution runs on a grid twice as large, then is cropped).
    pub(in crate::inversion) fn field_of(chi: &[f32], dims: [usize; 3], b0: [f64; 3]) -> Vec<f32> {
        let big = dims.map(|d| 2 * d);
        let f = DipoleOperator::new(big, [1.0; 3], b0).forward(&pad(chi, dims, big, 0.0));
        crop(&f, big, dims)
    }

    #[test]
    fn tfi_from_the_total_field_beats_background_removal_then_medi() {
        let dims = [48; 3];
        let b0 = [0.0, 0.26, 0.966];
        let (chi, mask, head) = head_with_sinus();
        let mut total = field_of(&chi, dims, b0);
        let noise = random(total.len(), 11);
        total
            .iter_mut()
            .zip(&noise)
            .for_each(|(f, e)| *f += 0.004 * e);
        let on = |m: &[bool]| -> Vec<f32> {
            total
                .iter()
                .zip(m)
                .map(|(&f, &m)| if m { f } else { 0.0 })
                .collect()
        };
        let (in_brain, in_head) = (on(&mask), on(&head));
        let truth: Vec<f32> = chi
            .iter()
            .zip(&mask)
            .map(|(&c, &m)| if m { c } else { 0.0 })
            .collect();
        // A magnitude whose edges are those of χ in the brain, as MEDI assumes.
        let magnitude: Vec<f32> = truth.iter().map(|&c| 1.0 - c).collect();
        // Two-step: the pipeline's default background removal, then MEDI on its mask.
        let local = remove_background(
            &Volume::new(dims, in_brain.clone(), Geometry::from_voxel_size([1.0; 3])),
            &mask,
            b0,
            None,
            &BackgroundConfig::default(),
        )
        .unwrap();
        let two_step = Problem {
            dims,
            voxel_size: [1.0; 3],
            orientations: vec![Orientation {
                field: &local.field.data,
                b0,
            }],
            mask: &local.mask,
            weight: None,
            magnitude: Some(&magnitude),
            total: None,
            csf: None,
        };
        let medi = Medi::new(medi::Config::default())
            .invert(&two_step)
            .unwrap();
        let one_step = |field: &[f32], support: &crate::Mask| {
            let p = Problem {
                mask: &mask,
                orientations: vec![Orientation { field, b0 }],
                total: Some(TotalField {
                    field,
                    support,
                    weight: None,
                }),
                magnitude: None,
                ..two_step
            };
            let x = Tfi::new(Config::default()).invert(&p).unwrap();
            assert!(x.iter().zip(&mask).all(|(&v, &m)| m || v == 0.0));
            nrmse_demeaned(&x, &truth, &mask)
        };
        // Scored over the whole brain: a voxel a two-step method leaves out counts as error.
        let e_medi = nrmse_demeaned(&medi, &truth, &mask);
        let e_head = one_step(&in_head, &head);
        let e_brain = one_step(&in_brain, &mask);
        // Measured: TFI 0.17 with the head's field, background removal + MEDI 0.71, TFI with the brain's
        // field alone 0.77.
        assert!(
            e_head < 0.5 * e_medi,
            "TFI {e_head} against background removal + MEDI {e_medi}"
        );
        // The surrounding tissue's field is what separates background from brain.
        assert!(
            e_head < 0.5 * e_brain,
            "head {e_head}, brain only {e_brain}"
        );
    }

    #[test]
    fn padding_keeps_sources_on_one_side_from_acting_on_the_other() {
        // A sphere of χ near the top face and the field measured near the bottom face: on
        // the periodic grid without padding the two are neighbours.
        let dims = [32; 3];
        let b0 = [0.0, 0.0, 1.0];
        let mut chi = vec![0.0f32; 32 * 32 * 32];
        let mut support = vec![false; chi.len()];
        for (i, c) in chi.iter_mut().enumerate() {
            let p = [i % 32, (i / 32) % 32, i / 1024].map(|v| v as f64);
            let r2 = (p[0] - 16.0).powi(2) + (p[1] - 16.0).powi(2);
            if r2 + (p[2] - 28.0).powi(2) < 9.0 {
                *c = 1.0;
            }
            if r2 + (p[2] - 14.0).powi(2) < 100.0 {
                support[i] = true;
            }
        }
        let f = field_of(&chi, dims, b0);
        let field: Vec<f32> = f
            .iter()
            .zip(&support)
            .map(|(&f, &m)| if m { f } else { 0.0 })
            .collect();
        let p = Problem {
            dims,
            voxel_size: [1.0; 3],
            orientations: vec![Orientation { field: &field, b0 }],
            mask: &support,
            weight: None,
            magnitude: None,
            total: None,
            csf: None,
        };
        let err = |pad_mm| {
            let x = Tfi::new(Config {
                pad_mm,
                ..Config::default()
            })
            .invert(&p)
            .unwrap();
            // No χ lies in the support: anything there is error.
            x.iter().map(|v| (v * v) as f64).sum::<f64>().sqrt()
        };
        let (unpadded, padded) = (err(0.0), err(20.0));
        // Measured: 0.087 padded, 0.155 unpadded.
        assert!(
            padded < 0.7 * unpadded,
            "padded {padded}, unpadded {unpadded}"
        );
    }

    #[test]
    fn several_orientations_and_bad_parameters_are_clear_errors() {
        let f = vec![0.0f32; 512];
        let mask = vec![true; 512];
        let o = |b0| Orientation { field: &f, b0 };
        let p = Problem {
            dims: [8; 3],
            voxel_size: [1.0; 3],
            orientations: vec![o([0.0, 0.0, 1.0]), o([0.0, 0.6, 0.8])],
            mask: &mask,
            weight: None,
            magnitude: None,
            total: None,
            csf: None,
        };
        let err = Tfi::new(Config::default()).invert(&p).unwrap_err();
        assert!(err.to_string().contains("one orientation"), "{err}");
        let p = Problem {
            orientations: vec![o([0.0, 0.0, 1.0])],
            ..p
        };
        let err = Tfi::new(Config {
            pad_mm: -1.0,
            ..Config::default()
        })
        .invert(&p)
        .unwrap_err();
        assert!(err.to_string().contains("inversion.tfi"), "{err}");
        // Its solver's settings are named where users set them, not as TV's.
        let mut bad = Config::default();
        bad.admm.rho_tv = 0.0;
        let err = Tfi::new(bad).invert(&p).unwrap_err().to_string();
        assert!(err.contains("inversion.tfi.admm"), "{err}");
    }
}
