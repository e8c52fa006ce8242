//! Raw phase to radians.
//!
//! Scanners store phase either as floating-point radians or as integers spanning a
//! power-of-two range (Siemens −4096..4095 or 0..4095, Philips/GE variants, 0..65535 after
//! some converters). `scale_phase` detects which from the values, rescales integers to
//! radians, and refuses anything else: a float phase in 0..37.2 is not a phase we can
//! interpret, and guessing would silently corrupt every map downstream.

use std::f64::consts::PI;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{Error, Result, Volume};

/// How raw phase values map to radians.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PhaseScaleMode {
    /// Decide from the values: radians if they lie within [−π, π] or [0, 2π] (plus
    /// `radians_tolerance`), integers if they are whole numbers beyond that range.
    Auto,
    /// The values are radians; use them as they are.
    Radians,
    /// The values are scanner integers over a power-of-two range, whatever they look like.
    Integer,
}

/// Phase scaling settings (YAML section `scale`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScaleConfig {
    /// `auto` (default), `radians` or `integer`; see [`PhaseScaleMode`].
    pub phase_scale: PhaseScaleMode,
    /// How far (rad) values may exceed ±π or [0, 2π] and still be taken for radians;
    /// covers rounding in converters that store float phase. Default 0.05 rad.
    pub radians_tolerance: f64,
}

impl Default for ScaleConfig {
    fn default() -> Self {
        ScaleConfig {
            phase_scale: PhaseScaleMode::Auto,
            radians_tolerance: 0.05,
        }
    }
}

/// What `scale_phase` did, for the sidecar.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PhaseScaling {
    /// `radians` (values used as read) or `integer` (rescaled).
    pub interpretation: PhaseScaleMode,
    /// True when `interpretation` was detected (`phase_scale: auto`), false when forced.
    pub detected: bool,
    /// Smallest raw value over all echoes (after the NIfTI slope/intercept).
    pub observed_min: f64,
    /// Largest raw value over all echoes.
    pub observed_max: f64,
    /// Integers only: the range is ±2^bits (signed) or 0..2^bits (unsigned).
    pub bits: Option<u32>,
    /// Integers only: whether the range is signed.
    pub signed: Option<bool>,
    /// Radians per raw unit (1 for radians).
    pub radians_per_unit: f64,
}

