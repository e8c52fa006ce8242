//! Quality checks on one acquisition's local field, run before inversion.
//!
//! Each check turns what the pipeline already holds (local field, masks, total field, echo-fit
//! residual, magnitude, echo times, B0 direction, grids) into one number, compares it with the
//! limits of the `qc:` config section and gives a verdict. The list is written to
//! `<prefix>_desc-qc.json` beside the Chimap; a `fail` stops the acquisition unless
//! `--ignore-qc-failures`.
//!
//! - [`field`]: NaN/Inf, the robust range of the local field in ppm, residual phase wraps.
//! - [`background`]: energy of a low-order polynomial fitted to the local field.
//! - [`echoes`]: whether every echo follows its neighbours in time (a corrupted echo).
//! - [`protocol`]: echo count and spacing, grids of the echoes, B0 tilt, mask coverage and
//!   erosion.
//! - [`orientations`]: a multi-orientation set's own checks, in the set's qc json: each
//!   as-scanned member's registration (similarity, rotation) and how well the set's B0
//!   directions condition the joint inversion.

pub mod background;
pub mod echoes;
pub mod field;
pub mod orientations;
pub mod protocol;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{Mask, Result, Volume};

/// The outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Warn,
    Fail,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Warn => "warn",
            Verdict::Fail => "fail",
        }
    }
}

/// Limits of one check; `null` means no limit on that side. A value beyond a `fail_*`
/// limit fails, beyond a `warn_*` limit warns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub warn_below: Option<f64>,
    pub warn_above: Option<f64>,
    pub fail_below: Option<f64>,
    pub fail_above: Option<f64>,
}

impl Limits {
    const fn above(warn: f64, fail: Option<f64>) -> Self {
        Limits {
            warn_below: None,
            warn_above: Some(warn),
            fail_below: None,
            fail_above: fail,
        }
    }

    const fn below(warn: f64, fail: Option<f64>) -> Self {
        Limits {
            warn_below: Some(warn),
            warn_above: None,
            fail_below: fail,
            fail_above: None,
        }
    }

    /// The verdict for `value`; NaN fails (a check that cannot be computed is not a pass).
    pub fn verdict(&self, value: f64) -> Verdict {
        if value.is_nan() {
            return Verdict::Fail;
        }
        let beyond = |below: Option<f64>, above: Option<f64>| {
            below.is_some_and(|b| value < b) || above.is_some_and(|a| value > a)
        };
        if beyond(self.fail_below, self.fail_above) {
            Verdict::Fail
        } else if beyond(self.warn_below, self.warn_above) {
            Verdict::Warn
        } else {
            Verdict::Pass
        }
    }
}

