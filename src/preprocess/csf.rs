//! The ventricles' CSF, for MEDI+0's zero reference (Liu Z et al., MRM 2018): CSF is
//! nearly iron- and myelin-free, so its susceptibility is uniform, and it relaxes slowly,
//! so it is the brain's region of lowest R2*. MEDI+0 asks χ to be uniform there, which
//! removes the slow shading that an ill-posed inversion leaves across the brain and gives
//! every map the same reference.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::mask::{erode, largest_component};
use crate::{Error, Mask, Result, Volume};

/// How the CSF mask is found (YAML section `inversion.medi.csf`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CsfConfig {
    /// Voxels whose R2* is below this (s⁻¹ at 3 T; scaled by B0 / 3 T, as R2* is) may be CSF.
    /// Default 5 s⁻¹, MEDI+0's: CSF relaxes at ≈ 2–4 s⁻¹, grey matter at ≈ 15 and more.
    pub max_r2star_3t: f64,
    /// Only voxels this far (mm) inside the brain mask count: the CSF over the cortex lies
    /// against the skull, whose field the echo fit reads less reliably. Default 5 mm.
    pub inset_mm: f64,
    /// Fewer voxels than this (in the largest connected region) is no CSF mask. Default 100.
    pub min_voxels: usize,
}

impl Default for CsfConfig {
    fn default() -> Self {
        CsfConfig {
            max_r2star_3t: 5.0,
            inset_mm: 5.0,
            min_voxels: 100,
        }
    }
}

impl CsfConfig {
    /// Refuses values that cannot describe a mask, naming the key.
    pub fn check(&self, section: &str) -> Result<()> {
        if !(self.max_r2star_3t > 0.0 && self.max_r2star_3t.is_finite()) {
            return Err(Error::Config(format!(
                "{section}.max_r2star_3t must be a positive number of s⁻¹, got {}",
                self.max_r2star_3t
            )));
        }
        if !(self.inset_mm >= 0.0 && self.inset_mm.is_finite()) {
            return Err(Error::Config(format!(
                "{section}.inset_mm must be 0 or more, got {}",
                self.inset_mm
            )));
        }
        Ok(())
    }
}

/// R2* (s⁻¹) of every voxel in `mask` from the echoes' magnitudes: the least-squares line
/// through ln m against TE, each echo weighted by m² (the noise of ln m is σ/m). Zero outside
/// the mask and where fewer than two echoes have signal; never negative.
pub fn r2star(magnitudes: &[Volume], echo_times_s: &[f64], mask: &[bool]) -> Vec<f32> {
    let n = mask.len();
    (0..n)
        .into_par_iter()
        .map(|i| {
            if !mask[i] {
                return 0.0;
            }
            let (mut s, mut st, mut stt, mut sl, mut stl, mut used) =
                (0.0f64, 0.0, 0.0, 0.0, 0.0, 0);
            for (m, &t) in magnitudes.iter().zip(echo_times_s) {
                let v = m.data[i] as f64;
                if v > 0.0 && v.is_finite() {
                    let (w, l) = (v * v, v.ln());
                    s += w;
                    st += w * t;
                    stt += w * t * t;
                    sl += w * l;
                    stl += w * t * l;
                    used += 1;
                }
            }
            let det = s * stt - st * st;
            if used < 2 || det <= 0.0 {
                return 0.0;
            }
            let slope = (s * stl - st * sl) / det;
            (-slope).max(0.0) as f32
        })
        .collect()
}