/// Converts the echoes' phase to radians in place and reports the scaling.
///
/// `sources[e]` names the file of echo `e` in messages (one entry serves all echoes);
/// `integer_on_disk` says whether the NIfTI data type was an integer type.
/// Errors: NaN/Inf anywhere (naming the echo's file), or values that are neither radians nor
/// scanner integers (naming the file and the range found).
///
/// Integers: signed ranges map by `p·π/2^m` onto [−π, π); unsigned ones by `p·2π/2^m`,
/// wrapped onto [−π, π) (the same angle mod 2π), with `2^m` the smallest power of two
/// covering the values.
pub fn scale_phase(
    phases: &mut [Volume],
    sources: &[PathBuf],
    integer_on_disk: bool,
    config: &ScaleConfig,
) -> Result<PhaseScaling> {
    if phases.is_empty() {
        return Err(Error::Usage("no phase echoes given".into()));
    }
    let source = |e: usize| -> &Path {
        sources
            .get(e)
            .or_else(|| sources.first())
            .map(|p| p.as_path())
            .unwrap_or_else(|| Path::new("<phase>"))
    };
    let mut ranges = Vec::with_capacity(phases.len());
    for (e, p) in phases.iter().enumerate() {
        let (lo, hi, bad, fractional) = scan(&p.data);
        if bad > 0 {
            return Err(Error::input(
                source(e),
                format!(
                    "phase of echo {} contains {bad} NaN or infinite values; \
                     the phase must be finite everywhere",
                    e + 1
                ),
            ));
        }
        ranges.push((lo, hi, fractional));
    }
    let lo = ranges.iter().map(|r| r.0).fold(f64::INFINITY, f64::min);
    let hi = ranges.iter().map(|r| r.1).fold(f64::NEG_INFINITY, f64::max);
    let integral = ranges.iter().all(|r| !r.2);
    let tol = config.radians_tolerance.max(0.0);
    let looks_radians = (lo >= -PI - tol && hi <= PI + tol) || (lo >= -tol && hi <= 2.0 * PI + tol);

    let interpretation = match config.phase_scale {
        PhaseScaleMode::Auto if looks_radians => PhaseScaleMode::Radians,
        PhaseScaleMode::Auto if integral || integer_on_disk => PhaseScaleMode::Integer,
        PhaseScaleMode::Auto => {
            // Name the echo whose values stray furthest from a radian range.
            let worst = ranges
                .iter()
                .enumerate()
                .max_by(|a, b| (a.1 .1 - a.1 .0).total_cmp(&(b.1 .1 - b.1 .0)))
                .map(|(e, _)| e)
                .unwrap_or(0);
            return Err(Error::input(
                source(worst),
                format!(
                    "phase values range from {lo} to {hi}: neither radians \
                     ([-pi, pi] or [0, 2pi]) nor scanner integers (whole numbers such as \
                     -4096..4095 or 0..4095). Convert the phase to radians, or set \
                     `phase_scale: radians` or `phase_scale: integer` in the config to force \
                     an interpretation"
                ),
            ));
        }
        forced => forced,
    };
    let detected = config.phase_scale == PhaseScaleMode::Auto;

    if interpretation == PhaseScaleMode::Radians {
        return Ok(PhaseScaling {
            interpretation,
            detected,
            observed_min: lo,
            observed_max: hi,
            bits: None,
            signed: None,
            radians_per_unit: 1.0,
        });
    }

    let signed = lo < -0.5;
    let extent = if signed {
        (-lo).max(hi + 1.0)
    } else {
        hi + 1.0
    };
    let bits = extent.max(2.0).log2().ceil().clamp(1.0, 62.0) as u32;
    let full = 2f64.powi(bits as i32);
    let radians_per_unit = if signed { PI / full } else { 2.0 * PI / full };
    let scale = radians_per_unit as f32;
    let pi = std::f32::consts::PI;
    phases.par_iter_mut().for_each(|p| {
        p.data.par_chunks_mut(4096).for_each(|c| {
            for v in c {
                let mut x = *v * scale;
                if !signed && x >= pi {
                    x -= 2.0 * pi;
                }
                *v = x;
            }
        })
    });
    Ok(PhaseScaling {
        interpretation,
        detected,
        observed_min: lo,
        observed_max: hi,
        bits: Some(bits),
        signed: Some(signed),
        radians_per_unit,
    })
}