/// The `qc:` config section: the limits of every check, and the settings of the wrap test.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Invert even when a check fails (the `--ignore-qc-failures` flag sets it).
    pub ignore_failures: bool,
    /// NaN/Inf voxels in the local or total field inside the mask.
    pub non_finite_voxels: Limits,
    /// 1st–99th percentile range of the local field in the mask (ppm). Far above: a
    /// background left in or a unit mistake; far below: a field that is not in ppm.
    pub field_range_ppm: Limits,
    /// Fraction of the local field's energy in the mask explained by a polynomial of
    /// `background_order` (residual background field).
    pub residual_background: Limits,
    /// Order of that polynomial (0–3).
    pub background_order: usize,
    /// Fraction of interior mask voxels whose field Laplacian is an outlier (residual wraps).
    pub residual_wraps: Limits,
    /// A Laplacian is an outlier beyond this many robust standard deviations …
    pub wrap_outlier_sigmas: f64,
    /// … and beyond this fraction of the field jump of one wrap at the last echo, 1/TE (Hz),
    /// so that very smooth fields do not flag their own noise.
    pub wrap_jump_fraction: f64,
    /// Brain mask voxels over voxels with signal (magnitude above 10 % of its 99th percentile).
    pub mask_coverage: Limits,
    /// Volume of the brain mask (mL). An adult's intracranial volume is ≈ 1100–1900 mL;
    /// well above means scalp or neck is in the mask.
    pub brain_volume_ml: Limits,
    /// Length (mm) of the brain mask along its longest principal axis (an adult brain:
    /// ≈ 160–185 mm front to back); longer means scalp, face or neck is in.
    pub brain_length_mm: Limits,
    /// Longest over shortest principal axis of the brain mask (≈ 1.3–1.5 for a brain); a
    /// mask that leaks down the neck or misses a lobe is elongated.
    pub brain_elongation: Limits,
    /// Fraction of the brain mask kept by background removal.
    pub mask_kept_after_background: Limits,
    /// Angle between B0 and the nearest voxel axis (degrees).
    pub b0_tilt_degrees: Limits,
    /// Number of echoes.
    pub echo_count: Limits,
    /// Smallest spacing between consecutive echo times (ms).
    pub echo_spacing_ms: Limits,
    /// Largest distance between the grids of the echoes and magnitudes (mm at the grid's corners).
    pub echo_grid_mismatch_mm: Limits,
    /// Median local coherence of the phase difference of the least coherent pair of
    /// consecutive echoes (about 1 when sound, about 0.3 when one is noise).
    pub echo_consistency: Limits,
    /// NCC of each as-scanned member's first-echo magnitude with the reference's over the
    /// reference's brain after registration (`registration_ncc_<member>`). Simulated sets
    /// reach 0.99 (0.84–0.93 with the heads 15° apart and only their centres aligned), so
    /// these limits catch a registration that failed outright or series that do not belong
    /// together, not errors of a few degrees.
    pub registration_ncc: Limits,
    /// Head rotation registration found for each as-scanned member (degrees; tested up to
    /// 30°). A large rotation helps COSMOS, so it only warns.
    pub head_rotation_degrees: Limits,
    /// Share of k-space directions where an orientation set's `Σᵢ Dᵢ²` is below
    /// `inversion.cosmos.threshold` (one orientation: 0.175; two: 0.014–0.12; three tilted
    /// 15° about two axes: 0).
    pub b0_ill_conditioned_fraction: Limits,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            ignore_failures: false,
            non_finite_voxels: Limits::above(0.0, Some(0.0)),
            field_range_ppm: Limits {
                warn_below: Some(1e-3),
                warn_above: Some(1.0),
                fail_below: Some(1e-5),
                fail_above: Some(5.0),
            },
            residual_background: Limits::above(0.4, Some(0.7)),
            background_order: 2,
            residual_wraps: Limits::above(0.03, Some(0.1)),
            wrap_outlier_sigmas: 8.0,
            wrap_jump_fraction: 0.5,
            mask_coverage: Limits {
                warn_below: Some(0.2),
                warn_above: Some(1.5),
                fail_below: Some(0.05),
                fail_above: None,
            },
            // Flags only: the limits are an adult human's; other heads (children,
            // animals, phantoms) are for the user's config to describe.
            brain_volume_ml: Limits {
                warn_below: Some(1000.0),
                warn_above: Some(2000.0),
                fail_below: None,
                fail_above: None,
            },
            brain_length_mm: Limits {
                warn_below: Some(130.0),
                warn_above: Some(200.0),
                fail_below: None,
                fail_above: None,
            },
            brain_elongation: Limits::above(1.8, None),
            mask_kept_after_background: Limits::below(0.6, Some(0.3)),
            b0_tilt_degrees: Limits::above(30.0, None),
            echo_count: Limits::below(3.0, None),
            echo_spacing_ms: Limits {
                warn_below: None,
                warn_above: Some(20.0),
                fail_below: Some(0.05),
                fail_above: None,
            },
            echo_grid_mismatch_mm: Limits::above(0.5, Some(2.0)),
            echo_consistency: Limits::below(0.7, Some(0.55)),
            registration_ncc: Limits::below(0.9, Some(0.7)),
            head_rotation_degrees: Limits::above(30.0, None),
            // Every pair of orientations warns (their cones cross); a set that removes less
            // than 60 % of one orientation's share (B0 within ≈ 5° for three, ≈ 9° for two)
            // fails: it adds little over a single orientation.
            b0_ill_conditioned_fraction: Limits::above(0.01, Some(0.07)),
        }
    }
}

/// One check's result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub value: f64,
    pub threshold: Limits,
    pub verdict: Verdict,
    pub message: String,
}

impl Check {
    pub fn new(name: &str, value: f64, limits: Limits, message: String) -> Self {
        Check {
            name: name.to_string(),
            value,
            threshold: limits,
            verdict: limits.verdict(value),
            message,
        }
    }
}

/// What the checks look at. Everything lies on one grid; the optional parts exist for raw
/// inputs only (a field map carries no echoes, magnitude or fit residual).
pub struct Inputs<'a> {
    /// Local field (ppm).
    pub local_ppm: &'a Volume,
    /// Where the local field is defined (after background removal).
    pub mask: &'a Mask,
    /// The mask given to background removal.
    pub brain_mask: Option<&'a Mask>,
    /// Total field (Hz), when there is one.
    pub total_hz: Option<&'a Volume>,
    /// Root-sum-of-squares magnitude.
    pub magnitude: Option<&'a Volume>,
    /// Phase-difference coherence of each pair of consecutive echoes
    /// ([`echoes::pair_coherence`]).
    pub echo_coherence: Option<&'a [f64]>,
    /// Echo times (s); empty for field-map inputs.
    pub echo_times: &'a [f64],
    /// Largest distance between echo/magnitude grids (mm), when several were read.
    pub echo_grid_mismatch_mm: Option<f64>,
    pub b0_direction: [f64; 3],
    /// B0 in tesla, when known (needed to express the wrap jump in ppm).
    pub b0_tesla: Option<f64>,
}