/// The CSF mask: the largest connected region of voxels at least `inset_mm` inside the
/// brain mask whose R2* is below the (field-scaled) limit; `None` when that region is
/// smaller than `min_voxels` (a brain without visible ventricles, or one echo).
pub fn csf_mask(
    r2star: &[f32],
    brain: &[bool],
    dims: [usize; 3],
    voxel_size: [f64; 3],
    b0_tesla: f64,
    config: &CsfConfig,
) -> Option<Mask> {
    let limit = (config.max_r2star_3t * b0_tesla / 3.0) as f32;
    let inner = if config.inset_mm > 0.0 {
        erode(brain, dims, voxel_size, config.inset_mm)
    } else {
        brain.to_vec()
    };
    let low: Mask = inner
        .par_iter()
        .zip(r2star)
        .map(|(&m, &r)| m && r < limit)
        .collect();
    let csf = largest_component(&low, dims);
    (csf.iter().filter(|&&c| c).count() >= config.min_voxels.max(1)).then_some(csf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Geometry;

    /// A 40³ ball of brain (R2* 20 s⁻¹) with a ventricle (R2* 3) at its centre, a thin
    /// shell of CSF (R2* 3) at its edge, and two specks of low R2* in the tissue.
    fn head(te: &[f64]) -> (Vec<Volume>, Mask, Mask) {
        let n = 40;
        let dims = [n; 3];
        let mut r2 = vec![0.0f32; n * n * n];
        let mut brain = vec![false; n * n * n];
        let mut ventricle = vec![false; n * n * n];
        for k in 0..n {
            for j in 0..n {
                for i in 0..n {
                    let idx = i + n * (j + n * k);
                    let p = [i, j, k].map(|c| c as f64 - 19.5);
                    let r = (p[0] * p[0] + p[1] * p[1] + p[2] * p[2]).sqrt();
                    let in_ventricle =
                        (p[0] / 6.0).powi(2) + (p[1] / 3.0).powi(2) + (p[2] / 4.0).powi(2) < 1.0;
                    brain[idx] = r < 17.0;
                    ventricle[idx] = in_ventricle;
                    r2[idx] = if in_ventricle || (15.5..17.0).contains(&r) {
                        3.0
                    } else {
                        20.0
                    };
                }
            }
        }
        for idx in [5 + n * (20 + n * 20), 30 + n * (20 + n * 25)] {
            r2[idx] = 3.0;
        }
        let geom = Geometry::from_voxel_size([1.0; 3]);
        let mags = te
            .iter()
            .map(|&t| {
                Volume::new(
                    dims,
                    r2.iter().map(|&r| (-(r as f64) * t).exp() as f32).collect(),
                    geom.clone(),
                )
            })
            .collect();
        (mags, brain, ventricle)
    }

    #[test]
    fn r2star_is_recovered_from_an_exponential_decay() {
        let te = [0.004, 0.008, 0.012, 0.016, 0.020];
        let (mags, brain, ventricle) = head(&te);
        let r2 = r2star(&mags, &te, &brain);
        for i in 0..brain.len() {
            if ventricle[i] {
                assert!((r2[i] - 3.0).abs() < 1e-3, "ventricle R2* {}", r2[i]);
            }
            if !brain[i] {
                assert_eq!(r2[i], 0.0);
            }
        }
        assert!(r2.iter().any(|&r| (r - 20.0).abs() < 1e-3));
    }

    #[test]
    fn the_mask_is_the_ventricle_not_the_rim_or_specks() {
        let te = [0.004, 0.008, 0.012, 0.016, 0.020];
        let (mags, brain, ventricle) = head(&te);
        let r2 = r2star(&mags, &te, &brain);
        let csf = csf_mask(&r2, &brain, [40; 3], [1.0; 3], 3.0, &CsfConfig::default()).unwrap();
        assert_eq!(csf, ventricle, "exactly the ventricle");
        // At 7 T the limit scales with the field: the same R2* values are all below it.
        let at_7t = csf_mask(&r2, &brain, [40; 3], [1.0; 3], 7.0, &CsfConfig::default()).unwrap();
        assert_eq!(at_7t, ventricle);
        // A brain without a region large enough has no CSF mask.
        let strict = CsfConfig {
            min_voxels: 10_000,
            ..Default::default()
        };
        assert!(csf_mask(&r2, &brain, [40; 3], [1.0; 3], 3.0, &strict).is_none());
        assert!(CsfConfig {
            max_r2star_3t: 0.0,
            ..Default::default()
        }
        .check("inversion.medi.csf")
        .is_err());
    }
}