/// (min, max, number of non-finite values, any non-integer value) of one echo.
fn scan(data: &[f32]) -> (f64, f64, usize, bool) {
    data.par_chunks(65536)
        .map(|c| {
            let mut lo = f32::INFINITY;
            let mut hi = f32::NEG_INFINITY;
            let mut bad = 0usize;
            let mut frac = false;
            for &v in c {
                if !v.is_finite() {
                    bad += 1;
                    continue;
                }
                lo = lo.min(v);
                hi = hi.max(v);
                frac |= (v - v.round()).abs() > 1e-3;
            }
            (lo as f64, hi as f64, bad, frac)
        })
        .reduce(
            || (f64::INFINITY, f64::NEG_INFINITY, 0, false),
            |a, b| (a.0.min(b.0), a.1.max(b.1), a.2 + b.2, a.3 || b.3),
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Geometry;

    fn vol(values: Vec<f32>) -> Volume {
        let n = values.len();
        Volume::new([n, 1, 1], values, Geometry::from_voxel_size([1.0; 3]))
    }

    fn ramp(lo: f32, hi: f32, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| lo + (hi - lo) * i as f32 / (n - 1) as f32)
            .collect()
    }

    fn run(v: Vec<f32>, int: bool, mode: PhaseScaleMode) -> Result<(Vec<f32>, PhaseScaling)> {
        let mut p = vec![vol(v)];
        let cfg = ScaleConfig {
            phase_scale: mode,
            ..Default::default()
        };
        let s = scale_phase(&mut p, &[PathBuf::from("sub-01_phase.nii.gz")], int, &cfg)?;
        Ok((p.remove(0).data, s))
    }

    #[test]
    fn radians_are_used_as_is() {
        let pi = std::f32::consts::PI;
        let v = ramp(-pi + 1e-4, pi - 1e-4, 101);
        let (out, s) = run(v.clone(), false, PhaseScaleMode::Auto).unwrap();
        assert_eq!(out, v);
        assert_eq!(s.interpretation, PhaseScaleMode::Radians);
        let v = ramp(0.0, 2.0 * pi - 0.003, 101);
        let (_, s) = run(v, false, PhaseScaleMode::Auto).unwrap();
        assert_eq!(s.interpretation, PhaseScaleMode::Radians);
    }

    #[test]
    fn signed_and_unsigned_integers_are_rescaled() {
        let (out, s) = run(
            vec![-4096.0, 0.0, 2048.0, 4095.0],
            true,
            PhaseScaleMode::Auto,
        )
        .unwrap();
        assert_eq!(s.bits, Some(12));
        assert_eq!(s.signed, Some(true));
        let pi = std::f32::consts::PI;
        assert!((out[0] + pi).abs() < 1e-6 && out[1] == 0.0 && (out[2] - pi / 2.0).abs() < 1e-6);
        let (out, s) = run(vec![-2000.0, 2047.0], false, PhaseScaleMode::Auto).unwrap();
        assert_eq!(s.bits, Some(11));
        assert!((out[1] - 2047.0 * pi / 2048.0).abs() < 1e-5);
        // Unsigned 0..4095: 3072 is 3/4 of a turn, i.e. −π/2 mod 2π.
        let (out, s) = run(
            vec![0.0, 1024.0, 3072.0, 4095.0],
            true,
            PhaseScaleMode::Auto,
        )
        .unwrap();
        assert_eq!((s.bits, s.signed), (Some(12), Some(false)));
        assert!((out[1] - pi / 2.0).abs() < 1e-6);
        assert!((out[2] + pi / 2.0).abs() < 1e-6);
        assert!(out.iter().all(|&x| (-pi..pi).contains(&x)));
        let (_, s) = run(vec![0.0, 65535.0], true, PhaseScaleMode::Auto).unwrap();
        assert_eq!(s.bits, Some(16));
    }

    #[test]
    fn uninterpretable_float_range_is_rejected_with_file_and_range() {
        let err = run(ramp(0.0, 37.2, 50), false, PhaseScaleMode::Auto).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("sub-01_phase.nii.gz"), "{msg}");
        assert!(msg.contains("37.2"), "{msg}");
        assert!(msg.contains("phase_scale"), "{msg}");
        // The override accepts it.
        let (out, s) = run(ramp(0.0, 37.2, 50), false, PhaseScaleMode::Radians).unwrap();
        assert_eq!(s.interpretation, PhaseScaleMode::Radians);
        assert!(!s.detected);
        assert!((out[49] - 37.2).abs() < 1e-4);
        let (_, s) = run(ramp(0.0, 37.2, 50), false, PhaseScaleMode::Integer).unwrap();
        assert_eq!(s.bits, Some(6));
    }

    #[test]
    fn non_finite_phase_is_rejected() {
        let err = run(vec![0.0, f32::NAN, 1.0], false, PhaseScaleMode::Auto).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("sub-01_phase.nii.gz") && msg.contains("NaN"),
            "{msg}"
        );
        assert!(run(vec![0.0, f32::INFINITY], false, PhaseScaleMode::Radians).is_err());
    }
}