/// Runs every check that applies to `inputs`.
pub fn run(inputs: &Inputs, config: &Config) -> Vec<Check> {
    let mut checks = vec![field::non_finite(inputs, config)];
    // The field checks read finite values only; with NaN present they would mislead.
    if checks[0].value == 0.0 {
        checks.push(field::range_ppm(inputs, config));
        checks.push(background::residual_background(inputs, config));
        checks.extend(field::residual_wraps(inputs, config));
    }
    if let Some(m) = inputs.echo_coherence {
        checks.extend(echoes::consistency(m, config));
    }
    checks.extend(protocol::all(inputs, config));
    checks
}

/// The worst verdict (pass for no checks).
pub fn overall(checks: &[Check]) -> Verdict {
    checks
        .iter()
        .map(|c| c.verdict)
        .max()
        .unwrap_or(Verdict::Pass)
}

/// The failed checks as one sentence, for the error that stops an acquisition.
pub fn failure_message(checks: &[Check]) -> Option<String> {
    let failed: Vec<String> = checks
        .iter()
        .filter(|c| c.verdict == Verdict::Fail)
        .map(|c| format!("{} = {} ({})", c.name, format_value(c.value), c.message))
        .collect();
    (!failed.is_empty()).then(|| {
        format!(
            "quality check failed: {}; see the qc json and the report, fix the input or the `qc:` \
             limits of the config, or pass --ignore-qc-failures to invert anyway",
            failed.join("; ")
        )
    })
}

/// A compact, readable number for tables and messages.
pub fn format_value(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        format!("{v}")
    } else if v.abs() >= 1e4 || v.abs() < 1e-3 {
        format!("{v:.3e}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.4}")
    }
}

/// `<prefix>_desc-qc.json` in the folder of `chimap_like`, an output path of the acquisition.
pub fn json_path(folder: &Path, prefix: &str) -> PathBuf {
    folder.join(format!("{prefix}_desc-qc.json"))
}

/// Writes the checks of one acquisition atomically.
pub fn write_json(path: &Path, acquisition: &str, checks: &[Check], ignored: bool) -> Result<()> {
    let doc = json!({
        "Acquisition": acquisition,
        "ChimapVersion": crate::VERSION,
        "Verdict": overall(checks).as_str(),
        "FailuresIgnored": ignored && overall(checks) == Verdict::Fail,
        "Checks": checks,
    });
    crate::io::write_json(path, &doc)
}

/// Reads a qc json back (for the report and the group level).
pub fn read_json(path: &Path) -> Result<(String, Vec<Check>)> {
    let v: Value = crate::io::read_json(path)?;
    let name = v["Acquisition"].as_str().unwrap_or_default().to_string();
    let checks: Vec<Check> = serde_json::from_value(v["Checks"].clone()).map_err(|e| {
        crate::Error::input(
            path,
            format!("is not a chimap qc file ({e}); remove it and rerun the participant level"),
        )
    })?;
    Ok((name, checks))
}

#[cfg(test)]
pub(crate) mod testing;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_give_verdicts_on_both_sides_and_nan_fails() {
        let l = Limits {
            warn_below: Some(1.0),
            warn_above: Some(5.0),
            fail_below: Some(0.0),
            fail_above: Some(10.0),
        };
        assert_eq!(l.verdict(3.0), Verdict::Pass);
        assert_eq!(l.verdict(0.5), Verdict::Warn);
        assert_eq!(l.verdict(-1.0), Verdict::Fail);
        assert_eq!(l.verdict(7.0), Verdict::Warn);
        assert_eq!(l.verdict(11.0), Verdict::Fail);
        assert_eq!(l.verdict(f64::NAN), Verdict::Fail);
        assert_eq!(Limits::default().verdict(1e30), Verdict::Pass);
    }

    #[test]
    fn qc_json_round_trips_and_failures_name_the_check_and_the_flag() {
        let checks = vec![
            Check::new("a", 1.0, Limits::above(2.0, None), "fine".into()),
            Check::new("b", 3.0, Limits::above(1.0, Some(2.0)), "bad".into()),
        ];
        assert_eq!(overall(&checks), Verdict::Fail);
        let msg = failure_message(&checks).unwrap();
        assert!(
            msg.contains("b = 3") && msg.contains("--ignore-qc-failures"),
            "{msg}"
        );
        assert!(failure_message(&checks[..1]).is_none());
        let dir = tempfile::tempdir().unwrap();
        let p = json_path(dir.path(), "sub-1");
        write_json(&p, "sub-1", &checks, false).unwrap();
        let (name, back) = read_json(&p).unwrap();
        assert_eq!(name, "sub-1");
        assert_eq!(back, checks);
    }
}
